"""Between models and adapter files: capture a model's adapters as data, and apply adapter data to a model.

Applying checks the adapter against the model's actual base weights (SHA-256 of each weight the
adapter modifies): an adapter made for another base is refused instead of silently producing
wrong outputs. ``force=True`` applies it anyway, with a warning.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lrsurgery import __version__
from lrsurgery import format as fmt
from lrsurgery import lineage
from lrsurgery.errors import BaseMismatchError, LrsurgeryError, ShapeMismatchError
from lrsurgery.layers.lora import LoRALinear, is_linear, linear_shape
from lrsurgery.layers.lte import HeadReplicas, LTELinear
from lrsurgery.layers.velora import VeLoRAProjection
from lrsurgery.models import base_info
from lrsurgery.surgery import AdapterConfig, adapter_config, lora_modules, lte_layers, velora_modules, wrap_module


def lora_entry(layer: LoRALinear) -> dict[str, Any]:
    """The metadata of one LoRA module, including the hash of the base weight it modifies."""
    entry = {"kind": "lora", "rank": layer.rank, "alpha": layer.alpha, "rslora": layer.rslora,
             "scaling": layer.scaling, "in_features": layer.in_features, "out_features": layer.out_features,
             "fan_in_fan_out": layer.fan_in_fan_out, "dtype": fmt.dtype_name(layer.lora_A.dtype),
             "base_tensors": {"weight": layer.base_weight_record or fmt.tensor_record(layer.weight)}}
    if layer.lora_bias is not None:
        entry["bias"] = True
    if layer.folded_A is not None:  # ReLoRA: the total change, scaling folded into B
        folded = layer.folded_A.shape[0]
        entry.update(rank=folded + layer.rank, alpha=float(folded + layer.rank), rslora=False, scaling=1.0,
                     folded_rank=folded)
    return entry


def lora_tensors(name: str, layer: LoRALinear) -> dict[str, torch.Tensor]:
    """The file tensors of one LoRA module (folded ReLoRA factors first; Δb when present)."""
    a, b = layer.total_factors() if layer.folded_A is not None else (layer.lora_A.detach(), layer.lora_B.detach())
    tensors = {f"{name}.lora_A": a, f"{name}.lora_B": b}
    if layer.lora_bias is not None:
        tensors[f"{name}.lora_bias"] = layer.lora_bias.detach()
    return tensors


def adapter_from_model(model: nn.Module, provenance: dict[str, Any] | None = None) -> fmt.Adapter:
    """Capture the model's LoRA factors and fully trained modules as an in-memory adapter."""
    layers = lora_modules(model)
    config = adapter_config(model) or AdapterConfig(targets=list(layers))
    if not layers and not config.train and config.method not in ("velora", "lte"):
        raise LrsurgeryError("the model has no adapters: inject or apply one first")
    tensors: dict[str, torch.Tensor] = {}
    modules: dict[str, dict[str, Any]] = {}
    folded = lineage.of(model)  # adapters folded into the base: record the original weights and the parents
    for name, layer in layers.items():
        if layer.merged:
            raise LrsurgeryError(f"{name} is merged into its base; unmerge before saving the adapter")
        modules[name] = lora_entry(layer)
        tensors.update(lora_tensors(name, layer))
    for name, layer in lte_layers(model).items():
        if isinstance(layer, LTELinear):
            modules[name], own = lte_entry(name, layer)
            tensors.update(own)
    for name in dict.fromkeys([*config.train, *velora_modules(model)]):  # VeLoRA layers train in full
        params = trained_tensors(model.get_submodule(name))
        if not params:
            continue
        modules[name] = {"kind": "full", "tensors": {p: {"shape": list(t.shape), "dtype": fmt.dtype_name(t.dtype)}
                                                     for p, t in params.items()}}
        tensors.update({fmt.tensor_key(name, p): t for p, t in params.items()})
    for name, projection in velora_projections(model).items():  # v: needed to continue training
        modules[name]["velora"] = {"groups": projection.groups, "group_dim": projection.group_dim,
                                   "init": projection.init, "scale": projection.scale, "pad": projection.pad}
        tensors[fmt.tensor_key(name, "velora_v")] = projection.v.detach()
    info = base_info(model)
    meta = {"base": info.as_dict() if info else {"ref": None},
            "method": config.method,
            "config": {k: v for k, v in config.as_dict().items() if k not in ("targets", "train")},
            "modules": modules,
            "provenance": {"tool": f"lrsurgery {__version__}", **(provenance or {})}}
    for name, entry in modules.items():  # updates of folded weights pin the original weight, not the live one
        if entry["kind"] in ("lora", "delta") and name in folded.records:
            entry["base_tensors"] = {"weight": folded.records[name]}
    if folded.chain:
        meta["parents"] = [dict(p) for p in folded.chain]
    return fmt.Adapter(tensors=tensors, meta=meta)


