"""Activation benchmark: what one ViT training step saves for backward, per method, ours beside PEFT, in one run.

    python benchmarks/activations.py [--quick] [--json] [--threads N] [--steps N]

Model: timm ``vit_base_patch16_224`` with random weights (``pretrained=False``, nothing is downloaded),
batch 8, fp32, cross-entropy on random labels. ``--quick``: the same widths with 2 blocks, batch 4
(LTE with H=4 heads needs a batch divisible by 4) and fewer timed steps.

Targets: ``all`` = attn.qkv, attn.proj, mlp.fc1, mlp.fc2 of every block, given to both libraries as those
dotted names (a bare ``proj`` would also match ``patch_embed.proj``, a Conv2d).

    method                ours                                                      PEFT 0.21
    full                  inject(method="full")                                     —
    lora(qkv)  r=8 α=16   inject(method="lora", targets=["attn.qkv"])               LoraConfig(target_modules=["attn.qkv"])
    lora(all)  r=8 α=16   inject(method="lora", targets=all)                        LoraConfig(target_modules=all)
    velora(all) G=32      inject(method="velora", groups=32)  (full-rank weights)   — (PEFT has VeLoRA only on LoRA's A)
    lora+velora(all)      inject(method="lora", velora_groups=32)                   LoraConfig(..., velora_config=VeloraConfig(32))
    lte(all) H=4 r=8      inject(method="lte", heads=4, merge_every=1)               —

Columns, each measured on the first training step of a freshly built model (same seed, same batch):
saved activations (``lrsurgery.memory.measure_step``: storages autograd saves in the forward, each once,
parameters and buffers excluded), AdamW state after that step (``optimizer_state_bytes``), trainable
parameters, and the step time (forward + backward + AdamW step, median of ``--steps`` further steps,
``time.perf_counter``). Each is given as a ratio to full fine-tuning, and ours / PEFT where both exist.

Shared inputs: a target's input that another op saves anyway stays in memory whatever VeLoRA does. This is
measured, not assumed: the frozen model is run once with an input that requires grad (frozen Linears save no
input), and every target whose input storage is among the saved tensors is reported as shared.
Timing is context only, never asserted; the machine is shared, so read time ratios to about ±0.1.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import logging
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import timm
import torch
import torch.nn.functional as F
from torch import nn

from lrsurgery.memory import format_bytes, measure_step
from lrsurgery.optim import OptimConfig, build_optimizer
from lrsurgery.surgery import inject

MODEL = "vit_base_patch16_224"
ALL = ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"]
QKV = ["attn.qkv"]
RANK, ALPHA, GROUPS, HEADS = 8, 16.0, 32, 4
LR = 1e-4


@dataclass
class Setup:
    """Model size and repeats: the full run or ``--quick``."""

    depth: int = 12
    batch: int = 8
    steps: int = 3   # timed steps after the measured one (median)

    @classmethod
    def quick(cls) -> Setup:
        return cls(depth=2, batch=4, steps=2)  # batch 4: the smallest LTE (H=4) accepts


def build_model(setup: Setup, seed: int = 0) -> nn.Module:
    """Random-init ViT-B/16 (``depth`` blocks), in train mode, identical for every method."""
    torch.manual_seed(seed)
    return timm.create_model(MODEL, pretrained=False, depth=setup.depth).train()


def batch(setup: Setup, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(setup.batch, 3, 224, 224, generator=g), torch.randint(0, 1000, (setup.batch,), generator=g)


# ---------------------------------------------------------------- methods


def ours(method: str, targets: list[str] | None = None, **kw: Any) -> Callable[[nn.Module], nn.Module]:
    def apply(model: nn.Module) -> nn.Module:
        inject(model, method=method, targets=targets, **kw)
        return model
    return apply


def peft_lora(targets: list[str], velora: bool = False) -> Callable[[nn.Module], nn.Module]:
    def apply(model: nn.Module) -> nn.Module:
        from peft import LoraConfig, get_peft_model
        extra: dict[str, Any] = {}
        if velora:
            from peft.tuners.lora.config import VeloraConfig
            # batch_average_once and scale 1: ours' defaults (PEFT's default init is batch_average)
            extra["velora_config"] = VeloraConfig(num_groups=GROUPS, scale=1.0, init_type="batch_average_once")
        return get_peft_model(model, LoraConfig(r=RANK, lora_alpha=int(ALPHA), target_modules=targets, **extra))
    return apply


# (row name, key shared by ours and PEFT, library, how to apply)
METHODS: list[tuple[str, str, str, Callable[[nn.Module], nn.Module]]] = [
    ("full", "full", "ours", ours("full")),
    ("lora(qkv) r=8", "lora_qkv", "ours", ours("lora", QKV, rank=RANK, alpha=ALPHA)),
    ("lora(qkv) r=8", "lora_qkv", "peft", peft_lora(QKV)),
    ("lora(all) r=8", "lora_all", "ours", ours("lora", ALL, rank=RANK, alpha=ALPHA)),
    ("lora(all) r=8", "lora_all", "peft", peft_lora(ALL)),
    (f"velora(all) G={GROUPS}", "velora_all", "ours", ours("velora", ALL, groups=GROUPS)),
    (f"lora(all) r=8 + velora(A) G={GROUPS}", "lora_velora_all", "ours",
     ours("lora", ALL, rank=RANK, alpha=ALPHA, velora_groups=GROUPS)),
    (f"lora(all) r=8 + velora(A) G={GROUPS}", "lora_velora_all", "peft", peft_lora(ALL, velora=True)),
    (f"lte(all) H={HEADS} r=8", "lte_all", "ours", ours("lte", ALL, rank=RANK, alpha=ALPHA, heads=HEADS, merge_every=1)),
]


# ---------------------------------------------------------------- measurements


def _key(t: torch.Tensor) -> tuple[str, int]:
    return str(t.device), t.untyped_storage().data_ptr()


def shared_inputs(setup: Setup) -> dict[str, bool]:
    """For each target kind (attn.qkv, …): is its input saved by some other op in block 0?

    The frozen model runs on an input that requires grad, so the graph is built but no frozen Linear saves
    its input; an input that still shows up among the saved tensors is kept alive by someone else.
    """
    model = build_model(setup)
    for p in model.parameters():
        p.requires_grad_(False)
    inputs: dict[str, torch.Tensor] = {}  # held until the end: no storage address is reused meanwhile
    hooks = [model.get_submodule(f"blocks.0.{kind}").register_forward_pre_hook(
        lambda m, args, kind=kind: inputs.__setitem__(kind, args[0])) for kind in ALL]
    saved: set[tuple[str, int]] = set()

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.add(_key(t))
        return t

    x, _ = batch(setup)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x.requires_grad_(True))
    for h in hooks:
        h.remove()
    del out
    return {kind: _key(inputs[kind]) in saved for kind in ALL}


def measure(apply: Callable[[nn.Module], nn.Module], setup: Setup) -> dict[str, Any]:
    """One metered training step (bytes), then ``setup.steps`` timed steps (median seconds)."""
    model = apply(build_model(setup))
    x, y = batch(setup)
    opt = build_optimizer(model, OptimConfig("adamw"), lr=LR)
    report = measure_step(model, lambda: F.cross_entropy(model(x), y), opt)

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        return time.perf_counter() - t0

    times = [step() for _ in range(setup.steps)]
    return {"activations": report.activations, "optimizer_state": report.optimizer_state,
            "trainable_params": report.trainable_params, "total_params": report.total_params,
            "step_s": statistics.median(times), "step_times": times}


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


COLUMNS = ("activations", "optimizer_state", "trainable_params", "step_s")


def add_ratios(rows: list[dict]) -> list[dict]:
    """Each row's columns over full fine-tuning's, and ours over PEFT's for the same configuration."""
    full = next(r for r in rows if r["key"] == "full")
    peft = {r["key"]: r for r in rows if r["library"] == "peft"}
    for r in rows:
        for c in COLUMNS:
            r[f"{c}_vs_full"] = _ratio(r[c], full[c])
            ref = peft.get(r["key"]) if r["library"] == "ours" else None
            r[f"{c}_ours_vs_peft"] = _ratio(r[c], ref[c]) if ref else None
    return rows


