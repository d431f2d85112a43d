"""Combine adapters made on the same base into one: an exact weighted sum of their updates, or its SVD.

Adapter i changes LoRA module m by ΔW_i = s_i B_i A_i ([out, in], whatever ``fan_in_fan_out``; an
adapter without m contributes 0). Every mode targets the weighted sum ΔW = Σ_i w_i ΔW_i:

    cat     A = [A_1; A_2; …]  B = [w_1 s_1 B_1 | w_2 s_2 B_2 | …]   scaling 1, rank Σ r_i:  B A = ΔW exactly
    linear  truncated SVD of ΔW at rank max_i r_i (or ``rank``); reports the retained energy
    svd     truncated SVD of ΔW at ``rank``, or at the fewest σ holding ``energy`` of Σσ²
    mean    federated average: weights scaled to sum to 1 (default 1/n); exact like cat, SVD with rank/energy

Never average A and B separately: (Σ w_i B_i)(Σ w_i A_i) = Σ_i Σ_j w_i w_j B_i A_j carries the cross
terms i ≠ j and the wrong weights w_i² (PEFT #1155). Δb (``lora_bias``) combines as Σ w_i Δb_i. A
dense ``delta`` entry (LTE) adds its ΔW to the sum; an exact mode then writes the sum as a ``delta``
entry. A ``full`` module replaces base tensors, so it combines as the average Σ w_i T_i: it must be
in every input and the weights must sum to 1 (or pass ``drop_full``). What only serves to resume
training (ReLoRA's ``folded_rank``, LTE heads, VeLoRA vectors) is not carried over.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from lrsurgery import __version__
from lrsurgery import format as fmt
from lrsurgery.adapter import load_adapter
from lrsurgery.errors import BaseMismatchError, LrsurgeryError, OutputExistsError, ShapeMismatchError
from lrsurgery.ops.extract import svd_factors

MODES = ("cat", "linear", "svd", "mean")
WEIGHT_SUM_TOLERANCE = 1e-6  # full modules need Σw = 1; "0.3,0.3,0.4" must pass despite float rounding


@dataclass
class ModuleCombination:
    """What one output module holds and what the SVD modes discarded of it."""

    name: str
    kind: str                          # kind written: "lora", "delta" (dense, exact) or "full"
    input_ranks: list[int | str | None]  # per input: its rank, "dense" for a delta entry, None if absent/full
    rank: int | None                   # rank written; None for delta and full modules
    energy: float = 1.0                # retained fraction of ‖Σ w_i ΔW_i‖_F² (1.0 when exact)
    error: float = 0.0                 # Frobenius norm of the discarded part (0.0 when exact)


@dataclass
class CombineResult:
    """The outcome of a combination: mode, the weights used, one row per module, and the file written."""

    mode: str
    weights: list[float]
    exact: bool
    modules: list[ModuleCombination]
    path: Path | None = field(default=None)

    def as_dict(self) -> dict[str, Any]:
        return {"adapter": str(self.path) if self.path else None, "mode": self.mode, "weights": self.weights,
                "exact": self.exact, "modules": [asdict(m) for m in self.modules]}


def combine(adapters: Sequence[fmt.Adapter | str | os.PathLike], weights: Sequence[float] | None = None,
            mode: str = "cat", rank: int | None = None, *, energy: float | None = None,
            drop_full: bool = False) -> tuple[fmt.Adapter, CombineResult]:
    """One adapter whose update is Σ w_i ΔW_i of ``adapters`` (exact for cat/mean, SVD-truncated otherwise).

    Weights default to 1 each (cat/linear/svd: the updates add up) or 1/n (mean). Raises
    ``BaseMismatchError`` when two inputs record different base weights for the same module.
    """
    if mode not in MODES:
        raise LrsurgeryError(f"unknown combine mode {mode!r}; choose one of {', '.join(MODES)}")
    items = list(adapters)
    if not items:
        raise LrsurgeryError("give at least one adapter to combine")
    w = resolve_weights(weights, len(items), mode)  # argument errors first, before reading any file
    _check_rank_options(mode, rank, energy)
    loaded = [a if isinstance(a, fmt.Adapter) else load_adapter(a) for a in items]
    labels = [_label(a, i) for i, a in enumerate(loaded)]
    check_same_base(loaded, labels)
    _check_same_parents(loaded, labels)
    if not drop_full:
        _check_no_replaced_deltas(loaded, labels)
    exact = mode == "cat" or (mode == "mean" and rank is None and energy is None)

    names = dict.fromkeys(name for a in loaded for name in a.modules)  # in order of first appearance
    tensors: dict[str, torch.Tensor] = {}
    modules: dict[str, dict[str, Any]] = {}
    rows: list[ModuleCombination] = []
    for name in names:
        # each input's own entry decides: its full tensors or its update (lora, delta) for this module
        full_in = [i for i, a in enumerate(loaded) if a.modules.get(name, {}).get("kind") == "full"]
        update_in = [i for i, a in enumerate(loaded) if name in a.modules and a.modules[name]["kind"] != "full"]
        if full_in and not drop_full:  # (full and update inputs on one module were refused above)
            modules[name] = _combine_full(name, full_in, loaded, labels, w, tensors)
            rows.append(ModuleCombination(name, "full", [None] * len(loaded), None))
        if update_in:
            modules[name], row = _combine_update(name, update_in, loaded, w, exact, rank, energy, tensors)
            rows.append(row)
    if not modules:
        raise LrsurgeryError("nothing to combine: every module is trained in full and --drop-full was given")

    provenance: dict[str, Any] = {
        "tool": f"lrsurgery {__version__}", "method": "combine", "mode": mode, "weights": w,
        "inputs": [{"path": getattr(a, "source", None) or (str(a.path) if a.path is not None else None),
                    "sha256": fmt.file_sha256(a.path) if a.path is not None and Path(a.path).is_file() else None}
                   for a in loaded]}
    if not exact:
        provenance["retained_energy"] = {r.name: round(r.energy, 6) for r in rows if r.kind == "lora"}
    meta = {"base": dict(loaded[0].meta["base"]),
            "method": "lora" if any(e["kind"] == "lora" for e in modules.values()) else
                      "lte" if any(e["kind"] == "delta" for e in modules.values()) else "full",
            "config": {"combined": mode, "rank": rank, "energy": energy},
            "modules": modules, "provenance": provenance}
    if loaded[0].meta.get("parents"):  # every input was trained on the same folded parents (checked)
        meta["parents"] = [dict(p) for p in loaded[0].meta["parents"]]
    return fmt.Adapter(tensors=tensors, meta=meta), CombineResult(mode, w, exact, rows)


def _label(adapter: fmt.Adapter, i: int) -> str:
    """How messages name input ``i``: its hub reference, its path, or its position."""
    source = getattr(adapter, "source", None)  # set for hf: references by load_adapter
    return str(source or adapter.path or f"adapter #{i + 1}")


def combine_files(inputs: Sequence[str | os.PathLike], out: str | os.PathLike, *,
                  weights: Sequence[float] | None = None, mode: str = "cat", rank: int | None = None,
                  energy: float | None = None, drop_full: bool = False, force: bool = False) -> CombineResult:
    """``lrsurgery combine``: read the inputs (files or ``hf:`` references), combine them, write ``out`` atomically."""
    out = Path(out)
    if out.exists() and not force:
        raise OutputExistsError(f"{out} exists; pass --force to overwrite it")
    adapter, result = combine(list(inputs), weights, mode, rank, energy=energy, drop_full=drop_full)
    result.path = fmt.write(out, adapter, force=force)
    return result


def resolve_weights(weights: Sequence[float] | None, n: int, mode: str) -> list[float]:
    """One finite weight per adapter; defaults 1 (mean: 1/n); mean scales them to sum to 1."""
    if weights is None:
        return [1.0 / n] * n if mode == "mean" else [1.0] * n
    w = [float(x) for x in weights]
    if len(w) != n:
        raise LrsurgeryError(f"{len(w)} weights for {n} adapters; give exactly one weight per adapter "
                             "(--weights w1,w2,...)")
    bad = [x for x in w if not math.isfinite(x)]
    if bad:
        raise LrsurgeryError(f"weight {bad[0]} is not a finite number; give finite weights such as 0.5,0.5")
    if mode == "mean":
        if any(x < 0 for x in w) or sum(w) <= 0:
            raise LrsurgeryError(f"mode mean averages: its weights are relative sizes (e.g. client sample counts), "
                                 f"≥ 0 with a positive sum; got {w}. Use --mode cat for signed weights")
        total = math.fsum(w)
        w = [x / total for x in w]
    return w


def _check_rank_options(mode: str, rank: int | None, energy: float | None) -> None:
    if rank is not None and rank < 1:
        raise LrsurgeryError(f"--rank must be ≥ 1, got {rank}")
    if energy is not None and not 0.0 < energy <= 1.0:
        raise LrsurgeryError(f"--energy must be in (0, 1], got {energy}")
    if mode == "cat" and (rank is not None or energy is not None):
        raise LrsurgeryError("mode cat is exact: its rank is the sum of the input ranks; to truncate, use "
                             "--mode svd --rank R (or --mode linear)")
    if mode == "svd" and (rank is None) == (energy is None):
        raise LrsurgeryError("mode svd needs exactly one of --rank R or --energy E; --mode linear keeps the "
                             "largest input rank by default")
    if mode == "linear" and energy is not None:
        raise LrsurgeryError("mode linear keeps --rank R (default: the largest input rank); for an energy "
                             "threshold use --mode svd --energy E")
    if mode == "mean" and rank is not None and energy is not None:
        raise LrsurgeryError("give at most one of --rank R or --energy E")


def check_same_base(adapters: Sequence[fmt.Adapter], labels: Sequence[str]) -> None:
    """Refuse inputs whose records of a shared module's base weight (hash, layer shape) differ."""
    first: dict[str, int] = {}
    for i, a in enumerate(adapters):
        for name, e in a.modules.items():
            if e["kind"] == "full":
                continue
            j = first.setdefault(name, i)
            if j == i:
                continue
            f = adapters[j].modules[name]
            layer_f = (f["out_features"], f["in_features"], f["fan_in_fan_out"])
            layer_e = (e["out_features"], e["in_features"], e["fan_in_fan_out"])
            if layer_f != layer_e:
                raise BaseMismatchError(
                    f"{labels[j]} and {labels[i]} were made for different models: module {name!r} is "
                    f"{layer_f[0]}×{layer_f[1]} (out×in) in one and {layer_e[0]}×{layer_e[1]} in the other; "
                    "combine only adapters trained on the same base model")
            rf, re_ = f["base_tensors"]["weight"], e["base_tensors"]["weight"]
            if rf["sha256"] != re_["sha256"]:
                dtypes = f" (recorded in {rf['dtype']} vs {re_['dtype']})" if rf["dtype"] != re_["dtype"] else ""
                raise BaseMismatchError(
                    f"{labels[j]} and {labels[i]} were made on different base weights: module {name!r} has base "
                    f"weight sha256 {rf['sha256'][:12]}… vs {re_['sha256'][:12]}…{dtypes}; combine only "
                    "adapters trained on the same base model")
    for i in range(1, len(adapters)):  # no shared module to compare: at least say when the refs differ
        lora_i = {n for n, e in adapters[i].modules.items() if e["kind"] != "full"}
        lora_0 = {n for n, e in adapters[0].modules.items() if e["kind"] != "full"}
        ref_i, ref_0 = adapters[i].meta["base"].get("ref"), adapters[0].meta["base"].get("ref")
        if lora_i and lora_0 and not lora_i & lora_0 and ref_i != ref_0:
            warnings.warn(f"{labels[0]} and {labels[i]} share no module whose base hash could be compared, and "
                          f"name different bases ({ref_0!r} vs {ref_i!r}); the result assumes {ref_0!r}",
                          stacklevel=3)


