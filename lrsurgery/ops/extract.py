"""Extract an adapter: from a run, or by truncated SVD of the change between a tuned model and its base.

For each target layer, ΔW = W_tuned − W_base (fp32, (out, in) orientation) = U S Vᵀ. Keeping the k
largest singular values gives the best rank-k approximation (Eckart–Young):
    B = U_k √S_k,  A = √S_k V_kᵀ,  alpha = k (scaling 1),  ‖ΔW − B A‖_F = sqrt(Σ_{i>k} σ_i²).
``rank`` fixes k; ``energy`` picks the smallest k with Σ_{i≤k} σ_i² ≥ energy · Σ σ_i².
Parameters outside the targets that changed (a new head, tuned norms) are kept in full.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lrsurgery import __version__
from lrsurgery import format as fmt
from lrsurgery.errors import LrsurgeryError, ShapeMismatchError
from lrsurgery.layers.lora import linear_shape
from lrsurgery.models import base_info, load_model
from lrsurgery.targets import TargetSpec, resolve_targets


@dataclass
class ModuleExtraction:
    """What SVD kept of one module's change."""

    name: str
    rank: int
    full_rank: int
    energy: float         # retained fraction of Σσ² (1.0 for an unchanged module)
    error: float          # Frobenius norm of the discarded part


def choose_rank(s: torch.Tensor, rank: int | None, energy: float | None) -> int:
    """k from a fixed rank or from a retained-energy threshold on σ² (at least 1)."""
    if (rank is None) == (energy is None):
        raise LrsurgeryError("give exactly one of --rank R or --energy E")
    if rank is not None:
        if rank < 1:
            raise LrsurgeryError(f"--rank must be ≥ 1, got {rank}")
        return min(rank, s.numel())
    if not 0.0 < energy <= 1.0:
        raise LrsurgeryError(f"--energy must be in (0, 1], got {energy}")
    e = s.double() ** 2
    total = float(e.sum())
    if total == 0.0:
        return 1
    cum = torch.cumsum(e, 0) / total
    return int(torch.searchsorted(cum, torch.tensor(energy * (1 - 1e-12), dtype=cum.dtype)).item()) + 1


