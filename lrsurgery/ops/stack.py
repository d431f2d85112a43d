"""Stacks: adapters trained on top of each other, applied in order, as one adapter file or merged.

A child adapter is trained on W + ΔW_parents (``inject --on``), but it records the hashes of the
original W and the ids of its parents (``lrsurgery.lineage``). Every update is additive on the
original weight, so applying a stack A_1 … A_n in order gives

    W_n = W + ΔW_1 + … + ΔW_n        (LoRA: ΔW_k = s_k B_k A_k; dense "delta" entries likewise)

and one adapter holds the whole stack exactly: per module, the factors are concatenated along
the rank with each scaling folded into B,

    A = [A_1; A_2; …]   B = [s_1 B_1 | s_2 B_2 | …]   scaling 1, rank Σ r_k:   B A = Σ ΔW_k

A ``full`` entry replaces its tensors, so it discards the updates stacked below it on them, and
an update stacked on a replaced tensor is added to that tensor (the result stays a ``full`` entry).
Order is checked, never guessed: adapter k's parents must be exactly the ids of the adapters
before it (a stack file counts as its layers), else the stack is refused naming what is missing.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from lrsurgery import __version__
from lrsurgery import format as fmt
from lrsurgery import lineage
from lrsurgery.adapter import apply_adapter, check_base, load_adapter
from lrsurgery.errors import BaseMismatchError, LrsurgeryError, OutputExistsError, ShapeMismatchError
from lrsurgery.models import load_model, save_model
from lrsurgery.surgery import eject, lora_modules, velora_modules


# ---------------------------------------------------------------------------------------------------------------
# Folding adapters into a model, in order (what `inject --on` and `open_run` do before injecting a child)

@torch.no_grad()
def fold_adapter(model: nn.Module, adapter: fmt.Adapter | str | os.PathLike, *, force: bool = False) -> fmt.Adapter:
    """Apply ``adapter`` (checking its base and parents), fold it into the weights, and extend the model's lineage."""
    if not isinstance(adapter, fmt.Adapter):
        adapter = load_adapter(adapter)
    if lora_modules(model) or velora_modules(model):
        raise LrsurgeryError("the model has live adapter layers; merge or eject them before folding another "
                             "adapter into it")
    apply_adapter(model, adapter, force=force)
    lineage.record_fold(model, adapter)
    if lora_modules(model):
        eject(model, merge=True)
    if hasattr(model, "lrsurgery_adapter"):  # the folded model is a plain (stacked) base again
        del model.lrsurgery_adapter
    for p in model.parameters():
        p.requires_grad_(False)
    return adapter


def apply_stack(model: nn.Module, adapters: Sequence[fmt.Adapter | str | os.PathLike], *,
                force: bool = False) -> list[fmt.Adapter]:
    """Fold each adapter into ``model`` in order (each checked against the ones before it)."""
    return [fold_adapter(model, a, force=force) for a in adapters]


# ---------------------------------------------------------------------------------------------------------------
# Composing adapter data into one adapter (no model needed)

def check_order(adapters: Sequence[fmt.Adapter], *, force: bool = False) -> list[dict[str, Any]]:
    """Refuse unless each adapter's parents are exactly the adapters before it; returns the stack's layers."""
    chain: list[dict[str, Any]] = []
    for adapter in adapters:
        lineage.check(adapter, chain, force=force, where="this stack")
        chain += lineage.chain_entries(adapter)
    return chain


@dataclass
class _Part:
    """One adapter's update of one base weight: factors (B already scaled) or a dense ΔW, and Δb."""

    layers: list[dict[str, int]]           # [{"layer": index in the stack, "rank": r}] (dense: rank 0)
    a: torch.Tensor | None = None          # [r, in]
    b: torch.Tensor | None = None          # [out, r], times the scaling
    dense: torch.Tensor | None = None      # [out, in]
    bias: torch.Tensor | None = None       # [out]
    entry: dict[str, Any] = field(default_factory=dict)
    raw: dict[str, torch.Tensor] = field(default_factory=dict)  # the file tensors, to keep a lone LoRA as is

    def delta(self) -> torch.Tensor:
        """ΔW of this part in fp32, [out, in]."""
        return self.dense.float() if self.dense is not None else self.b.float() @ self.a.float()


