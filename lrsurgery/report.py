"""What the CLI shows: summaries of models and adapter files as plain data, and how to print them."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from torch import nn

from lrsurgery import format as fmt
from lrsurgery import lineage
from lrsurgery.errors import TargetError
from lrsurgery.layers.lora import is_linear, linear_shape
from lrsurgery.memory import format_bytes, lora_estimate
from lrsurgery.targets import TargetSpec, family, head_names, resolve_targets


def print_json(data: Any) -> None:
    """One JSON document on stdout (non-finite floats as null)."""
    print(json.dumps(_finite(data), indent=2, default=str))


def _finite(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def table(title: str | None, columns: list[str], rows: list[list[Any]]) -> None:
    """A rich table on stdout; numbers right-aligned."""
    t = Table(title=title, title_justify="left", show_lines=False)
    for i, c in enumerate(columns):
        t.add_column(c, justify="left" if i == 0 else "right", overflow="fold")
    for r in rows:
        t.add_row(*[str(v) for v in r])
    Console(width=max(120, Console().width)).print(t)


def inspect_model(model: nn.Module, targets: TargetSpec, rank: int) -> dict[str, Any]:
    """Every module with type, weight shape and own parameter count; which are targets; LoRA's cost."""
    try:
        matched = set(resolve_targets(model, targets).matched)
    except TargetError:
        if targets is not None:
            raise
        matched = set()  # no family preset: show the model, match nothing
    heads = head_names(model)
    rows = []
    for name, m in model.named_modules():
        if not name:
            continue
        w = getattr(m, "weight", None)
        rows.append({"name": name, "type": type(m).__name__, "linear": is_linear(m) or name in heads,
                     "shape": list(w.shape) if w is not None and hasattr(w, "shape") else [],
                     "params": sum(p.numel() for p in m.parameters(recurse=False)), "target": name in matched,
                     "head": name in heads})
    shapes = [linear_shape(model.get_submodule(n))[:2] for n in sorted(matched)]
    estimate = lora_estimate(shapes, rank) if shapes else {"trainable_params": 0, "param_bytes": 0,
                                                          "grad_bytes": 0, "optimizer_bytes": 0}
    training = estimate["param_bytes"] + estimate["grad_bytes"] + estimate["optimizer_bytes"]
    return {"family": family(model), "total_params": sum(p.numel() for p in model.parameters()),
            "matched": sorted(matched), "modules": rows,
            "lora": {**estimate, "rank": rank, "training_bytes": training, "training_bytes_h": format_bytes(training)}}


def adapter_summary(path: str | Path) -> dict[str, Any]:
    """Read (and so validate) an adapter file (or ``hf:`` reference) and describe it module by module."""
    from lrsurgery.adapter import load_adapter
    adapter = load_adapter(path)
    if adapter.path is not None:
        path = adapter.path  # a hub reference: the cached file
    modules = [_module_summary(name, e) for name, e in adapter.modules.items()]
    return {"path": str(path), "format_version": adapter.version, "valid": True, "base": adapter.meta["base"],
            "method": adapter.meta.get("method"), "provenance": adapter.meta.get("provenance", {}),
            "id": lineage.adapter_id(adapter), "parents": lineage.parents(adapter), "layers": lineage.layers(adapter),
            "num_parameters": adapter.num_parameters(), "file_bytes": Path(path).stat().st_size, "modules": modules}


def _module_summary(name: str, e: dict[str, Any]) -> dict[str, Any]:
    """One row of ``show``: rank/alpha/scaling of a LoRA entry, or of an LTE ``delta`` entry's heads (``lte``)."""
    row = {"name": name or "(whole model)", "kind": e["kind"], "rank": e.get("rank"), "alpha": e.get("alpha"),
           "scaling": e.get("scaling")}
    if e["kind"] == "lora":
        row["shape"] = f"{e['out_features']}×{e['in_features']}"
        row["params"] = e["rank"] * (e["in_features"] + e["out_features"])
        return row
    shapes = fmt.expected_tensors(name, e)
    row["params"] = sum(math.prod(s) for s in shapes.values())
    if e["kind"] == "delta":  # a dense ΔW has no rank of its own; its LTE heads (if kept) have H × r
        row["shape"] = f"{e['out_features']}×{e['in_features']}"
        lte = e.get("lte")
        if lte:
            row.update(lte=lte, alpha=lte["alpha"], scaling=lte["alpha"] / lte["rank"])  # LTE: s = alpha / r
    else:
        row["shape"] = ", ".join("×".join(map(str, s)) for s in shapes.values())
    return row


def rank_cell(module: dict[str, Any]) -> str:
    """The rank column of ``show``: r for LoRA, "H×r heads" for an LTE delta with its heads, else empty."""
    if module.get("lte"):
        return f"{module['lte']['heads']}×{module['lte']['rank']} heads"
    return "" if module.get("rank") is None else str(module["rank"])


def lineage_lines(summary: dict[str, Any]) -> list[str]:
    """``show``'s lines for an adapter's parents (root first) and a stack file's layers (in order); none for a root."""
    lines = []
    if summary["parents"]:
        lines.append("parents (root first): " + " → ".join(
            f"{p.get('name', '?')} (id {lineage.short_id(p['id'])})" for p in summary["parents"]))
    if summary["layers"]:
        lines.append("layers (applied in order): " + " → ".join(
            f"{x.get('name', '?')} (id {lineage.short_id(x['id'])}, {x.get('method', '?')}"
            + (f", rank {', '.join(map(str, x['ranks']))}" if x.get("ranks") else "") + ")"
            for x in summary["layers"]))
    return lines
