"""Fold adapters into base weights: into a model in memory, or into a plain safetensors state dict.

Both paths compute W ← W + scaling · B A in float32 (transposed for fan_in_fan_out) and cast back
to the weight's dtype, so they give the same bytes. Full modules replace their tensors outright.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from torch import nn

from lrsurgery import format as fmt
from lrsurgery.adapter import apply_adapter, load_adapter
from lrsurgery.errors import BaseMismatchError, LrsurgeryError, ShapeMismatchError
from lrsurgery.models import load_model, save_model
from lrsurgery.surgery import lora_modules, merge, velora_modules


def delta_weight(adapter: fmt.Adapter, name: str) -> torch.Tensor:
    """ΔW of LoRA module ``name`` in fp32, in the stored weight's orientation."""
    entry = adapter.modules[name]
    a = adapter.tensors[f"{name}.lora_A"].float()
    b = adapter.tensors[f"{name}.lora_B"].float()
    delta = (b @ a) * entry["scaling"]
    return delta.T if entry["fan_in_fan_out"] else delta


def merge_into_model(model: nn.Module, adapter: fmt.Adapter | str | os.PathLike, *, force: bool = False) -> nn.Module:
    """Apply (with base checks) and fold the adapter into ``model``; returns the plain model."""
    apply_adapter(model, adapter, force=force)
    if not lora_modules(model) and not velora_modules(model):
        return model  # only full modules: applying them already replaced the weights
    return merge(model)


@torch.no_grad()
def merge_state_dict(state: dict[str, torch.Tensor], adapter: fmt.Adapter, *, force: bool = False) -> dict[str, torch.Tensor]:
    """A new state dict with the adapter folded in; checks names, shapes and base hashes first."""
    out = dict(state)
    bad = []
    for name, entry in adapter.modules.items():
        if entry["kind"] == "lora":
            key = f"{name}.weight"
            if key not in state:
                raise BaseMismatchError(f"the checkpoint has no tensor {key!r}; the adapter was made for "
                                        f"{adapter.meta['base'].get('ref')!r}")
            w = state[key]
            rec = entry["base_tensors"]["weight"]
            if list(w.shape) != rec["shape"]:
                raise ShapeMismatchError(f"{key} has shape {list(w.shape)} but the adapter expects {rec['shape']}")
            if fmt.tensor_sha256(w.to(fmt.dtype_from_name(rec["dtype"]))) != rec["sha256"]:
                bad.append(key)
            out[key] = (w.float() + delta_weight(adapter, name)).to(w.dtype)
            if entry.get("bias"):
                bkey = f"{name}.bias"
                if bkey not in state:
                    raise BaseMismatchError(f"the adapter changes {bkey!r}, which the checkpoint does not have")
                out[bkey] = (state[bkey].float() + adapter.tensors[f"{name}.lora_bias"].float()).to(state[bkey].dtype)
        else:
            for p in entry["tensors"]:
                key = fmt.tensor_key(name, p)
                if key not in state:
                    raise BaseMismatchError(f"the checkpoint has no tensor {key!r} for the adapter's module "
                                            f"{name!r}; the adapter was made for {adapter.meta['base'].get('ref')!r}")
                if state[key].shape != adapter.tensors[key].shape:
                    raise ShapeMismatchError(f"{key} has shape {list(state[key].shape)} in the checkpoint but "
                                             f"{list(adapter.tensors[key].shape)} in the adapter")
                out[key] = adapter.tensors[key].to(state[key].dtype)
    if bad:
        msg = f"{len(bad)} base weights differ from the ones the adapter was made on (e.g. {bad[0]})"
        if not force:
            raise BaseMismatchError(msg + "; use the right base or pass --force")
        warnings.warn(msg + " — merging anyway because of --force", stacklevel=2)
    return out


def merge_files(model_ref: str, adapter_path: str | os.PathLike, out: str | os.PathLike, *,
                weights: str | None = None, force: bool = False, force_base: bool = False) -> Path:
    """``lrsurgery merge``: base (reference or .safetensors file) + adapter → merged model on disk.

    A model reference is loaded with the arguments the adapter recorded for its base (head size,
    seed of a random init), so the user does not have to repeat them.
    """
    from safetensors.torch import load_file, save_file
    adapter = load_adapter(adapter_path)
    out = Path(out)
    if out.exists() and not force:
        from lrsurgery.errors import OutputExistsError
        raise OutputExistsError(f"{out} exists; pass --force to overwrite it")
    ref_path = Path(model_ref)
    if ref_path.suffix == ".safetensors" and ref_path.is_file():
        if out.suffix != ".safetensors":
            raise LrsurgeryError(f"the base {ref_path.name} is a plain safetensors file, so the merged model is one "
                                 f"too: give -o a FILE.safetensors (got {out})")
        merged = merge_state_dict(load_file(str(ref_path)), adapter, force=force_base)
        fmt.atomic_write(out, lambda tmp: save_file({k: v.contiguous() for k, v in merged.items()}, str(tmp)))
        return out
    base = adapter.meta["base"]
    same = base.get("ref") == model_ref
    model = load_model(model_ref, weights=weights or (base.get("weights") if same else None),
                       init="random" if same and base.get("source") == "random-init" else "pretrained",
                       num_classes=base.get("num_classes"), seed=base.get("init_seed") or 0)
    merge_into_model(model, adapter, force=force_base)
    return save_model(model, out, force=force)