def compose(adapters: Sequence[fmt.Adapter | str | os.PathLike], *, force: bool = False) -> fmt.Adapter:
    """One adapter equal to applying ``adapters`` in order (checked); ranks add, see the module docstring."""
    adapters = [a if isinstance(a, fmt.Adapter) else load_adapter(a) for a in adapters]
    if not adapters:
        raise LrsurgeryError("a stack needs at least one adapter")
    layers = check_order(adapters, force=force)
    updates: dict[str, list[_Part]] = {}
    full: dict[str, tuple[str, str, torch.Tensor]] = {}  # tensor key -> (module, parameter, tensor)
    offset = 0
    for adapter in adapters:
        label = lineage.adapter_name(adapter)
        for name, entry in adapter.modules.items():
            if entry["kind"] == "full":
                _replace(name, entry, adapter, label, updates, full)
            elif entry["kind"] in ("lora", "delta"):
                part = _part(name, entry, adapter, offset)
                weight_key = fmt.tensor_key(name, "weight")
                if weight_key in full:
                    _add_to_full(name, part, entry, label, full, force)
                else:
                    _check_same_weight(name, entry, updates.get(name), label, force)
                    updates.setdefault(name, []).append(part)
            else:
                raise LrsurgeryError(f"{label}: module {name!r} has kind {entry['kind']!r}, which stacks cannot "
                                     "compose yet; merge it into the base first")
        offset += len(lineage.chain_entries(adapter))
    modules, tensors = _full_entries(full)
    for name, parts in sorted(updates.items()):
        entry, own = _update_entry(name, parts)
        modules[name] = entry
        tensors.update(own)
    kinds = {e["kind"] for e in modules.values()}
    meta = {"base": adapters[0].meta["base"], "method": "full" if kinds == {"full"} else "lora",
            "config": {"method": "stack"}, "modules": dict(sorted(modules.items())), "layers": layers,
            "provenance": {"tool": f"lrsurgery {__version__}", "method": "stack",
                           "from": [lineage.adapter_name(a) for a in adapters]}}
    for layer, ranks in zip(layers, _layer_ranks(adapters)):
        layer.setdefault("ranks", ranks)
    fmt.validate(tensors, meta, where="the stacked adapter")
    return fmt.Adapter(tensors=tensors, meta=meta)


def _part(name: str, entry: dict[str, Any], adapter: fmt.Adapter, offset: int) -> _Part:
    t = adapter.tensors
    bias = t.get(f"{name}.lora_bias") if entry.get("bias") else None
    if entry["kind"] == "delta":
        d = t[f"{name}.delta"]
        return _Part([{"layer": offset, "rank": 0}], dense=d.T if entry["fan_in_fan_out"] else d, bias=bias,
                     entry=entry)
    a, b = t[f"{name}.lora_A"], t[f"{name}.lora_B"]
    within = entry.get("stacked") or [{"layer": 0, "rank": entry["rank"]}]  # a stack file's own layers
    return _Part([{"layer": offset + x["layer"], "rank": x["rank"]} for x in within], a=a,
                 b=b.float() * entry["scaling"], bias=bias, entry=entry,
                 raw={k: v for k, v in ((f"{name}.lora_A", a), (f"{name}.lora_B", b),
                                        (f"{name}.lora_bias", bias)) if v is not None})


def _replace(name: str, entry: dict[str, Any], adapter: fmt.Adapter, label: str,
             updates: dict[str, list[_Part]], full: dict[str, tuple[str, str, torch.Tensor]]) -> None:
    """A full entry: its tensors replace whatever the stack held for them, updates included."""
    keys = {fmt.tensor_key(name, p): p for p in entry["tensors"]}
    for key, p in keys.items():
        full[key] = (name, p, adapter.tensors[key])
    for module in list(updates):
        weight, bias = fmt.tensor_key(module, "weight"), fmt.tensor_key(module, "bias")
        if weight in keys:
            if bias not in keys and any(part.bias is not None for part in updates[module]):
                raise LrsurgeryError(f"{label} replaces {weight} but not {bias}, which an earlier adapter changed by "
                                     "a Δb: one adapter file cannot express that; merge the stack instead (--merge)")
            del updates[module]
        elif bias in keys:
            for part in updates[module]:
                part.bias = None


