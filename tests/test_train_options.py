"""Training options that change how steps happen: per-layer updates, compressed accumulation, bf16."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import lrsurgery
from lrsurgery.errors import TrainingError
from lrsurgery.optim import OptimConfig
from lrsurgery.run import create_run, train_run
from lrsurgery.train.loop import TrainConfig


def run(digits_vit_dir: Path, out: Path, optim: OptimConfig, **train) -> dict[str, torch.Tensor]:
    create_run(str(digits_vit_dir), out, method="full", seed=1)
    config = TrainConfig(steps=4, batch_size=16, accumulation=2, lr=1e-3, optim=optim, progress=False, **train)
    result = train_run(out, "digits:5-9", config)
    assert all(torch.isfinite(torch.tensor(r["eval_loss"])) for r in result.history)
    return lrsurgery.load_adapter(out / "adapter.safetensors").tensors


@pytest.mark.parametrize("name", ["adamw", "galore", "flora"])
def test_layerwise_updates_equal_the_whole_model_step(digits_vit_dir, tmp_path, name):
    """One optimizer per parameter stepped in backward, with accumulation 2, equals the usual step."""
    optim = OptimConfig(name=name, rank=4, update_gap=2, kappa=2)
    whole = run(digits_vit_dir, tmp_path / "whole", optim)
    layerwise = run(digits_vit_dir, tmp_path / "layerwise", OptimConfig(**{**optim.as_dict(), "layerwise": True}))
    for k in whole:
        assert torch.allclose(whole[k], layerwise[k], atol=1e-6, rtol=0), k


def test_layerwise_frees_gradients_during_backward(digits_vit_dir, tmp_path):
    create_run(str(digits_vit_dir), tmp_path / "a", method="full", seed=1)
    create_run(str(digits_vit_dir), tmp_path / "b", method="full", seed=1)
    config = TrainConfig(steps=1, batch_size=16, progress=False)
    plain = train_run(tmp_path / "a", "digits:5-9", config)
    config.optim = OptimConfig(layerwise=True)
    freed = train_run(tmp_path / "b", "digits:5-9", config)
    assert plain.memory.grads == 4 * plain.memory.trainable_params  # every fp32 gradient alive at the step
    assert freed.memory.grads == 0  # each gradient was used and freed inside backward


def test_compressed_accumulation_trains(digits_vit_dir, tmp_path):
    tensors = run(digits_vit_dir, tmp_path / "c", OptimConfig(name="adamw", accumulation_rank=4))
    before = lrsurgery.load_model(str(digits_vit_dir)).state_dict()
    assert any(not torch.equal(tensors[k], before[k]) for k in tensors if k in before)


def test_bf16_autocast_trains(digits_vit_dir, tmp_path):
    tensors = run(digits_vit_dir, tmp_path / "bf", OptimConfig(), bf16=True)
    assert all(t.dtype == torch.float32 for t in tensors.values())  # weights stay fp32; only compute is bf16


@pytest.mark.parametrize("optim, train, message", [
    (OptimConfig(layerwise=True), dict(max_grad_norm=1.0), "cannot clip"),
    (OptimConfig(layerwise=True, accumulation_rank=4), {}, "either --layerwise or --accumulation-rank"),
])
def test_refused_combinations(digits_vit_dir, tmp_path, optim, train, message):
    create_run(str(digits_vit_dir), tmp_path / "x", method="full")
    with pytest.raises(TrainingError, match=message):
        train_run(tmp_path / "x", "digits:5-9", TrainConfig(steps=1, batch_size=16, accumulation=2, optim=optim,
                                                            progress=False, **train))
