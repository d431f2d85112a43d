"""Training curves from a run's metrics.jsonl, as a PNG: loss per step, eval metrics, LR and restarts."""

from __future__ import annotations

import json
import os
from pathlib import Path

from lrsurgery.errors import LrsurgeryError
from lrsurgery.format import atomic_write


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The records of a metrics.jsonl file (clear errors for a missing or corrupt file)."""
    path = Path(path)
    if not path.is_file():
        raise LrsurgeryError(f"{path} does not exist: train the run first (lrsurgery train RUN_DIR --data ...)")
    records = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            raise LrsurgeryError(f"{path}, line {i}: not JSON; the file is corrupt")
    return records


def plot_run(run_dir: str | os.PathLike, out: str | os.PathLike | None = None, *, force: bool = True) -> Path:
    """Write the run's curves to ``out`` (default RUN_DIR/curves.png) and return its path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    records = read_metrics(run_dir / "metrics.jsonl")
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if any(k.startswith("eval_") for k in r)]
    if not steps:
        raise LrsurgeryError(f"{run_dir}: no training steps logged yet")
    eval_keys = sorted({k for r in evals for k in r if k.startswith("eval_")})
    panels = 2 + bool(eval_keys)
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 3.6), constrained_layout=True)
    ax = axes[0]
    ax.plot([r["step"] for r in steps], [r["loss"] for r in steps], lw=1, label="train loss")
    if "eval_loss" in eval_keys:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval loss")
    ax.set(xlabel="step", ylabel="loss", title="loss")
    ax.legend()
    ax = axes[1]
    ax.plot([r["step"] for r in steps], [r.get("lr", float("nan")) for r in steps], lw=1)
    for r in steps:
        if "restart" in r:
            ax.axvline(r["step"], color="grey", ls=":", lw=0.8)
    ax.set(xlabel="step", ylabel="learning rate", title="learning rate (dotted: ReLoRA restarts)")
    if eval_keys:
        ax = axes[2]
        for k in (k for k in eval_keys if k != "eval_loss"):
            ax.plot([r["step"] for r in evals], [r[k] for r in evals], "o-", label=k[5:])
        ax.set(xlabel="step", title="evaluation")
        ax.legend()
    out = Path(out) if out else run_dir / "curves.png"
    if out.exists() and not force:
        from lrsurgery.errors import OutputExistsError
        raise OutputExistsError(f"{out} exists; pass --force to overwrite it")
    atomic_write(out, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
    return out