def _check_same_parents(adapters: Sequence[fmt.Adapter], labels: Sequence[str]) -> None:
    """Adapters trained on top of folded parent adapters are deltas from that folded model: parents must agree."""
    ids = [[p.get("id") for p in a.meta.get("parents") or []] for a in adapters]
    for i in range(1, len(adapters)):
        if ids[i] != ids[0]:
            def show(chain: list) -> str:
                return "[" + ", ".join(str(x)[:12] for x in chain) + "]" if chain else "no parent adapters"
            raise BaseMismatchError(
                f"{labels[0]} and {labels[i]} were trained on different bases: on top of {show(ids[0])} vs "
                f"{show(ids[i])}; combine only adapters trained on the same base and parent adapters")


def _check_no_replaced_deltas(adapters: Sequence[fmt.Adapter], labels: Sequence[str]) -> None:
    """A tensor one input replaces (full) while another adds a LoRA update to it has no combined meaning."""
    deltas: dict[str, int] = {}
    for i, a in enumerate(adapters):
        for name, e in a.modules.items():
            if e["kind"] != "full":
                deltas.setdefault(f"{name}.weight", i)
                if e.get("bias"):
                    deltas.setdefault(f"{name}.bias", i)
    for i, a in enumerate(adapters):
        for name, e in a.modules.items():
            if e["kind"] != "full":
                continue
            for p in e["tensors"]:
                key = fmt.tensor_key(name, p)
                if key in deltas:
                    module = repr(name) if name else "'' (the whole model)"
                    raise LrsurgeryError(
                        f"{labels[i]} replaces {key!r} (module {module} trained in full) while "
                        f"{labels[deltas[key]]} adds an update to it; a replacement and an update cannot be "
                        "combined. Pass --drop-full to keep only the LoRA updates")