def svd_factors(delta: torch.Tensor, rank: int | None, energy: float | None):
    """(A, B, k, retained energy, error) of the truncated SVD of ``delta`` [out, in]."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    k = choose_rank(s, rank, energy)
    root = s[:k].sqrt()
    b, a = u[:, :k] * root, root[:, None] * vh[:k]
    e = s ** 2
    total = float(e.sum())
    retained = float(e[:k].sum()) / total if total > 0 else 1.0
    return a.float(), b.float(), k, retained, math.sqrt(float(e[k:].sum()))


@torch.no_grad()
def extract_svd(base: nn.Module, tuned: nn.Module, targets: TargetSpec = None, *, rank: int | None = None,
                energy: float | None = None, include_changed: bool = True) -> tuple[fmt.Adapter, list[ModuleExtraction]]:
    """A LoRA adapter approximating ``tuned − base`` on the target layers, plus a per-module report."""
    report = resolve_targets(base, targets)
    tuned_modules = dict(tuned.named_modules())
    tensors: dict[str, torch.Tensor] = {}
    modules: dict[str, dict] = {}
    stats: list[ModuleExtraction] = []
    for name in report.matched:
        b_mod = base.get_submodule(name)
        t_mod = tuned_modules.get(name)
        if t_mod is None or t_mod.weight.shape != b_mod.weight.shape:
            raise ShapeMismatchError(f"{name}: the tuned model has no layer of the base's shape here; "
                                     "are both models the same architecture?")
        out_f, in_f, fifo = linear_shape(b_mod)
        bias_changed = b_mod.bias is not None and not torch.equal(b_mod.bias, t_mod.bias)
        if torch.equal(t_mod.weight, b_mod.weight) and not bias_changed:
            continue  # unchanged by the fine-tune: no entry (rank-k zeros would only cost bytes)
        delta = t_mod.weight.double() - b_mod.weight.double()
        if fifo:  # Conv1D stores [in, out]: the adapter is defined in (out, in)
            delta = delta.T
        a, bmat, k, kept, err = svd_factors(delta, rank, energy)
        stats.append(ModuleExtraction(name, k, min(out_f, in_f), kept, err))
        modules[name] = {"kind": "lora", "rank": k, "alpha": float(k), "rslora": False, "scaling": 1.0,
                         "in_features": in_f, "out_features": out_f, "fan_in_fan_out": fifo, "dtype": "float32",
                         "base_tensors": {"weight": fmt.tensor_record(b_mod.weight)}}
        tensors[f"{name}.lora_A"], tensors[f"{name}.lora_B"] = a.contiguous(), bmat.contiguous()
        if bias_changed:  # keep a bias change exactly
            modules[name]["bias"] = True
            tensors[f"{name}.lora_bias"] = (t_mod.bias.double() - b_mod.bias.double()).float().contiguous()
    if include_changed:
        _add_changed_modules(base, tuned, set(report.matched), modules, tensors)
    if not modules:
        raise LrsurgeryError("the tuned model equals the base on every target layer and every other module: "
                             "there is nothing to extract (was the right fine-tuned model given?)")
    info = base_info(base)
    meta = {"base": info.as_dict() if info else {"ref": None}, "method": "lora",
            "config": {"extracted": "svd", "rank": rank, "energy": energy},
            "modules": modules,
            "provenance": {"tool": f"lrsurgery {__version__}", "method": "svd-extract",
                           "tuned": getattr(base_info(tuned), "ref", None),
                           "retained_energy": {s.name: round(s.energy, 6) for s in stats}}}
    return fmt.Adapter(tensors=tensors, meta=meta), stats


def _add_changed_modules(base: nn.Module, tuned: nn.Module, targets: set[str], modules: dict, tensors: dict) -> None:
    """Keep in full every non-target module whose own parameters changed (or changed shape)."""
    base_mods = dict(base.named_modules())
    for name, t_mod in tuned.named_modules():
        if name in targets:
            continue
        own = dict(t_mod.named_parameters(recurse=False))
        b_mod = base_mods.get(name)
        b_own = dict(b_mod.named_parameters(recurse=False)) if b_mod is not None else {}
        changed = any(p not in b_own or b_own[p].shape != t.shape or not torch.equal(b_own[p], t)
                      for p, t in own.items())
        if own and changed:
            modules[name] = {"kind": "full", "tensors": {p: {"shape": list(t.shape), "dtype": fmt.dtype_name(t.dtype)}
                                                         for p, t in own.items()}}
            tensors.update({fmt.tensor_key(name, p): t.detach().contiguous() for p, t in own.items()})


def extract_from_run(run_dir: str | os.PathLike, out: str | os.PathLike, *, force: bool = False,
                     rank: int | None = None, energy: float | None = None,
                     targets: TargetSpec = None, keep_heads: bool = False) -> tuple[Path, list[ModuleExtraction]]:
    """A run's adapter as a standalone file; with ``rank``/``energy``, a LoRA adapter by SVD of its change.

    The SVD path turns a full-parameter run (or a high-rank ReLoRA/LoRA/LTE run) into a small LoRA file:
    the tuned model (base + the run's adapter, merged) minus the base, per target layer (default: the
    run's targets). A copied LTE adapter keeps its dense change; its heads only with ``keep_heads``
    (they are needed to continue training, not to use the model).
    """
    from lrsurgery.run import ADAPTER, open_run
    from lrsurgery.surgery import lora_modules, lte_layers, merge
    src = Path(run_dir) / ADAPTER
    if not src.is_file():
        raise LrsurgeryError(f"{run_dir} has no {ADAPTER}; is it a run directory made by `lrsurgery inject`?")
    if rank is None and energy is None:
        adapter = fmt.read(src)
        if not keep_heads:
            _drop_heads(adapter)
        return fmt.write(out, adapter, force=force), []
    if Path(out).exists() and not force:
        from lrsurgery.errors import OutputExistsError
        raise OutputExistsError(f"{out} exists; pass --force to overwrite it")
    choose_rank(torch.ones(1), rank, energy)
    run = open_run(run_dir)
    tuned = merge(run.model) if lora_modules(run.model) or lte_layers(run.model) else run.model
    load = dict(run.recipe["load"])
    base = load_model(load.pop("ref"), **load)
    targets = targets or run.recipe["inject"].get("targets") or _default_targets(base)
    adapter, stats = extract_svd(base, tuned, targets, rank=rank, energy=energy)
    adapter.meta["provenance"].update({"run": str(Path(run_dir).resolve()),
                                       "steps": sum(s["steps"] for s in run.recipe["sessions"])})
    return fmt.write(out, adapter, force=force), stats


def _drop_heads(adapter: fmt.Adapter) -> None:
    """Remove LTE heads from an adapter in place (the dense change alone is what the model uses)."""
    for name, entry in adapter.modules.items():
        if entry["kind"] == "delta" and entry.pop("lte", None):
            del adapter.tensors[f"{name}.lte_A"], adapter.tensors[f"{name}.lte_B"]


def _default_targets(model: nn.Module) -> TargetSpec:
    """The family preset, or every linear layer but the head when the family is unknown."""
    from lrsurgery.targets import family
    return "preset" if family(model) else "all-linear"


def extract_models(base_ref: str, tuned_ref: str, out: str | os.PathLike, *, targets: TargetSpec = None,
                   rank: int | None = None, energy: float | None = None,
                   force: bool = False) -> tuple[Path, list[ModuleExtraction]]:
    """``lrsurgery extract --base --tuned``: load both models, extract by SVD, write the adapter."""
    out = Path(out)
    if out.exists() and not force:
        from lrsurgery.errors import OutputExistsError
        raise OutputExistsError(f"{out} exists; pass --force to overwrite it")
    choose_rank(torch.ones(1), rank, energy)  # validate the arguments before loading two models
    tuned = load_model(tuned_ref)
    classes = getattr(tuned, "num_classes", None) or getattr(getattr(tuned, "config", None), "num_labels", None)
    base = load_model(base_ref)
    if _head_size(base) != _head_size(tuned) and classes:
        base = load_model(base_ref, num_classes=classes)
    adapter, stats = extract_svd(base, tuned, targets, rank=rank, energy=energy)
    return fmt.write(out, adapter, force=force), stats


def _head_size(model: nn.Module) -> int | None:
    return getattr(model, "num_classes", None)
