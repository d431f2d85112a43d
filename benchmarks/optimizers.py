"""Optimizer benchmark: lrsurgery's GaLoreAdamW and Flora against galore-torch and flora-opt, in one run.

    python benchmarks/optimizers.py [--quick] [--json]

The weights are plain fp32 ``nn.Parameter``s shaped like one transformer block, each with a seeded
random gradient (no model is downloaded):

    ViT-B/16 (nn.Linear, stored (out, in))   qkv 2304×768  proj 768×768  fc1 3072×768  fc2 768×3072
    GPT-2 124M (Conv1D, stored (in, out);    c_attn 768×2304  attn.c_proj 768×768
                used as stored)              c_fc 768×3072    mlp.c_proj 3072×768

Read as (out, in), GPT-2's block has ViT-B/16's shapes; as stored, its tall and wide matrices
swap, so GaLore's std rule projects them from the other side. State bytes do not depend on the
orientation; step times can. ``--quick`` runs the ViT-B/16 block only, with fewer repeats.

What is measured, ours beside the reference, at rank 128:
1. state bytes after one step: GaLoreAdamW (std, gap 200) beside galore_state_bytes, galore-torch
   and torch AdamW; Flora (β1 0.9, κ 1000) beside flora_state_bytes and flora-opt. Storages are
   counted once each, so a view keeps its whole base alive (as lrsurgery.memory counts), and
   objects in the state are walked too: galore-torch's GaLoreProjector holds ``ortho_matrix``.
2. step time ours / reference: GaLore without a refresh (gap 10⁹) and with one every step (gap 1),
   Flora without a resample (κ 10⁹) and with one every step (κ 1).
3. GaLore refresh: randomized / full SVD time (``Projector.refresh``), and the fraction of a
   gradient's energy ‖proj(G)‖²/‖G‖² each basis keeps, for a Gaussian G (flat spectrum, the hard
   case) and for a G with singular values σ_k ∝ k^-1/2.
4. a low-rank least-squares problem trained with GaLoreAdamW, full vs randomized refresh, same seed.

Timing runs on one thread with ``time.perf_counter``; ours and the reference alternate step by step
and each side's median is taken. The result is the ratio (STYLE.md); absolute times are context.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import logging
import math
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from lrsurgery.memory import format_bytes, state_tensors
from lrsurgery.optim.flora import Flora, flora_state_bytes
from lrsurgery.optim.galore import GaLoreAdamW, Projector, galore_state_bytes

Shape = tuple[int, int]
BLOCKS: dict[str, dict[str, Shape]] = {
    "vit_b16": {"qkv": (2304, 768), "proj": (768, 768), "fc1": (3072, 768), "fc2": (768, 3072)},
    "gpt2": {"c_attn": (768, 2304), "attn.c_proj": (768, 768), "c_fc": (768, 3072), "mlp.c_proj": (3072, 768)},
}
RANK = 128
LR = 1e-3
NEVER = 10**9  # a refresh gap / resample period no benchmark reaches


@dataclass
class Repeats:
    """How many timed steps; the refresh cases (an SVD each) get fewer."""

    steps: int = 21
    refresh_steps: int = 7
    warmup: int = 3   # ≥ 1: GaLore's first step always refreshes
    refresh_warmup: int = 1
    toy_steps: int = 300

    @classmethod
    def quick(cls) -> Repeats:
        return cls(steps=5, refresh_steps=3, warmup=2, refresh_warmup=1, toy_steps=300)


def block_shapes(blocks: dict[str, dict[str, Shape]]) -> dict[str, Shape]:
    """{"block/weight": shape} over the given blocks."""
    return {f"{b}/{w}": shape for b, weights in blocks.items() for w, shape in weights.items()}


# ---------------------------------------------------------------- the references (dev dependencies)


@dataclass
class References:
    galore: type | None = None     # galore_torch.GaLoreAdamW
    flora: type | None = None      # flora_opt.optimizers.torch.Flora
    versions: dict[str, str] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)


def load_references() -> References:
    """Import galore-torch and flora-opt if installed, quietly (their FutureWarnings, bitsandbytes' log)."""
    refs = References()
    bnb_log = logging.getLogger("bitsandbytes")
    level = bnb_log.level
    bnb_log.setLevel(logging.ERROR)  # "Failed to load CPU gemm_4bit_forward…" at import: nothing we use
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            try:
                from galore_torch import GaLoreAdamW as galore
                refs.galore, refs.versions["galore-torch"] = galore, importlib.metadata.version("galore-torch")
            except ImportError as exc:
                refs.missing.append(f"galore-torch ({exc})")
            try:
                from flora_opt.optimizers.torch import Flora as flora
                refs.flora, refs.versions["flora-opt"] = flora, importlib.metadata.version("flora-opt")
            except ImportError as exc:
                refs.missing.append(f"flora-opt ({exc})")
    finally:
        bnb_log.setLevel(level)
    return refs


def make_optimizer(kind: str, p: nn.Parameter, refs: References, rank: int = RANK, gap: int = 200,
                   kappa: int = 1000, svd: str = "full", lr: float = LR, scale: float = 0.25) -> torch.optim.Optimizer:
    """kind: adamw | galore | galore-ref | flora | flora-ref, over the single weight ``p``."""
    group = {"params": [p], "rank": rank, "update_proj_gap": gap, "scale": scale, "proj_type": "std"}
    if kind == "adamw":
        return torch.optim.AdamW([p], lr=lr)
    if kind == "galore":
        return GaLoreAdamW([{**group, "svd": svd}], lr=lr)
    if kind == "galore-ref":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return refs.galore([group], lr=lr, no_deprecation_warning=True)
    if kind == "flora":
        return Flora([p], lr=lr, rank=rank, kappa=kappa, beta1=0.9)
    if kind == "flora-ref":
        return refs.flora([p], lr=lr, rank=rank, kappa=kappa, beta1=0.9)
    raise ValueError(f"unknown optimizer kind {kind!r}")


def weight(shape: Shape, seed: int = 0) -> nn.Parameter:
    """An fp32 weight with a random gradient; the same seed gives the same weight and gradient."""
    gen = torch.Generator().manual_seed(seed)
    p = nn.Parameter(torch.randn(shape, generator=gen) * 0.02)
    p.grad = torch.randn(shape, generator=gen)
    return p


# ---------------------------------------------------------------- 1. state bytes


def state_bytes(opt: torch.optim.Optimizer) -> tuple[int, int]:
    """(resident, views): bytes of the distinct storages behind the state's tensors, and the sum of
    the tensors' own sizes. They differ when a tensor is a slice of a larger one kept alive by it."""
    tensors = list(state_tensors(list(opt.state.values())))
    storages = {(str(t.device), t.untyped_storage().data_ptr()): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values()), sum(t.numel() * t.element_size() for t in tensors)


def _after_one_step(kind: str, shape: Shape, refs: References, rank: int) -> tuple[int, int]:
    p = weight(shape)
    opt = make_optimizer(kind, p, refs, rank=rank)
    opt.step()
    return state_bytes(opt)


def state_bytes_table(shapes: dict[str, Shape], rank: int = RANK, refs: References | None = None) -> list[dict]:
    """One row per weight: state bytes after one step of each optimizer, and the formulas.

    Keys: weight, shape, side (GaLore's), adamw, galore_formula, galore_ours, galore_ref, galore_ref_views,
    flora_formula, flora_ours, flora_ref (reference entries None when it is not installed).
    """
    refs = load_references() if refs is None else refs
    rows = []
    for name, shape in shapes.items():
        row: dict[str, Any] = {"weight": name, "shape": list(shape), "side": Projector(rank).side_for(shape),
                               "adamw": _after_one_step("adamw", shape, refs, rank)[0],
                               "galore_formula": galore_state_bytes(shape, rank),
                               "galore_ours": _after_one_step("galore", shape, refs, rank)[0],
                               "galore_ref": None, "galore_ref_views": None,
                               "flora_formula": flora_state_bytes(shape, rank),
                               "flora_ours": _after_one_step("flora", shape, refs, rank)[0], "flora_ref": None}
        if refs.galore is not None:
            row["galore_ref"], row["galore_ref_views"] = _after_one_step("galore-ref", shape, refs, rank)
        if refs.flora is not None:
            row["flora_ref"] = _after_one_step("flora-ref", shape, refs, rank)[0]
        rows.append(row)
    return rows


# ---------------------------------------------------------------- 2. step time


def _timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def paired_medians(a: Callable[[], Any], b: Callable[[], Any], n: int, warmup: int) -> tuple[float, float]:
    """Median seconds of ``a`` and of ``b`` over n calls each, interleaved (a b, b a, a b, …)."""
    for _ in range(warmup):
        a(), b()
    ta, tb = [], []
    for i in range(n):
        if i % 2:
            tb.append(_timed(b)), ta.append(_timed(a))
        else:
            ta.append(_timed(a)), tb.append(_timed(b))
    return statistics.median(ta), statistics.median(tb)


STEP_CASES = {  # name: (ours, reference, options, refreshes or resamples every step)
    "galore_step": ("galore", "galore-ref", {"gap": NEVER}, False),
    "galore_refresh": ("galore", "galore-ref", {"gap": 1}, True),
    "flora_step": ("flora", "flora-ref", {"kappa": NEVER}, False),
    "flora_resample": ("flora", "flora-ref", {"kappa": 1}, True),
}


def _stepper(opt: torch.optim.Optimizer) -> Callable[[], Any]:
    """One step on the weight's fixed gradient, put back first: flora-opt's step sets ``p.grad = None``
    (it frees the gradient), after which its optimizer would skip the weight and time an empty loop."""
    p = opt.param_groups[0]["params"][0]
    grad = p.grad

    def step() -> None:
        p.grad = grad
        opt.step()
    return step


def step_time_table(shapes: dict[str, Shape], refs: References, repeats: Repeats, rank: int = RANK) -> list[dict]:
    """Per weight and case: ours/reference median step time, and the reference's median in ms."""
    rows = []
    for name, shape in shapes.items():
        row: dict[str, Any] = {"weight": name, "shape": list(shape)}
        for case, (ours, ref, options, every_step) in STEP_CASES.items():
            if getattr(refs, ref.split("-")[0]) is None:
                row[case], row[f"{case}_ref_ms"] = None, None
                continue
            opt_ours = make_optimizer(ours, weight(shape), refs, rank=rank, **options)
            opt_ref = make_optimizer(ref, weight(shape), refs, rank=rank, **options)
            n, warmup = ((repeats.refresh_steps, repeats.refresh_warmup) if every_step
                         else (repeats.steps, repeats.warmup))
            t_ours, t_ref = paired_medians(_stepper(opt_ours), _stepper(opt_ref), n, warmup)
            row[case], row[f"{case}_ref_ms"] = t_ours / t_ref, 1e3 * t_ref
        rows.append(row)
    return rows


# ---------------------------------------------------------------- 3. refresh: full vs randomized SVD


def spectrum_gradient(shape: Shape, decay: float, seed: int = 0) -> torch.Tensor:
    """A matrix with random singular vectors and singular values σ_k = k^-decay."""
    (m, n), gen = shape, torch.Generator().manual_seed(seed)
    k = min(m, n)
    u = torch.linalg.qr(torch.randn(m, k, generator=gen)).Q
    v = torch.linalg.qr(torch.randn(n, k, generator=gen)).Q
    return (u * torch.arange(1, k + 1, dtype=torch.float32).pow(-decay)) @ v.T


def captured_energy(proj: Projector, grad: torch.Tensor) -> float:
    """‖proj(G)‖² / ‖G‖²: the fraction of G's energy in the refreshed basis."""
    low = proj.left.T @ grad if proj.left is not None else grad
    low = low @ proj.right.T if proj.right is not None else low
    return (low.norm() ** 2 / grad.norm() ** 2).item()


def refresh_table(shapes: dict[str, Shape], repeats: Repeats, rank: int = RANK) -> list[dict]:
    """Per weight: randomized/full refresh time, and the energy each basis keeps of two gradients."""
    rows = []
    for name, shape in shapes.items():
        full, rand = Projector(rank, svd="full"), Projector(rank, svd="randomized")
        gauss = weight(shape).grad
        t_full, t_rand = paired_medians(lambda: full.refresh(gauss), lambda: rand.refresh(gauss),
                                        repeats.refresh_steps, repeats.refresh_warmup)
        row: dict[str, Any] = {"weight": name, "shape": list(shape), "side": full.side_for(shape),
                               "rand_over_full_time": t_rand / t_full, "full_ms": 1e3 * t_full,
                               "rand_ms": 1e3 * t_rand}
        for label, grad in (("gauss", gauss), ("decay", spectrum_gradient(shape, 0.5))):
            torch.manual_seed(0)  # svd_lowrank draws its test matrix from the global generator
            full.refresh(grad), rand.refresh(grad)
            row[f"energy_full_{label}"], row[f"energy_rand_{label}"] = (captured_energy(full, grad),
                                                                        captured_energy(rand, grad))
        rows.append(row)
    return rows


# ---------------------------------------------------------------- 4. toy problem


def toy_regression(refs: References, steps: int = 300, seed: int = 0) -> list[dict]:
    """min ‖X Wᵀ − Y‖² / N for W 128×256 and a rank-8 target, GaLore rank 16 refreshing every 25 steps.

    Each run starts from the same W and data and reseeds the global generator (svd_lowrank's).
    """
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1024, 256, generator=gen)
    target = torch.randn(128, 8, generator=gen) @ torch.randn(8, 256, generator=gen) / math.sqrt(8 * 256)
    y = x @ target.T + 0.01 * torch.randn(1024, 128, generator=gen)
    w0 = 0.02 * torch.randn(128, 256, generator=gen)

    def loss_of(w: torch.Tensor) -> torch.Tensor:
        return ((x @ w.T - y) ** 2).mean()

    def run(kind: str, svd: str = "full") -> dict[str, Any]:
        torch.manual_seed(seed)
        w = nn.Parameter(w0.clone())
        opt = make_optimizer(kind, w, refs, rank=16, gap=25, svd=svd, lr=1e-2, scale=1.0)
        initial = loss_of(w).item()
        for _ in range(steps):
            opt.zero_grad()
            loss_of(w).backward()
            opt.step()
        return {"optimizer": kind, "refresh": svd if kind.startswith("galore") else "—",
                "initial_loss": initial, "final_loss": loss_of(w).item()}

    runs = [run("galore", "full"), run("galore", "randomized")]
    if refs.galore is not None:
        runs.append(run("galore-ref", "full"))
    runs.append(run("adamw"))
    for r in runs:
        r["over_ours_full"] = r["final_loss"] / runs[0]["final_loss"]
    return runs


