"""Adapter lineage: an adapter's content id, the parents it was trained on, and the chain a model carries.

An adapter trained on top of others (``inject --on A1 --on A2``) lists them, root first, in its
metadata: ``"parents": [{"id", "name", "method"}, ...]``. A model into which adapters were folded
(``ops.stack.fold_adapter``) carries the same chain as ``model.lrsurgery_lineage``, together with
the records of the *original* base weights that folding changed. So a child adapter is checked
twice when applied: its parents must be exactly the model's chain, in order, and its LoRA base
hashes (which pin the original weights, not the folded ones) must match those records.

    id = sha256( canonical JSON of {"modules": meta["modules"],
                                     "tensors": {tensor name: sha256 of its stored bytes},
                                     "parents": [parent ids, root first]} )

The id covers what the adapter computes and on top of what (modules with their base hashes,
tensors, parent ids); it ignores what only describes it (provenance, config, base reference,
layers, names), so re-saving or renaming a file keeps its id.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from lrsurgery import format as fmt
from lrsurgery.errors import AdapterFormatError, BaseMismatchError
from lrsurgery.surgery import lora_modules

RUN_ADAPTER = "adapter.safetensors"  # a run directory's adapter file: named by its directory too


@dataclass
class Lineage:
    """What was folded into a model: the adapters, root first, and the base records of changed weights."""

    chain: list[dict[str, Any]] = field(default_factory=list)     # {"id", "name", "method"} per adapter
    records: dict[str, dict[str, Any]] = field(default_factory=dict)  # module -> original weight record


def adapter_id(adapter: fmt.Adapter) -> str:
    """The content id of an adapter (64 hex): independent of file bytes, names and provenance."""
    content = {"modules": adapter.modules,
               "tensors": {k: fmt.tensor_sha256(t) for k, t in sorted(adapter.tensors.items())},
               "parents": [p["id"] for p in parents(adapter)]}
    text = json.dumps(content, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def short_id(id_: str) -> str:
    return id_[:12]


def adapter_name(adapter: fmt.Adapter) -> str:
    """How messages name an adapter: its file name (a run's adapter: ``RUN/adapter.safetensors``)."""
    if adapter.path is None:
        return f"unsaved-{short_id(adapter_id(adapter))}"
    path = adapter.path
    return f"{path.parent.name}/{path.name}" if path.name == RUN_ADAPTER and path.parent.name else path.name


def parents(adapter: fmt.Adapter) -> list[dict[str, Any]]:
    """The adapters this one was trained on top of, root first (``[]`` for a root, and for every older file)."""
    value = adapter.meta.get("parents", [])
    where = adapter.path or "adapter"
    if not isinstance(value, list) or not all(isinstance(p, dict) and _is_id(p.get("id")) for p in value):
        raise AdapterFormatError(f"{where}: 'parents' must be a list of objects with a 64-hex 'id'; "
                                 "the file is corrupt or was edited")
    return value


def layers(adapter: fmt.Adapter) -> list[dict[str, Any]] | None:
    """The ordered layers of a stack file (``lrsurgery stack``), or None for a plain adapter."""
    value = adapter.meta.get("layers")
    if value is None:
        return None
    if not isinstance(value, list) or not value or not all(isinstance(x, dict) and _is_id(x.get("id")) for x in value):
        raise AdapterFormatError(f"{adapter.path or 'adapter'}: 'layers' must be a non-empty list of objects "
                                 "with a 64-hex 'id'; the file is corrupt or was edited")
    return value


def chain_entries(adapter: fmt.Adapter) -> list[dict[str, Any]]:
    """What folding ``adapter`` adds to a chain: its layers for a stack file, else the adapter itself."""
    stacked = layers(adapter)
    if stacked is not None:
        return [{k: x[k] for k in ("id", "name", "method") if k in x} for x in stacked]
    return [{"id": adapter_id(adapter), "name": adapter_name(adapter), "method": adapter.meta.get("method", "lora")}]


def of(model: nn.Module) -> Lineage:
    """The model's lineage (empty when nothing was folded into it)."""
    return getattr(model, "lrsurgery_lineage", None) or Lineage()


def describe(entries: list[dict[str, Any]]) -> str:
    return ", ".join(f"{e.get('name', '?')} (id {short_id(e['id'])})" for e in entries)


def lineage_error(adapter: fmt.Adapter, chain: list[dict[str, Any]], where: str = "the model") -> str | None:
    """Why ``adapter`` cannot go on top of ``chain`` (None when its parents are exactly the chain, in order).

    ``where`` names what holds the chain in the message: "the model", "this stack".
    """
    want = parents(adapter)
    want_ids, have_ids = [p["id"] for p in want], [c["id"] for c in chain]
    if want_ids == have_ids:
        return None
    name = adapter_name(adapter)
    head = (f"{name} (id {short_id(adapter_id(adapter))}) was trained on top of {describe(want)}" if want else
            f"{name} (id {short_id(adapter_id(adapter))}) was trained on the plain base, with no parents")
    missing = [p for p in want if p["id"] not in have_ids]
    extra = [c for c in chain if c["id"] not in want_ids]
    problems = []
    if missing:
        problems.append(f"missing from {where}: {describe(missing)}")
    if extra:
        what = "a parent" if len(extra) == 1 else "parents"
        problems.append(f"{where} also holds {describe(extra)}, not {what} of it")
    if not missing and not extra:
        problems.append(f"{where} holds its parents in another order: {describe(chain)}")
    fix = ("apply exactly its parents, in this order, before it: lrsurgery stack MODEL "
           f"{' '.join(p.get('name', short_id(p['id'])) for p in want)} {name} -o OUT") if want else \
        f"apply it to the plain base: lrsurgery stack MODEL {name} -o OUT (or lrsurgery merge)"
    return f"{head}; {'; '.join(problems)}; {fix}"


def check(adapter: fmt.Adapter, chain: list[dict[str, Any]], *, force: bool = False, where: str = "the model") -> None:
    """Refuse ``adapter`` unless its parents are exactly ``chain``; with ``force``, warn and go on.

    Every path that applies or merges an adapter calls this (a plain base has the chain ``[]``).
    """
    problem = lineage_error(adapter, chain, where)
    if problem and not force:
        raise BaseMismatchError(problem + "; or pass --force to go on anyway")
    if problem:
        warnings.warn(problem + " — going on because of --force", stacklevel=3)


def record_fold(model: nn.Module, adapter: fmt.Adapter) -> Lineage:
    """Update the model's lineage for ``adapter`` being folded into its weights (call before folding)."""
    lin = of(model)
    for name, entry in adapter.modules.items():
        if entry["kind"] in ("lora", "delta"):  # keep the oldest record: the original weight, even after several folds
            lin.records.setdefault(name, dict(entry["base_tensors"]["weight"]))
    for name, entry in adapter.modules.items():
        if entry["kind"] == "full":  # a replaced weight is the new base of whatever comes next
            for p in entry["tensors"]:
                key = fmt.tensor_key(name, p)
                if key == "weight" or key.endswith(".weight"):
                    lin.records.pop(key[: -len("weight")].rstrip("."), None)
    lin.chain.extend(chain_entries(adapter))
    model.lrsurgery_lineage = lin
    return lin


def pin_records(model: nn.Module) -> None:
    """Give LoRA layers on folded weights the original weight's record (saved in place of the live hash)."""
    records = of(model).records
    for name, layer in lora_modules(model).items():
        if layer.base_weight_record is None and name in records:
            layer.base_weight_record = records[name]


def _is_id(x: Any) -> bool:
    return isinstance(x, str) and len(x) == 64 and all(c in "0123456789abcdef" for c in x)