def _add_to_full(name: str, part: _Part, entry: dict[str, Any], label: str,
                 full: dict[str, tuple[str, str, torch.Tensor]], force: bool) -> None:
    """An update on a tensor an earlier adapter replaced: the result is that tensor + ΔW (a full tensor)."""
    weight_key = fmt.tensor_key(name, "weight")
    owner, param, w = full[weight_key]
    rec = entry["base_tensors"]["weight"]
    if list(w.shape) != rec["shape"]:
        raise ShapeMismatchError(f"{label}: {weight_key} has shape {list(w.shape)} in the stack but the adapter "
                                 f"expects {rec['shape']}")
    if fmt.tensor_sha256(w.to(fmt.dtype_from_name(rec["dtype"]))) != rec["sha256"]:
        msg = (f"{label} was trained on other values of {weight_key} than the ones the adapters below it in the "
               "stack set")
        if not force:
            raise BaseMismatchError(msg + "; check the order, or pass --force")
        warnings.warn(msg + " — stacking anyway because of --force", stacklevel=3)
    delta = part.delta()
    full[weight_key] = (owner, param, (w.float() + (delta.T if entry["fan_in_fan_out"] else delta)).to(w.dtype))
    if part.bias is not None:
        bias_key = fmt.tensor_key(name, "bias")
        if bias_key not in full:
            raise LrsurgeryError(f"{label} changes the bias of {name}, whose weight but not bias an earlier adapter "
                                 "replaced: one adapter file cannot express that; merge the stack instead (--merge)")
        o, p, b = full[bias_key]
        full[bias_key] = (o, p, (b.float() + part.bias.float()).to(b.dtype))


def _check_same_weight(name: str, entry: dict[str, Any], parts: list[_Part] | None, label: str, force: bool) -> None:
    """Updates of one module must all pin the same original weight (and agree on its layout)."""
    if not parts:
        return
    first = parts[0].entry
    if any(first[k] != entry[k] for k in ("in_features", "out_features", "fan_in_fan_out")):
        raise ShapeMismatchError(f"{label}: module {name} is {entry['out_features']}×{entry['in_features']} here but "
                                 f"{first['out_features']}×{first['in_features']} in an adapter below it")
    if first["base_tensors"]["weight"]["sha256"] != entry["base_tensors"]["weight"]["sha256"]:
        msg = f"{label} changes {name} of other base weights than the adapter below it that also changes it"
        if not force:
            raise BaseMismatchError(msg + "; were they made on the same base? (--force stacks anyway)")
        warnings.warn(msg + " — stacking anyway because of --force", stacklevel=3)


