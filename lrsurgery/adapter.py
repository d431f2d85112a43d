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
from lrsurgery.errors import BaseMismatchError, LrsurgeryError, ShapeMismatchError
from lrsurgery.layers.lora import LoRALinear, is_linear, linear_shape
from lrsurgery.models import base_info
from lrsurgery.surgery import AdapterConfig, adapter_config, lora_modules, velora_modules, wrap_module


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
    if not layers and not config.train and config.method != "velora":
        raise LrsurgeryError("the model has no adapters: inject or apply one first")
    tensors: dict[str, torch.Tensor] = {}
    modules: dict[str, dict[str, Any]] = {}
    for name, layer in layers.items():
        if layer.merged:
            raise LrsurgeryError(f"{name} is merged into its base; unmerge before saving the adapter")
        modules[name] = lora_entry(layer)
        tensors.update(lora_tensors(name, layer))
    for name in dict.fromkeys([*config.train, *velora_modules(model)]):  # VeLoRA layers train in full
        params = dict(model.get_submodule(name).named_parameters())
        if not params:
            continue
        modules[name] = {"kind": "full", "tensors": {p: {"shape": list(t.shape), "dtype": fmt.dtype_name(t.dtype)}
                                                     for p, t in params.items()}}
        tensors.update({fmt.tensor_key(name, p): t.detach() for p, t in params.items()})
    info = base_info(model)
    meta = {"base": info.as_dict() if info else {"ref": None},
            "method": config.method,
            "config": {k: v for k, v in config.as_dict().items() if k not in ("targets", "train")},
            "modules": modules,
            "provenance": {"tool": f"lrsurgery {__version__}", **(provenance or {})}}
    return fmt.Adapter(tensors=tensors, meta=meta)


def save_adapter(model: nn.Module, path: str | os.PathLike, *, force: bool = False,
                 provenance: dict[str, Any] | None = None) -> Path:
    """Write the model's adapters as an adapter file (format v1), atomically."""
    return fmt.write(path, adapter_from_model(model, provenance), force=force)


def load_adapter(path: str | os.PathLike) -> fmt.Adapter:
    """Read and validate an adapter file."""
    return fmt.read(path)


def check_base(model: nn.Module, adapter: fmt.Adapter, *, force: bool = False) -> list[str]:
    """Compare every base tensor the adapter modifies with the model's; refuse on mismatch unless forced.

    Returns the names of mismatching modules (empty when the base is the one the adapter was made on).
    """
    modules = dict(model.named_modules())
    mismatched: list[str] = []
    for name, entry in adapter.modules.items():
        if name not in modules:
            raise BaseMismatchError(f"adapter module {name!r} does not exist in this model; the adapter was made "
                                    f"for {adapter.meta['base'].get('ref')!r}")
        module = modules[name]
        if entry["kind"] == "lora":
            if not (is_linear(module) or isinstance(module, LoRALinear)):
                raise BaseMismatchError(f"{name} is a {type(module).__name__} here, but the adapter expects a linear layer")
            out_f, in_f = (module.out_features, module.in_features) if isinstance(module, LoRALinear) \
                else linear_shape(module)[:2]
            if (out_f, in_f) != (entry["out_features"], entry["in_features"]):
                raise ShapeMismatchError(f"{name}: the model's layer is {out_f}×{in_f} (out×in) but the adapter "
                                         f"expects {entry['out_features']}×{entry['in_features']}; wrong base model?")
            current_rank = entry["rank"] - entry.get("folded_rank", 0)
            if isinstance(module, LoRALinear) and module.rank not in (entry["rank"], current_rank):
                raise ShapeMismatchError(f"{name} already has LoRA of rank {module.rank} in the model but the "
                                         f"adapter has rank {entry['rank']}; eject or merge it first")
            rec = entry["base_tensors"]["weight"]
            if isinstance(module, LoRALinear) and module.base_weight_record is not None:
                # the live weight holds folded ReLoRA updates: compare the original's record instead
                if module.base_weight_record["sha256"] != rec["sha256"]:
                    mismatched.append(name)
                continue
            w = module.weight
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
               f"{sum(e['kind'] == 'lora' for e in adapter.modules.values())} modified weights differ "
               f"(e.g. {mismatched[0]}); it expects base {adapter.meta['base'].get('ref')!r}")
        if not force:
            raise BaseMismatchError(msg + ". Load the right base, or pass --force to apply it anyway")
        warnings.warn(msg + " — applying anyway because of --force", stacklevel=2)
    return mismatched


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
    full: list[str] = []
    for name, entry in adapter.modules.items():
        if entry["kind"] == "lora":
            layer = existing.get(name)
            if layer is None:
                layer = wrap_module(model, name, entry["rank"], entry["alpha"], entry.get("rslora", False))
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
        else:
            full.append(name)
            params = dict(model.get_submodule(name).named_parameters())
            for p in entry["tensors"]:
                params[p].copy_(adapter.tensors[fmt.tensor_key(name, p)])
                params[p].requires_grad_(trainable)
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