def _combine_full(name: str, present: list[int], adapters: Sequence[fmt.Adapter], labels: Sequence[str],
                  w: list[float], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Σ w_i T_i for each tensor of a full module; needs the module in every input and Σ w_i = 1."""
    what = f"full module {name!r}" if name else "the whole-model full entry"
    if len(present) < len(adapters):
        missing = [labels[i] for i in range(len(adapters)) if i not in present]
        raise LrsurgeryError(
            f"{what} is in {labels[present[0]]} but not in {', '.join(missing)}: it replaces base tensors whose "
            "values the other adapters do not hold, so it cannot be averaged. Pass --drop-full to leave it out")
    total = math.fsum(w)
    if abs(total - 1.0) > WEIGHT_SUM_TOLERANCE:
        raise LrsurgeryError(
            f"{what} replaces base tensors, so it combines as the weighted average Σ w_i T_i, which needs weights "
            f"summing to 1 (they sum to {total:g}); use --mode mean, weights that sum to 1, or --drop-full")
    entry = adapters[present[0]].modules[name]
    for i in present[1:]:
        other = adapters[i].modules[name]["tensors"]
        if {p: r["shape"] for p, r in other.items()} != {p: r["shape"] for p, r in entry["tensors"].items()}:
            raise ShapeMismatchError(f"{what} holds different tensors or shapes in {labels[present[0]]} and "
                                     f"{labels[i]}; were they trained with the same head size?")
    for p in entry["tensors"]:
        key = fmt.tensor_key(name, p)
        dtype = adapters[present[0]].tensors[key].dtype
        tensors[key] = sum(w[i] * adapters[i].tensors[key].double() for i in present).to(dtype).contiguous()
    return {"kind": "full", "tensors": {p: dict(r) for p, r in entry["tensors"].items()}}


def _combine_update(name: str, present: list[int], adapters: Sequence[fmt.Adapter], w: list[float], exact: bool,
                    rank: int | None, energy: float | None,
                    tensors: dict[str, torch.Tensor]) -> tuple[dict[str, Any], ModuleCombination]:
    """Entry and tensors of one updated module: concatenated factors (exact), a dense sum, or a truncated SVD."""
    entries = [adapters[i].modules[name] for i in present]
    lora = [(i, e) for i, e in zip(present, entries) if e["kind"] == "lora"]
    dense = [(i, e) for i, e in zip(present, entries) if e["kind"] == "delta"]
    with_bias = [i for i, e in lora if e.get("bias")]
    if exact and dense and with_bias:
        raise LrsurgeryError(f"module {name!r}: the exact sum of a dense (LTE) update and a LoRA input with Δb "
                             "has no entry kind in the format; use an SVD mode (linear, svd, or mean with --rank)")
    first = entries[0]
    fifo = first["fan_in_fan_out"]
    dtype = torch.float32
    for i, e in zip(present, entries):
        for part in (("lora_A", "lora_B") if e["kind"] == "lora" else ("delta",)):
            dtype = torch.promote_types(dtype, adapters[i].tensors[f"{name}.{part}"].dtype)
    # Concatenate along the rank with w_i·s_i folded into B: [B_1' | B_2'] [A_1; A_2] = Σ w_i s_i B_i A_i.
    a = torch.cat([adapters[i].tensors[f"{name}.lora_A"].double() for i, _ in lora]) if lora else None
    b = torch.cat([adapters[i].tensors[f"{name}.lora_B"].double() * (w[i] * e["scaling"]) for i, e in lora],
                  dim=1) if lora else None
    ranks: list[int | str | None] = [None] * len(adapters)
    for i, e in zip(present, entries):
        ranks[i] = e["rank"] if e["kind"] == "lora" else "dense"
    want = rank if rank is not None or energy is not None else max((e["rank"] for _, e in lora), default=None)
    if not exact and want is None and energy is None:
        raise LrsurgeryError(f"module {name!r} has only dense (LTE) updates, so there is no input rank to keep: "
                             "give --rank R")
    record = {"in_features": first["in_features"], "out_features": first["out_features"], "fan_in_fan_out": fifo,
              "dtype": fmt.dtype_name(dtype), "base_tensors": {"weight": dict(first["base_tensors"]["weight"])}}
    k, kept, err = None, 1.0, 0.0
    if dense:  # a dense input: work with the [out, in] sum itself
        total = sum(w[i] * _out_in(adapters[i].tensors[f"{name}.delta"].double(), fifo) for i, _ in dense)
        if lora:
            total = total + b @ a
        if exact:
            entry: dict[str, Any] = {"kind": "delta", **record}
            tensors[f"{name}.delta"] = (total.T if fifo else total).to(dtype).contiguous()
        else:
            a, b, k, kept, err = svd_factors(total, want, energy)
    elif exact:
        k = a.shape[0]
    else:
        a, b, k, kept, err = svd_of_product(b, a, want, energy)
    if k is not None:
        entry = {"kind": "lora", "rank": k, "alpha": float(k), "rslora": False, "scaling": 1.0, **record}
        tensors[f"{name}.lora_A"] = a.to(dtype).contiguous()
        tensors[f"{name}.lora_B"] = b.to(dtype).contiguous()
    if with_bias:  # Δb is not scaled by s: it adds to the output as is
        entry["bias"] = True
        tensors[f"{name}.lora_bias"] = sum(w[i] * adapters[i].tensors[f"{name}.lora_bias"].double()
                                           for i in with_bias).to(dtype).contiguous()
    return entry, ModuleCombination(name, entry["kind"], ranks, k, kept, err)


def _out_in(delta: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    """A stored dense ΔW in the (out, in) orientation LoRA factors use (Conv1D stores [in, out])."""
    return delta.T if fan_in_fan_out else delta


def svd_of_product(b: torch.Tensor, a: torch.Tensor, rank: int | None,
                   energy: float | None) -> tuple[torch.Tensor, torch.Tensor, int, float, float]:
    """(A, B, k, retained energy, error) of the truncated SVD of B A, without forming the out×in product.

    With reduced QRs B = Q_b R_b and Aᵀ = Q_a R_a, B A = Q_b (R_b R_aᵀ) Q_aᵀ: the singular values of
    B A are those of the small core R_b R_aᵀ (at most Σ r_i square), whose factors map back through Q_b, Q_a.
    """
    qb, rb = torch.linalg.qr(b.double())
    qa, ra = torch.linalg.qr(a.double().T)
    core_a, core_b, k, kept, err = svd_factors(rb @ ra.T, rank, energy)
    return core_a.double() @ qa.T, qb @ core_b.double(), k, kept, err