def lte_entry(name: str, layer: LTELinear) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """An LTE layer as a dense ``delta`` entry: W − W_initial plus the pending change, and its heads.

    Saving does what a merge would (without changing the layer): the heads are stored as merged,
    so a model rebuilt from the file trains on from exactly this point.
    """
    if layer.total_heads != layer.heads:
        raise LrsurgeryError(f"{name}: the LTE heads are sharded over processes; gather them before saving")
    entry = {"kind": "delta", "in_features": layer.in_features, "out_features": layer.out_features,
             "fan_in_fan_out": layer.fan_in_fan_out, "dtype": fmt.dtype_name(layer.weight.dtype),
             "base_tensors": {"weight": fmt.tensor_record(layer.initial_weight)},
             "lte": {"heads": layer.heads, "rank": layer.rank, "alpha": layer.alpha, "mode": layer.mode}}
    b = layer.lora_B.detach() if layer.mode == "parallel" else torch.zeros_like(layer.lora_B)  # multihead: B ← 0
    return entry, {f"{name}.delta": layer.total_change(), f"{name}.lte_A": layer.lora_A.detach(), f"{name}.lte_B": b}


def trained_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """A fully trained module's parameters; LTE's per-head replicas as their mean (what a merge makes)."""
    if isinstance(module, HeadReplicas):
        return module.mean_parameters()
    return {p: t.detach() for p, t in module.named_parameters()}


def velora_projections(model: nn.Module) -> dict[str, VeLoRAProjection]:
    """The VeLoRA projection of each VeLoRA layer, by the layer's module name."""
    return {n: m.velora for n, m in model.named_modules() if isinstance(getattr(m, "velora", None), VeLoRAProjection)}


def save_adapter(model: nn.Module, path: str | os.PathLike, *, force: bool = False,
                 provenance: dict[str, Any] | None = None) -> Path:
    """Write the model's adapters as an adapter file (format v1), atomically."""
    return fmt.write(path, adapter_from_model(model, provenance), force=force)


def load_adapter(path: str | os.PathLike) -> fmt.Adapter:
    """Read and validate an adapter file: a path, or ``hf:ORG/NAME[@REV][:FILE]`` (hub cache first).

    A hub adapter's ``source`` attribute is the reference pinned to the commit that was read.
    """
    if isinstance(path, str) and path.startswith("hf:"):
        from lrsurgery.hub import resolve_file  # lazily: only hub references need huggingface_hub
        hub_file = resolve_file(path)
        adapter = fmt.read(hub_file.path)
        adapter.source = hub_file.pinned
        return adapter
    return fmt.read(path)