# ---------------------------------------------------------------- output


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def _shape(s: list[int]) -> str:
    return f"{s[0]}×{s[1]}"


_FORMATS: dict[str, Callable[[Any], str]] = {
    "bytes": format_bytes, "ratio": "{:.2f}×".format, "ms": "{:.1f}".format,
    "check": lambda ok: "yes" if ok else "**NO**"}


def _f(kind: str, value: Any) -> str:
    """``value`` formatted as bytes | ratio | ms | check; "—" for a missing (None) one."""
    return "—" if value is None else _FORMATS[kind](value)


def _with_totals(rows: list[dict], keys: list[str]) -> list[dict]:
    """The rows, each block followed by a total row summing ``keys`` (None if any is None)."""
    out: list[dict] = []
    blocks = dict.fromkeys(r["weight"].split("/")[0] for r in rows)
    for block in blocks:
        mine = [r for r in rows if r["weight"].startswith(block + "/")]
        total = {k: None if any(r[k] is None for r in mine) else sum(r[k] for r in mine) for k in keys}
        out += mine + [{"weight": f"**{block} total**", "shape": None, "side": "", **total}]
    return out


def render(result: dict) -> str:
    """The four tables as Markdown, under a line naming the date, torch, mode and references."""
    meta = result["meta"]
    refs = ", ".join(f"{k} {v}" for k, v in meta["references"].items()) or "none installed"
    parts = [f"{meta['date']} · torch {meta['torch']} · {meta['threads']} thread · rank {meta['rank']} · "
             f"{'--quick' if meta['quick'] else 'full'} · references: {refs} · {meta['seconds']:.0f} s"]
    keys = ["adamw", "galore_formula", "galore_ours", "galore_ref", "galore_ref_views", "flora_formula",
            "flora_ours", "flora_ref"]
    rows = _with_totals(result["state_bytes"], keys)

    def shape(r: dict) -> str:
        return "" if r["shape"] is None else _shape(r["shape"])

    def state(r: dict, opt: str, *extra: str) -> list[str]:
        ours, formula, ref = r[f"{opt}_ours"], r[f"{opt}_formula"], r[f"{opt}_ref"]
        return [_f("bytes", r["adamw"]), _f("bytes", formula), _f("bytes", ours), _f("bytes", ref), *extra,
                _f("check", ours == formula), _f("check", None if ref is None else ours <= ref),
                f"{ours / r['adamw']:.3f}"]

    parts.append("### 1. Optimizer state after one step (fp32)\n\nGaLoreAdamW (std):\n\n" + _table(
        ["weight", "shape", "side", "AdamW", "formula", "ours", "galore-torch resident", "galore-torch views",
         "ours == formula", "ours ≤ reference", "ours / AdamW"],
        [[r["weight"], shape(r), r["side"], *state(r, "galore", _f("bytes", r["galore_ref_views"]))] for r in rows]))
    parts.append("Flora (β1 0.9, κ 1000):\n\n" + _table(
        ["weight", "shape", "AdamW", "formula", "ours", "flora-opt", "flora-opt − ours", "ours == formula",
         "ours ≤ reference", "ours / AdamW"],
        [[r["weight"], shape(r), *state(r, "flora", "—" if r["flora_ref"] is None
                                        else f"{r['flora_ref'] - r['flora_ours']} B")] for r in rows]))

    def ratios(r: dict) -> list[str]:
        ms = {case: _f("ms", r[f"{case}_ref_ms"]) for case in STEP_CASES}
        return [*(_f("ratio", r[case]) for case in STEP_CASES), f"{ms['galore_step']} / {ms['galore_refresh']}",
                f"{ms['flora_step']} / {ms['flora_resample']}"]

    parts.append("### 2. Step time, ours / reference (median; < 1 means ours is faster)\n\n" + _table(
        ["weight", "shape", "GaLore step", "GaLore refresh step", "Flora step", "Flora resample step",
         "galore-torch ms (step / refresh)", "flora-opt ms (step / resample)"],
        [[r["weight"], _shape(r["shape"]), *ratios(r)] for r in result["step_time"]]))

    def energy(r: dict, label: str) -> str:
        return f"{r[f'energy_full_{label}']:.3f} / {r[f'energy_rand_{label}']:.3f}"

    def kept(r: dict, label: str) -> str:
        return f"{r[f'energy_rand_{label}'] / r[f'energy_full_{label}']:.3f}"

    parts.append("### 3. GaLore refresh: randomized vs full SVD (ours)\n\n" + _table(
        ["weight", "shape", "side", "randomized / full time", "full ms", "energy kept, Gaussian G (full / rand)",
         "energy kept, σ_k∝k^-½ G (full / rand)", "rand / full energy (Gaussian, k^-½)"],
        [[r["weight"], _shape(r["shape"]), r["side"], _f("ratio", r["rand_over_full_time"]), _f("ms", r["full_ms"]),
          energy(r, "gauss"), energy(r, "decay"), f"{kept(r, 'gauss')}, {kept(r, 'decay')}"]
         for r in result["refresh"]]))
    parts.append(f"### 4. Toy low-rank regression ({meta['toy_steps']} steps, W 128×256, target rank 8, GaLore "
                 "rank 16, gap 25, lr 1e-2, same seed)\n\n" + _table(
                     ["optimizer", "refresh", "initial loss", "final loss", "final / ours-full"],
                     [[r["optimizer"], r["refresh"], f"{r['initial_loss']:.4g}", f"{r['final_loss']:.4g}",
                       f"{r['over_ours_full']:.3f}"] for r in result["toy"]]))
    return "\n\n".join(parts)


