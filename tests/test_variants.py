"""Every integrated layer variant × every optimizer (× ReLoRA where it applies): trains, saves, extracts, merges."""

from __future__ import annotations

import pytest
import torch

import lrsurgery
from lrsurgery.ops.extract import extract_from_run
from lrsurgery.ops.merge import merge_files
from lrsurgery.optim import OptimConfig
from lrsurgery.run import create_run, open_run, train_run
from lrsurgery.train.data import build_data
from lrsurgery.train.loop import TrainConfig, evaluate
from lrsurgery.train.relora import ReLoRAConfig

VARIANTS = {
    "lora": dict(rank=8, alpha=16),
    "velora": dict(method="velora", groups=8),
    "lora+velora": dict(rank=8, alpha=16, velora_groups=8),
    "lte": dict(method="lte", rank=8, alpha=16, heads=4, merge_every=3),
}
LR = {"lte": 1e-3}  # LTE's heads start at √(n/r)-scaled orthogonal A: a smaller step (the reference uses 0.05–0.1×)
OPTIMIZERS = {
    "adamw": OptimConfig(name="adamw"),
    "galore": OptimConfig(name="galore", rank=4, update_gap=5, scale=1.0),
    "flora": OptimConfig(name="flora", rank=4, kappa=5),
}
CASES = [(v, o, False) for v in VARIANTS for o in OPTIMIZERS] + [("lora", "adamw", True), ("lora+velora", "flora", True)]


@pytest.mark.parametrize("variant, optimizer, relora", CASES)
def test_variant_with_optimizer(digits_vit_dir, tmp_path, variant, optimizer, relora):
    kwargs = dict(VARIANTS[variant])
    if optimizer != "adamw" and variant != "velora":
        kwargs["rank"] = 8  # LoRA factors 8 × 32: GaLore/Flora compress them at rank 4
    create_run(str(digits_vit_dir), tmp_path / "run", targets=["mlp.fc1", "mlp.fc2"], train="head", seed=2,
               **kwargs)
    model = open_run(tmp_path / "run").model
    data = build_data("digits:5-9", image_size=(16, 16), in_chans=1, seed=0)
    before = evaluate(model, data.eval, data.task, torch.device("cpu"))["loss"]
    config = TrainConfig(steps=12, batch_size=32, lr=LR.get(variant, 3e-3), optim=OPTIMIZERS[optimizer], progress=False,
                         relora=ReLoRAConfig(restart_every=4, restart_warmup=1, warmup=1) if relora else None)
    result = train_run(tmp_path / "run", "digits:5-9", config)
    assert result.eval["loss"] < before, (before, result.eval)
    # save → extract → merge: the merged model computes what the trained one does
    path, _ = extract_from_run(tmp_path / "run", tmp_path / "a.safetensors")
    merged_dir = merge_files(str(digits_vit_dir), path, tmp_path / "merged")
    trained = open_run(tmp_path / "run").model.eval()
    merged = lrsurgery.load_model(str(merged_dir)).eval()
    x = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        assert (trained(x) - merged(x)).abs().max() <= 1e-5