def check_base(model: nn.Module, adapter: fmt.Adapter, *, force: bool = False) -> list[str]:
    """Compare every base tensor the adapter modifies with the model's; refuse on mismatch unless forced.

    Returns the names of mismatching modules (empty when the base is the one the adapter was made on).
    An adapter trained on top of others must find exactly its parents folded into the model, in order.
    """
    folded = lineage.of(model)
    lineage.check(adapter, folded.chain, force=force)
    modules = dict(model.named_modules())
    mismatched: list[str] = []
    for name, entry in adapter.modules.items():
        if name not in modules:
            raise BaseMismatchError(f"adapter module {name!r} does not exist in this model; the adapter was made "
                                    f"for {adapter.meta['base'].get('ref')!r}")
        module = modules[name]
        if isinstance(module, HeadReplicas):
            module = module.replicas[0]
        if entry["kind"] in ("lora", "delta"):
            if not (is_linear(module) or isinstance(module, (LoRALinear, LTELinear))):
                raise BaseMismatchError(f"{name} is a {type(module).__name__} here, but the adapter expects a linear layer")
            out_f, in_f = (module.out_features, module.in_features) if isinstance(module, (LoRALinear, LTELinear)) \
                else linear_shape(module)[:2]
            if (out_f, in_f) != (entry["out_features"], entry["in_features"]):
                raise ShapeMismatchError(f"{name}: the model's layer is {out_f}×{in_f} (out×in) but the adapter "
                                         f"expects {entry['out_features']}×{entry['in_features']}; wrong base model?")
            current_rank = entry.get("rank", 0) - entry.get("folded_rank", 0)
            if entry["kind"] == "delta" and isinstance(module, LoRALinear):
                raise BaseMismatchError(f"{name} has LoRA in the model; a dense (LTE) change applies to a plain "
                                        "or LTE layer: eject or merge the LoRA first")
            if isinstance(module, LoRALinear) and module.rank not in (entry["rank"], current_rank):
                raise ShapeMismatchError(f"{name} already has LoRA of rank {module.rank} in the model but the "
                                         f"adapter has rank {entry['rank']}; eject or merge it first")
            rec = entry["base_tensors"]["weight"]
            pinned = module.base_weight_record if isinstance(module, LoRALinear) else None
            pinned = pinned or folded.records.get(name)
            if pinned is not None:
                # the live weight holds folded updates (ReLoRA, parent adapters): compare the original's record
                if pinned["sha256"] != rec["sha256"]:
                    mismatched.append(name)
                continue
            w = module.initial_weight if getattr(module, "initial_weight", None) is not None else module.weight
            if list(w.shape) != rec["shape"] or fmt.tensor_sha256(w.to(fmt.dtype_from_name(rec["dtype"]))) != rec["sha256"]:
                mismatched.append(name)
        else:
            params = dict(module.named_parameters())
            for p, rec in entry["tensors"].items():
                if p not in params:
                    raise BaseMismatchError(f"{name} has no parameter {p!r} in this model; wrong base model?")
                if list(params[p].shape) != rec["shape"]:
                    hint = adapter.meta["base"].get("num_classes")
                    raise ShapeMismatchError(
                        f"{name}.{p} has shape {list(params[p].shape)} in this model but {rec['shape']} in the adapter"
                        + (f"; load the base with num_classes={hint}" if hint else "; wrong base model?"))
    if mismatched:
        msg = (f"adapter was made for other base weights: {len(mismatched)} of "
               f"{sum(e['kind'] in ('lora', 'delta') for e in adapter.modules.values())} modified weights differ "
               f"(e.g. {mismatched[0]}); it expects base {adapter.meta['base'].get('ref')!r}")
        if not force:
            raise BaseMismatchError(msg + ". Load the right base, or pass --force to apply it anyway")
        warnings.warn(msg + " — applying anyway because of --force", stacklevel=2)
    return mismatched


@torch.no_grad()
def _apply_delta(module: nn.Module, name: str, entry: dict[str, Any], tensors: dict[str, torch.Tensor],
                 trainable: bool) -> None:
    """W ← W + ΔW (in ≥ fp32, cast back, as a merge does); an LTE layer also gets its heads back."""
    delta = tensors[f"{name}.delta"]
    w = module.weight
    dtype = torch.promote_types(torch.promote_types(w.dtype, delta.dtype), torch.float32)
    w.copy_((w.to(dtype) + delta.to(w.device, dtype)).to(w.dtype))
    if not isinstance(module, LTELinear):
        return
    lte = entry.get("lte")
    if lte and (lte["heads"], lte["rank"]) == (module.heads, module.rank):
        module.lora_A.copy_(tensors[f"{name}.lte_A"])
        module.lora_B.copy_(tensors[f"{name}.lte_B"])
        if module.prev_A is not None:  # stored as merged: the snapshots equal the heads
            module.prev_A.copy_(module.lora_A)
            module.prev_B.copy_(module.lora_B)
    elif lte:
        raise ShapeMismatchError(f"{name}: the adapter has {lte['heads']} LTE heads of rank {lte['rank']} but the "
                                 f"model's layer has {module.heads} of rank {module.rank}; inject with the same "
                                 "--heads and --rank")
    for p in (module.lora_A, module.lora_B):
        p.requires_grad_(trainable)


