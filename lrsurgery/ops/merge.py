"""Fold adapters into base weights: into a model in memory, into a state dict, or (``ops.stream_merge``)
tensor by tensor over safetensors checkpoint files.

Every path computes W ← W + scaling · B A in float32 (transposed for fan_in_fan_out) and casts back
to the weight's dtype, so they give the same bytes; the file paths share ``merged_tensor``. Full
modules replace their tensors outright.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from lrsurgery import format as fmt
from lrsurgery import lineage
from lrsurgery.adapter import apply_adapter, load_adapter
from lrsurgery.errors import BaseMismatchError, LrsurgeryError, ShapeMismatchError
from lrsurgery.models import load_model, save_model
from lrsurgery.surgery import lora_modules, merge, velora_modules


def delta_weight(adapter: fmt.Adapter, name: str) -> torch.Tensor:
    """ΔW of LoRA (or dense ``delta``, e.g. LTE) module ``name`` in fp32, in the stored weight's orientation.

    Always a new tensor: ``merged_tensor`` sums the base weight into it in place.
    """
    entry = adapter.modules[name]
    if entry["kind"] == "delta":  # stored dense, already in the weight's orientation
        return adapter.tensors[f"{name}.delta"].to(torch.float32, copy=True)
    a = adapter.tensors[f"{name}.lora_A"].float()
    b = adapter.tensors[f"{name}.lora_B"].float()
    delta = (b @ a).mul_(entry["scaling"])  # in place: one fp32 matrix alive, same bits as (b @ a) * s
    return delta.T if entry["fan_in_fan_out"] else delta


_BLOCK = 1 << 20  # elements per block of the in-place W + ΔW sum (a 4 MiB fp32 temporary)


class Target(NamedTuple):
    """One base tensor the adapter changes: its module, and how (the role)."""

    module: str
    role: str  # "weight": W + ΔW of a LoRA module; "bias": b + Δb; "full": replaced by the adapter's tensor


def merge_targets(adapter: fmt.Adapter) -> dict[str, Target]:
    """Checkpoint key → Target for every base tensor the adapter changes (all others stay as they are)."""
    targets: dict[str, Target] = {}
    for name, entry in adapter.modules.items():
        if entry["kind"] in ("lora", "delta"):
            targets[f"{name}.weight"] = Target(name, "weight")
            if entry.get("bias"):
                targets[f"{name}.bias"] = Target(name, "bias")
        else:
            targets.update({fmt.tensor_key(name, p): Target(name, "full") for p in entry["tensors"]})
    return targets


def missing_target_error(adapter: fmt.Adapter, key: str, target: Target, where: str) -> BaseMismatchError:
    """The error for a tensor the adapter changes that the checkpoint does not have."""
    return BaseMismatchError(f"{where} has no tensor {key!r}, which the adapter's module {target.module!r} "
                             f"changes; the adapter was made for {adapter.meta['base'].get('ref')!r}")


def check_target_shape(adapter: fmt.Adapter, key: str, target: Target, shape: list[int]) -> None:
    """Refuse a base tensor whose shape is not the one the adapter was made for (even with --force)."""
    entry = adapter.modules[target.module]
    if target.role == "weight":
        want, whose = entry["base_tensors"]["weight"]["shape"], "the adapter expects"
    elif target.role == "bias":
        want, whose = [entry["out_features"]], "the adapter's Δb has"
    else:
        want, whose = list(adapter.tensors[key].shape), "the adapter's tensor has"
    if list(shape) != list(want):
        raise ShapeMismatchError(f"{key} has shape {list(shape)} in the checkpoint but {whose} {list(want)}; "
                                 "wrong base model?")


def base_matches(adapter: fmt.Adapter, target: Target, w: torch.Tensor) -> bool:
    """True unless ``w`` is a LoRA base weight whose SHA-256 differs from the adapter's record."""
    if target.role != "weight":
        return True
    rec = adapter.modules[target.module]["base_tensors"]["weight"]
    return fmt.tensor_sha256(w.to(fmt.dtype_from_name(rec["dtype"]))) == rec["sha256"]