def _full_entries(full: dict[str, tuple[str, str, torch.Tensor]]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    modules: dict[str, Any] = {}
    tensors: dict[str, torch.Tensor] = {}
    for key, (module, param, t) in full.items():
        entry = modules.setdefault(module, {"kind": "full", "tensors": {}})
        entry["tensors"][param] = {"shape": list(t.shape), "dtype": fmt.dtype_name(t.dtype)}
        tensors[key] = t
    return modules, tensors


def _update_entry(name: str, parts: list[_Part]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The output entry of one updated weight: a lone LoRA as it was, LoRAs concatenated, or a dense sum."""
    first = parts[0].entry
    biases = [p.bias for p in parts if p.bias is not None]
    stacked = [x for p in parts for x in p.layers]
    common = {k: first[k] for k in ("in_features", "out_features", "fan_in_fan_out")}
    common["base_tensors"] = {"weight": first["base_tensors"]["weight"]}
    if any(p.dense is not None for p in parts):
        if biases:
            raise LrsurgeryError(f"{name}: a dense update and a Δb cannot share one entry; merge the stack instead")
        delta = sum(p.delta() for p in parts)
        entry = {"kind": "delta", **common, "dtype": "float32"}
        return entry, {f"{name}.delta": (delta.T if first["fan_in_fan_out"] else delta).contiguous()}
    if len(parts) == 1:  # one adapter changes this weight: keep its entry and tensors exactly
        entry = {k: v for k, v in first.items() if k not in ("velora", "stacked")}
        return {**entry, "stacked": stacked}, dict(parts[0].raw)
    a = torch.cat([p.a.float() for p in parts])
    b = torch.cat([p.b.float() for p in parts], dim=1)
    r = a.shape[0]
    entry = {"kind": "lora", "rank": r, "alpha": float(r), "rslora": False, "scaling": 1.0, **common,
             "dtype": "float32", "stacked": stacked}
    own = {f"{name}.lora_A": a.contiguous(), f"{name}.lora_B": b.contiguous()}
    if biases:
        entry["bias"] = True
        own[f"{name}.lora_bias"] = sum(x.float() for x in biases)
    return entry, own


def _layer_ranks(adapters: Sequence[fmt.Adapter]) -> list[list[int]]:
    """Per layer of the stack, the distinct LoRA ranks it adds (for `show` and the stack's report)."""
    out = []
    for adapter in adapters:
        stacked = lineage.layers(adapter)
        if stacked is not None:
            out += [list(x.get("ranks", [])) for x in stacked]
        else:
            out.append(sorted({e["rank"] for e in adapter.modules.values() if e["kind"] == "lora"}))
    return out


# ---------------------------------------------------------------------------------------------------------------
# `lrsurgery stack`

@dataclass
class StackResult:
    """What ``stack_files`` wrote: the path, whether it is a merged model, and the stack's layers."""

    path: Path
    merged: bool
    adapter: fmt.Adapter

    def as_dict(self) -> dict[str, Any]:
        mods = self.adapter.modules
        return {"out": str(self.path), "merged": self.merged, "layers": self.adapter.meta["layers"],
                "modules": {"lora": sum(e["kind"] == "lora" for e in mods.values()),
                            "delta": sum(e["kind"] == "delta" for e in mods.values()),
                            "full": sum(e["kind"] == "full" for e in mods.values())},
                "parameters": self.adapter.num_parameters()}


def base_load_kwargs(model_ref: str, base: dict[str, Any], *, weights: str | None = None) -> dict[str, Any]:
    """``load_model`` arguments that rebuild the base an adapter recorded, when ``model_ref`` names it."""
    local = Path(model_ref).is_dir() and str(Path(model_ref).resolve()) == base.get("ref")
    same = base.get("ref") == model_ref or local
    return {"weights": weights or (base.get("weights") if same else None),
            "init": "random" if same and base.get("source") == "random-init" else "pretrained",
            "num_classes": base.get("num_classes"), "seed": base.get("init_seed") or 0}


def stack_files(model_ref: str, inputs: Sequence[str | os.PathLike], out: str | os.PathLike, *, merge: bool = False,
                weights: str | None = None, force: bool = False) -> StackResult:
    """``lrsurgery stack``: check the order, compose, check against the base; write the adapter or the merged model.

    ``model_ref`` may be a plain ``.safetensors`` state dict (merged tensor by tensor, like ``merge``).
    ``force`` overwrites ``out`` and accepts base-hash and lineage mismatches with a warning.
    """
    from lrsurgery.ops.merge import merge_into_model, merge_state_dict
    out = Path(out)
    fmt.check_output_spares(out, model_ref, *[i for i in inputs if not str(i).startswith("hf:")])
    if out.exists() and not force:
        raise OutputExistsError(f"{out} exists; pass --force to overwrite it")
    composite = compose([load_adapter(p) for p in inputs], force=force)
    ref = Path(model_ref)
    if ref.suffix == ".safetensors" and ref.is_file():
        from safetensors.torch import load_file, save_file
        if merge and out.suffix != ".safetensors":
            raise LrsurgeryError(f"the base {ref.name} is a plain safetensors file, so the merged model is one too: "
                                 f"give -o a FILE.safetensors (got {out})")
        merged = merge_state_dict(load_file(str(ref)), composite, force=force)  # also the base check
        if merge:
            fmt.atomic_write(out, lambda tmp: save_file({k: v.contiguous() for k, v in merged.items()}, str(tmp)))
            return StackResult(out, True, composite)
        return StackResult(fmt.write(out, composite, force=force), False, composite)
    model = load_model(model_ref, **base_load_kwargs(model_ref, composite.meta["base"], weights=weights))
    if merge:
        merge_into_model(model, composite, force=force)
        return StackResult(save_model(model, out, force=force), True, composite)
    check_base(model, composite, force=force)
    return StackResult(fmt.write(out, composite, force=force), False, composite)
