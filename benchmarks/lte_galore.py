"""LTE + GaLore (the poster's future work), measured: LTE heads trained by GaLore vs by AdamW, in one run.

    python benchmarks/lte_galore.py [--steps N] [--json]

Model: a small timm ViT (random init, 16×16 1-channel images, width 64, 4 blocks) trained from scratch on
scikit-learn's digits 5–9 (nothing is downloaded). Every variant starts from the same weights and sees the
same batches (seed 0). LTE: H=4 heads of rank 16 on attn.qkv, attn.proj, mlp.fc1, mlp.fc2, merged every
5 steps, head replicated per LTE head. GaLore projects each head's factor (a [H, m, r] stack is H
matrices, each with its own basis) at rank 4, refreshing every 50 steps.

Columns: optimizer state after training (the trainer's ``optimizer_state_bytes``: every state tensor, including GaLore's
bases), trainable parameters, eval loss/accuracy after the last merge, and the time per step as a ratio to
LTE+AdamW (context only: the machine is shared).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from lrsurgery.optim import OptimConfig
from lrsurgery.surgery import inject
from lrsurgery.train.data import build_data
from lrsurgery.train.loop import TrainConfig, train

TARGETS = ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"]
VARIANTS = {  # name: (inject kwargs, optimizer, learning rate)
    "full + AdamW": (dict(method="full"), OptimConfig(), 1e-3),
    "LoRA r=16 + AdamW": (dict(method="lora", rank=16, alpha=32, targets=TARGETS, train="head"), OptimConfig(), 3e-3),
    "LTE H=4 r=16 + AdamW": (dict(method="lte", rank=16, alpha=32, heads=4, merge_every=5, targets=TARGETS,
                                  train="head"), OptimConfig(), 1e-3),
    "LTE H=4 r=16 + GaLore r=4": (dict(method="lte", rank=16, alpha=32, heads=4, merge_every=5, targets=TARGETS,
                                       train="head"), OptimConfig(name="galore", rank=4, update_gap=50, scale=1.0), 1e-3),
}


def build_model() -> torch.nn.Module:
    import timm
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=4, in_chans=1,
                             embed_dim=64, depth=4, num_heads=4, num_classes=5)


def run(steps: int) -> list[dict]:
    data = build_data("digits:5-9", image_size=(16, 16), in_chans=1, seed=0)
    rows = []
    for name, (kwargs, optim, lr) in VARIANTS.items():
        model = build_model()
        torch.manual_seed(1)
        report = inject(model, **kwargs)
        start = time.perf_counter()
        result = train(model, data, TrainConfig(steps=steps, batch_size=32, lr=lr, optim=optim, progress=False))
        seconds = time.perf_counter() - start
        rows.append({"variant": name, "trainable": report.trainable_params, "optimizer_state": result.memory.optimizer_state,
                     "eval_loss": result.eval["loss"], "eval_accuracy": result.eval["accuracy"],
                     "seconds_per_step": seconds / steps})
    ref = next(r for r in rows if r["variant"].startswith("LTE") and "AdamW" in r["variant"])
    for r in rows:
        r["state_vs_lte_adamw"] = r["optimizer_state"] / ref["optimizer_state"]
        r["time_vs_lte_adamw"] = r["seconds_per_step"] / ref["seconds_per_step"]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = run(args.steps)
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print("| variant | trainable | optimizer state | vs LTE+AdamW | eval loss | eval acc | time/step vs LTE+AdamW |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['trainable']:,} | {r['optimizer_state'] / 1024:,.1f} KiB | "
              f"{r['state_vs_lte_adamw']:.3f}× | {r['eval_loss']:.4f} | {r['eval_accuracy']:.4f} | "
              f"{r['time_vs_lte_adamw']:.2f}× |")


if __name__ == "__main__":
    main()