@torch.no_grad()
def merged_tensor(adapter: fmt.Adapter, key: str, target: Target, w: torch.Tensor) -> torch.Tensor:
    """The merged value of base tensor ``key``: the one arithmetic every merge path shares.

    W + ΔW and b + Δb are summed in fp32 and rounded once to the base dtype, as ``LoRALinear.merge``
    does; a full tensor is the adapter's, cast to the base dtype. ``w`` itself is never modified.
    """
    if target.role == "full":
        return adapter.tensors[key].to(w.dtype)
    if target.role == "bias":
        return (w.float() + adapter.tensors[f"{target.module}.lora_bias"].float()).to(w.dtype)
    merged = delta_weight(adapter, target.module)  # a fresh fp32 tensor: summed into in place
    if merged.shape != w.shape:
        raise ShapeMismatchError(f"{key}: ΔW has shape {list(merged.shape)} but the weight has {list(w.shape)}")
    # ΔW + W in fp32 is bit for bit W.float() + ΔW (fp32 addition commutes; bf16/fp16 → fp32 is exact),
    # without a fp32 copy of W: 2× W's bytes at the peak in fp32, 4× in bf16/fp16. In row blocks,
    # because a mixed-dtype in-place add casts its whole input to fp32 first.
    rows = max(1, _BLOCK // max(1, w.shape[1:].numel()))
    for m, x in zip(merged.split(rows), w.split(rows)):
        m += x
    if merged.dtype == w.dtype and merged.is_contiguous():
        return merged
    return torch.empty(w.shape, dtype=w.dtype).copy_(merged)  # what .to(w.dtype) does, but row-major for Conv1D


def merge_into_model(model: nn.Module, adapter: fmt.Adapter | str | os.PathLike, *, force: bool = False) -> nn.Module:
    """Apply (with base checks) and fold the adapter into ``model``; returns the plain model."""
    apply_adapter(model, adapter, force=force)
    if not lora_modules(model) and not velora_modules(model):
        return model  # only full modules: applying them already replaced the weights
    return merge(model)


@torch.no_grad()
def merge_state_dict(state: dict[str, torch.Tensor], adapter: fmt.Adapter, *, force: bool = False) -> dict[str, torch.Tensor]:
    """A new state dict with the adapter folded in; checks lineage, names, shapes and base hashes first."""
    lineage.check(adapter, [], force=force, where="the base checkpoint")  # a plain checkpoint holds no parents
    out = dict(state)
    bad = []
    for key, target in merge_targets(adapter).items():
        if key not in state:
            raise missing_target_error(adapter, key, target, "the checkpoint")
        w = state[key]
        check_target_shape(adapter, key, target, list(w.shape))
        if not base_matches(adapter, target, w):
            bad.append(key)
        out[key] = merged_tensor(adapter, key, target, w)
    if bad:
        msg = f"{len(bad)} base weights differ from the ones the adapter was made on (e.g. {bad[0]})"
        if not force:
            raise BaseMismatchError(msg + "; use the right base or pass --force")
        warnings.warn(msg + " — merging anyway because of --force", stacklevel=2)
    return out


def merge_files(model_ref: str, adapter_path: str | os.PathLike, out: str | os.PathLike, *,
                weights: str | None = None, force: bool = False, force_base: bool = False,
                stream: bool | None = None) -> Path:
    """``lrsurgery merge``: base (reference, directory or .safetensors file) + adapter → merged model on disk.

    ``stream=None`` streams every safetensors checkpoint tensor by tensor (a file, a model directory
    with one file or index + shards, an ``hf:`` snapshot; see ``ops.stream_merge``) and builds the model
    only when that is impossible: ``timm:NAME``, ``weights``, and bases the adapter recorded with a
    random init or a new head. ``True`` requires streaming, ``False`` always merges in memory. A built
    model is loaded with the arguments the adapter recorded for its base (head size, seed of a
    random init), so the user does not have to repeat them.
    """
    adapter = load_adapter(adapter_path)
    out = Path(out)
    fmt.check_output_spares(out, model_ref, adapter.path or adapter_path)
    if out.exists() and not force:
        from lrsurgery.errors import OutputExistsError
        raise OutputExistsError(f"{out} exists; pass --force to overwrite it")
    ref_path = Path(model_ref)
    is_file = ref_path.suffix == ".safetensors" and ref_path.is_file()
    if is_file and out.suffix != ".safetensors":
        raise LrsurgeryError(f"the base {ref_path.name} is a plain safetensors file, so the merged model is one "
                             f"too: give -o a FILE.safetensors (got {out})")
    if stream is not False:
        from lrsurgery.ops.stream_merge import stream_merge
        ckpt, why_not = _streamable(model_ref, adapter, weights, is_file)
        if ckpt is not None:
            return stream_merge(ckpt, adapter, out, force_base=force_base).path
        if stream:
            raise LrsurgeryError(f"cannot stream {model_ref}: {why_not}; merge without --stream")
    if is_file:  # in memory: the whole state dict
        from safetensors import safe_open
        from safetensors.torch import load_file, save_file
        with safe_open(str(ref_path), framework="pt") as f:
            metadata = f.metadata()
        merged = merge_state_dict(load_file(str(ref_path)), adapter, force=force_base)
        fmt.atomic_write(out, lambda tmp: save_file({k: v.contiguous() for k, v in merged.items()}, str(tmp),
                                                    metadata=metadata))
        return out
    base = adapter.meta["base"]
    same = base.get("ref") == model_ref
    model = load_model(model_ref, weights=weights or (base.get("weights") if same else None),
                       init="random" if same and base.get("source") == "random-init" else "pretrained",
                       num_classes=base.get("num_classes"), seed=base.get("init_seed") or 0)
    merge_into_model(model, adapter, force=force_base)
    return save_model(model, out, force=force)


def _streamable(model_ref: str, adapter: fmt.Adapter, weights: str | None, is_file: bool):
    """(the checkpoint to stream, None) or (None, why the model must be built instead)."""
    from lrsurgery.models import _hub_dir
    from lrsurgery.ops.stream_merge import find_checkpoint
    if is_file:
        return find_checkpoint(Path(model_ref)), ""
    base = adapter.meta["base"]
    recorded = base.get("ref")
    same = recorded == model_ref or (recorded is not None and ":" not in model_ref and Path(model_ref).is_dir()
                                     and Path(recorded).resolve() == Path(model_ref).resolve())
    if model_ref.startswith("timm:"):
        return None, "timm:NAME is built as a model (give its weights file or model directory to stream it)"
    if weights is not None or (same and base.get("weights")):
        return None, "a --weights file replaces the checkpoint's tensors"
    if base.get("num_classes") is not None:
        return None, f"the adapter's base was loaded with a new {base['num_classes']}-class head"
    if same and base.get("source") == "random-init":
        return None, "the adapter's base is a random init, not the checkpoint"
    path = _hub_dir(model_ref[3:])[0] if model_ref.startswith("hf:") else Path(model_ref)
    ckpt = find_checkpoint(path)
    return (ckpt, "") if ckpt is not None else (None, f"{path} holds no safetensors weights")