def run(quick: bool, log: Callable[[str], None] = lambda s: None) -> dict:
    """All four measurements; ``quick``: the ViT-B/16 block with fewer repeats."""
    start = time.perf_counter()
    refs = load_references()
    for missing in refs.missing:
        log(f"reference not installed, its columns are skipped: {missing}; pip install -e '.[dev]'")
    shapes = block_shapes({"vit_b16": BLOCKS["vit_b16"]} if quick else BLOCKS)
    repeats = Repeats.quick() if quick else Repeats()
    result: dict[str, Any] = {"meta": {
        "date": datetime.date.today().isoformat(), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "rank": RANK, "quick": quick, "references": refs.versions, "toy_steps": repeats.toy_steps,
        "shape_note": "ViT-B/16 nn.Linear (out, in); GPT-2 Conv1D as stored (in, out)"}}
    sections: list[tuple[str, Callable[[], Any]]] = [
        ("state_bytes", lambda: state_bytes_table(shapes, RANK, refs)),
        ("step_time", lambda: step_time_table(shapes, refs, repeats)),
        ("refresh", lambda: refresh_table(shapes, repeats)),
        ("toy", lambda: toy_regression(refs, repeats.toy_steps))]
    for i, (name, measure) in enumerate(sections, 1):
        log(f"{i}/{len(sections)} {name}")
        result[name] = measure()
    result["meta"]["seconds"] = time.perf_counter() - start
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the ViT-B/16 block only, fewer repeats (< 60 s)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of tables")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # stable timings; ours and the reference run on the same one thread
    result = run(args.quick, log=lambda s: print(s, file=sys.stderr, flush=True))
    print(json.dumps(result, indent=2) if args.json else render(result))


if __name__ == "__main__":
    main()