@torch.no_grad()
def apply_adapter(model: nn.Module, adapter: fmt.Adapter | str | os.PathLike, *, force: bool = False,
                  trainable: bool = False) -> fmt.Adapter:
    """Validate ``adapter`` against ``model``'s base weights, then wrap and load its modules in place.

    Modules already wrapped with LoRA of the same rank are loaded into; ``trainable`` leaves the
    adapter factors and full modules trainable (to continue training), otherwise all is frozen.
    """
    if not isinstance(adapter, fmt.Adapter):
        adapter = load_adapter(adapter)
    check_base(model, adapter, force=force)
    for p in model.parameters():  # only what the adapter lists may train
        p.requires_grad_(False)
    existing = lora_modules(model)
    records = lineage.of(model).records
    full: list[str] = []
    for name, entry in adapter.modules.items():
        if entry["kind"] == "lora":
            layer = existing.get(name)
            if layer is None:
                layer = wrap_module(model, name, entry["rank"], entry["alpha"], entry.get("rslora", False))
            if layer.base_weight_record is None and name in records:  # the weight holds folded parents
                layer.base_weight_record = records[name]
            a, b = adapter.tensors[f"{name}.lora_A"], adapter.tensors[f"{name}.lora_B"]
            folded = entry.get("folded_rank", 0)
            if folded and layer.rank == entry["rank"] - folded:
                # A ReLoRA adapter onto a layer of the training rank: fold the history into W, keep
                # the last `rank` components as the live adapter (B was stored pre-multiplied by s).
                layer.base_weight_record = entry["base_tensors"]["weight"]
                layer.fold(a[:folded], b[:, :folded])
                a, b = a[folded:], b[:, folded:] / layer.scaling
            else:
                layer.alpha, layer.rslora, layer.scaling = float(entry["alpha"]), entry.get("rslora", False), entry["scaling"]
            for part, value in (("lora_A", a), ("lora_B", b)):
                param = getattr(layer, part)
                param.copy_(value.to(param.dtype))
                param.requires_grad_(trainable)
            if entry.get("bias"):
                layer.add_bias_delta(adapter.tensors[f"{name}.lora_bias"]).requires_grad_(trainable)
        elif entry["kind"] == "delta":
            _apply_delta(model.get_submodule(name), name, entry, adapter.tensors, trainable)
        else:
            full.append(name)
            module = model.get_submodule(name)
            for copy in (module.replicas if isinstance(module, HeadReplicas) else [module]):
                params = dict(copy.named_parameters())
                for p in entry["tensors"]:
                    params[p].copy_(adapter.tensors[fmt.tensor_key(name, p)])
                    params[p].requires_grad_(trainable)
        if entry.get("velora") and isinstance(getattr(model.get_submodule(name), "velora", None), VeLoRAProjection):
            model.get_submodule(name).velora.v.copy_(adapter.tensors[fmt.tensor_key(name, "velora_v")])
    if adapter_config(model) is None:  # keep the config of an injection this adapter was loaded into
        cfg = adapter.meta.get("config", {})
        model.lrsurgery_adapter = AdapterConfig(
            method=adapter.meta.get("method", "lora"), rank=cfg.get("rank") or 0, alpha=cfg.get("alpha") or 0.0,
            rslora=cfg.get("rslora", False), dropout=cfg.get("dropout", 0.0),
            targets=list(lora_modules(model)), train=full)
    else:
        config = adapter_config(model)
        config.train = list(dict.fromkeys([*config.train, *full]))
    return adapter
