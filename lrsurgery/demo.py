"""The README's main job, offline on CPU: adapt a small "pretrained" ViT to a new domain, LoRA vs full.

1. A small timm ViT is trained on handwritten digits 0–4 (scikit-learn's real digits): the stand-in
   for an ImageNet backbone. It is saved as a timm model directory: the base.
2. LoRA runs at several ranks (targets: the ViT preset, plus the head trained in full) and one full
   fine-tune adapt the base to digits 5–9: the new domain.
3. The best LoRA adapter is extracted as a file and merged into the base; the merged model must give
   the adapted model's predictions.
Every row is measured in this run: parameters, memory (weights + grads + optimizer state + saved
activations, counted in bytes at the first step), eval accuracy on held-out digits, wall time.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import timm
import torch

from lrsurgery.adapter import load_adapter
from lrsurgery.models import input_config, load_model, save_model
from lrsurgery.ops.merge import merge_files
from lrsurgery.run import ADAPTER, create_run, open_run, train_run
from lrsurgery.train.data import build_data
from lrsurgery.train.loop import TrainConfig, evaluate, train

# A ViT small enough to train in seconds on 2 CPU cores, large enough that LoRA ranks matter.
VIT_ARGS = dict(img_size=16, patch_size=4, in_chans=1, embed_dim=96, depth=4, num_heads=4, num_classes=5)


@dataclass
class DemoConfig:
    ranks: tuple[int, ...] = (1, 2, 4, 8, 16)
    pretrain_epochs: int = 30
    epochs: int = 12
    batch_size: int = 32
    lr_lora: float = 3e-3
    lr_full: float = 5e-4
    seed: int = 0
    progress: bool = True


def run_demo(out: str | Path | None = None, config: DemoConfig = DemoConfig(),
             echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the demo end to end in ``out`` (a fresh temp dir by default); return the table and checks."""
    out = Path(out) if out else Path(tempfile.mkdtemp(prefix="lrsurgery-demo-"))
    out.mkdir(parents=True, exist_ok=True)
    base_dir = out / "base"
    echo(f"[1/4] pre-training the base ViT on digits 0-4 → {base_dir}")
    base_acc = _pretrain(base_dir, config)
    echo(f"      base accuracy on held-out digits 0-4: {base_acc:.3f}")
    rows = []
    for rank in config.ranks:
        echo(f"[2/4] LoRA rank {rank} on digits 5-9")
        rows.append(_adapt(base_dir, out / f"lora-r{rank}", config, method="lora", rank=rank))
    echo("[3/4] full fine-tuning on digits 5-9")
    rows.append(_adapt(base_dir, out / "full", config, method="full", rank=0))
    best = max((r for r in rows if r["method"] == "lora"), key=lambda r: r["accuracy"])
    echo(f"[4/4] extracting and merging the best adapter (rank {best['rank']})")
    checks = _extract_and_merge(base_dir, out / f"lora-r{best['rank']}", out, config)
    return {"out": str(out), "base_accuracy": base_acc, "rows": rows, **checks}


def _digits(classes: str, model) -> Any:
    cfg = input_config(model)
    return build_data(f"digits:{classes}", image_size=cfg["image_size"], in_chans=cfg["in_chans"],
                      mean=cfg["mean"], std=cfg["std"], seed=0)


def _pretrain(base_dir: Path, config: DemoConfig) -> float:
    torch.manual_seed(config.seed)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **VIT_ARGS,
                              pretrained_cfg_overlay=dict(mean=(0.5,), std=(0.5,), input_size=(1, 16, 16)))
    data = _digits("0-4", model)
    result = train(model, data, TrainConfig(epochs=config.pretrain_epochs, batch_size=config.batch_size,
                                            lr=1e-3, weight_decay=0.05, seed=config.seed, progress=config.progress))
    save_model(model.cpu(), base_dir, force=True)
    return result.eval["accuracy"]


def _adapt(base_dir: Path, run_dir: Path, config: DemoConfig, method: str, rank: int) -> dict[str, Any]:
    kwargs = dict(method=method, num_classes=VIT_ARGS["num_classes"], seed=config.seed, force=True)
    if method == "lora":
        kwargs.update(rank=rank, alpha=float(2 * rank), targets="preset", train="head")
    run, report = create_run(str(base_dir), run_dir, **kwargs)
    lr = config.lr_lora if method == "lora" else config.lr_full
    start = time.perf_counter()
    result = train_run(run_dir, "digits:5-9", TrainConfig(epochs=config.epochs, batch_size=config.batch_size,
                                                           lr=lr, seed=config.seed, progress=config.progress))
    mem = result.memory
    return {"method": method, "rank": rank or None,
            "trainable_params": report.trainable_params, "total_params": report.total_params,
            "memory_bytes": mem.total if mem else None, "memory": mem.as_dict() if mem else None,
            "accuracy": result.eval["accuracy"], "seconds": round(time.perf_counter() - start, 2),
            "adapter_bytes": (run_dir / ADAPTER).stat().st_size}


@torch.no_grad()
def _extract_and_merge(base_dir: Path, run_dir: Path, out: Path, config: DemoConfig) -> dict[str, Any]:
    adapter_path = out / "adapter.safetensors"
    adapter = load_adapter(run_dir / ADAPTER)
    from lrsurgery import format as fmt
    fmt.write(adapter_path, adapter, force=True)
    merged_dir = merge_files(str(base_dir), adapter_path, out / "merged", force=True)
    adapted = open_run(run_dir).model.eval()
    merged = load_model(str(merged_dir)).eval()
    data = _digits("5-9", merged)
    images = torch.stack([data.eval[i][0] for i in range(len(data.eval))])
    max_diff = float((adapted(images) - merged(images)).abs().max())
    merged_acc = evaluate(merged, data.eval, data.task, torch.device("cpu"))["accuracy"]
    return {"adapter": str(adapter_path), "adapter_file_bytes": adapter_path.stat().st_size,
            "merged": str(merged_dir), "merged_accuracy": merged_acc, "merge_max_abs_diff": max_diff}