def run(setup: Setup, log: Callable[[str], None] = lambda s: None) -> dict:
    start = time.perf_counter()
    try:
        peft_version = importlib.metadata.version("peft")
    except importlib.metadata.PackageNotFoundError:
        peft_version = None
        log("peft is not installed: its rows are skipped (pip install -e '.[dev]')")
    log("shared inputs (block 0)")
    shared = shared_inputs(setup)
    rows = []
    for i, (name, key, library, apply) in enumerate(METHODS, 1):
        if library == "peft" and peft_version is None:
            continue
        log(f"{i}/{len(METHODS)} {library} {name}")
        rows.append({"method": name, "key": key, "library": library, **measure(apply, setup)})
    return {"meta": {"date": datetime.date.today().isoformat(), "torch": torch.__version__,
                     "timm": timm.__version__, "peft": peft_version, "threads": torch.get_num_threads(),
                     "model": MODEL, "depth": setup.depth, "batch": setup.batch, "timed_steps": setup.steps,
                     "rank": RANK, "alpha": ALPHA, "groups": GROUPS, "lte_heads": HEADS,
                     "seconds": time.perf_counter() - start},
            "shared_inputs": shared, "rows": add_ratios(rows)}


# ---------------------------------------------------------------- output


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def _x(v: float | None, digits: int = 3) -> str:
    return "—" if v is None else f"{v:.{digits}f}×"


def render(result: dict) -> str:
    m = result["meta"]
    head = (f"{m['date']} · torch {m['torch']} · timm {m['timm']} · peft {m['peft']} · {m['threads']} thread(s) · "
            f"{m['model']} depth {m['depth']} · batch {m['batch']} · fp32 · AdamW · "
            f"median of {m['timed_steps']} steps · {m['seconds']:.0f} s")
    rows = result["rows"]
    main = _table(
        ["method", "lib", "saved activations", "act / full", "AdamW state", "state / full", "trainable",
         "trainable / full", "step ms", "time / full"],
        [[r["method"], r["library"], format_bytes(r["activations"]), _x(r["activations_vs_full"]),
          format_bytes(r["optimizer_state"]), _x(r["optimizer_state_vs_full"], 4), f"{r['trainable_params']:,}",
          _x(r["trainable_params_vs_full"], 4), f"{r['step_s'] * 1e3:.0f}", _x(r["step_s_vs_full"], 2)]
         for r in rows])
    pairs = [r for r in rows if r["activations_ours_vs_peft"] is not None]
    versus = _table(
        ["method", "activations ours / PEFT", "AdamW state ours / PEFT", "trainable ours / PEFT",
         "time ours / PEFT", "activations ours − PEFT"],
        [[r["method"], _x(r["activations_ours_vs_peft"]), _x(r["optimizer_state_ours_vs_peft"]),
          _x(r["trainable_params_ours_vs_peft"]), _x(r["step_s_ours_vs_peft"], 2),
          format_bytes(r["activations"] - next(p["activations"] for p in rows
                                               if p["library"] == "peft" and p["key"] == r["key"]))]
         for r in pairs])
    shared = ", ".join(f"{k}: {'shared' if v else 'own'}" for k, v in result["shared_inputs"].items())
    return "\n\n".join([head, "#### Per method (ratios vs full fine-tuning)", main,
                        "#### Ours vs PEFT, same configuration", versus,
                        f"Target inputs saved by another op (VeLoRA cannot free them), measured on block 0: {shared}."])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 blocks, batch 4, 2 timed steps (< 60 s)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of tables")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: stable timings)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per method (median)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.getLogger("peft").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="peft")
    setup = Setup.quick() if args.quick else Setup()
    if args.steps:
        setup.steps = args.steps
    result = run(setup, log=lambda s: print(s, file=sys.stderr, flush=True))
    print(json.dumps(result, indent=2) if args.json else render(result))


if __name__ == "__main__":
    main()
