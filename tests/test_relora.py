"""ReLoRA: exact merge-and-restart, exact total adapter, optimizer pruning, the jagged cosine LR."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import lrsurgery
from lrsurgery.errors import LrsurgeryError
from lrsurgery.layers.lora import LoRALinear
from lrsurgery.train.relora import ReLoRAConfig, ReLoRASchedule, jagged_cosine, merge_and_reinit, prune_state


def tiny_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8))


def lora_mlp(rank: int = 4) -> nn.Module:
    model = tiny_mlp()
    lrsurgery.inject(model, rank=rank, alpha=2 * rank, targets=["0", "2"])
    for layer in lrsurgery.lora_modules(model).values():
        nn.init.normal_(layer.lora_B, std=0.1)
    return model


def test_logits_identical_across_merge_and_reinit():
    model = lora_mlp()
    x = torch.randn(5, 16)
    with torch.no_grad():
        before = model(x)
        merge_and_reinit(model)
        after = model(x)
    assert (before - after).abs().max() <= 1e-5
    for layer in lrsurgery.lora_modules(model).values():
        assert torch.count_nonzero(layer.lora_B) == 0
        # A is re-initialized kaiming-uniform, not zero (the reference's bug #18): B gets gradients at once
        assert torch.count_nonzero(layer.lora_A) == layer.lora_A.numel()
        assert layer.lora_A.abs().max() <= 1 / math.sqrt(layer.in_features)
    model(x).sum().backward()
    assert all(layer.lora_B.grad.abs().sum() > 0 for layer in lrsurgery.lora_modules(model).values())


def test_total_change_is_an_exact_adapter_on_the_original_base(tmp_path):
    model = lora_mlp(rank=2)
    original = tiny_mlp()
    x = torch.randn(7, 16)
    for _ in range(3):  # three restarts, then a live adapter on top
        merge_and_reinit(model)
        for layer in lrsurgery.lora_modules(model).values():
            nn.init.normal_(layer.lora_B, std=0.1)
    lrsurgery.save_adapter(model, tmp_path / "a.safetensors")
    adapter = lrsurgery.load_adapter(tmp_path / "a.safetensors")
    entry = adapter.modules["0"]
    assert entry["rank"] == 8 and entry["folded_rank"] == 6 and entry["scaling"] == 1.0
    # the adapter names the original base: it applies to it, and reproduces the trained model
    lrsurgery.apply_adapter(original, adapter)
    with torch.no_grad():
        assert (original(x) - model(x)).abs().max() <= 1e-5
    # applied onto a layer of the training rank it restores W + history and the live factors
    resumed = tiny_mlp()
    lrsurgery.inject(resumed, rank=2, alpha=4, targets=["0", "2"])
    lrsurgery.apply_adapter(resumed, adapter, trainable=True)
    live, restored = lrsurgery.lora_modules(model)["0"], lrsurgery.lora_modules(resumed)["0"]
    assert torch.allclose(restored.lora_B, live.lora_B, atol=1e-7) and torch.equal(restored.lora_A, live.lora_A)
    assert restored.folded_A.shape == (6, 16)
    with torch.no_grad():
        assert (resumed(x) - model(x)).abs().max() <= 1e-5


def test_magnitude_pruning_zeroes_exactly_the_ratio_of_smallest_entries():
    p = nn.Parameter(torch.zeros(40, 25))
    opt = torch.optim.AdamW([p])
    torch.manual_seed(0)
    opt.state[p] = {"step": torch.tensor(3.0), "exp_avg": torch.randn(40, 25), "exp_avg_sq": torch.rand(40, 25)}
    m = opt.state[p]["exp_avg"].clone()
    keep = m.abs() > m.abs().flatten().sort().values[899]  # the largest 10% of |exp_avg|
    fraction = prune_state(opt, [p], 0.9, "magnitude")
    assert fraction == 0.9
    for key in ("exp_avg", "exp_avg_sq"):  # one mask for both moments: no m / ε blow-up
        t = opt.state[p][key]
        assert torch.count_nonzero(t) == 100
        assert torch.equal(t != 0, keep)
    assert opt.state[p]["step"].item() == 3.0


@pytest.mark.parametrize("mode, ratio", [("random", 0.75), ("reset", 0.3)])
def test_random_and_reset_pruning(mode, ratio):
    p = nn.Parameter(torch.zeros(200, 100))
    opt = torch.optim.AdamW([p])
    opt.state[p] = {"exp_avg": torch.randn(200, 100) + 5, "exp_avg_sq": torch.rand(200, 100) + 1}
    fraction = prune_state(opt, [p], ratio, mode, torch.Generator().manual_seed(0))
    expected = 1.0 if mode == "reset" else ratio
    assert abs(fraction - expected) < 0.01
    zeros = sum(int((opt.state[p][k] == 0).sum()) for k in ("exp_avg", "exp_avg_sq"))
    assert zeros == round(fraction * 40000)
    assert torch.equal(opt.state[p]["exp_avg"] == 0, opt.state[p]["exp_avg_sq"] == 0)


def reference_lr(t: int, total: int, warmup: int, every: int, rewarm: int, floor: float) -> float:
    """The jagged cosine written out independently, step by step."""
    def cos_at(s):
        progress = (s - warmup) / (total - warmup)
        progress = min(1.0, max(0.0, progress))
        return floor + (1 - floor) * (1 + math.cos(math.pi * progress)) / 2
    if t < warmup:
        return t / warmup
    cycle_start = (t // every) * every
    if cycle_start > 0 and t - cycle_start < rewarm:
        return (t - cycle_start) / rewarm * cos_at(cycle_start + rewarm)
    return cos_at(t)


def test_jagged_cosine_equals_the_formula():
    cfg = ReLoRAConfig(restart_every=50, restart_warmup=10, warmup=20, min_lr_ratio=0.1)
    curve = [jagged_cosine(t, 200, cfg) for t in range(200)]
    assert curve == [reference_lr(t, 200, 20, 50, 10, 0.1) for t in range(200)]
    assert curve[0] == 0.0 and curve[20] == 1.0
    assert curve[50] == 0.0 and curve[100] == 0.0 and curve[150] == 0.0  # each restart re-warms from zero
    assert curve[60] == pytest.approx(reference_lr(60, 200, 20, 50, 10, 0.1))
    assert min(curve[21:]) >= 0.0 and curve[199] == pytest.approx(0.1, abs=1e-3)


def test_schedule_restarts_on_time_and_sets_lr():
    model = lora_mlp()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=0.1)
    cfg = ReLoRAConfig(restart_every=4, restart_warmup=2, warmup=2, prune=0.5)
    sched = ReLoRASchedule(model, opt, cfg, total=12)
    events = []
    torch.manual_seed(0)
    for step in range(1, 13):
        assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * jagged_cosine(step - 1, 12, cfg))
        model(torch.randn(3, 16)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        event = sched.after_step(step)
        if event:
            events.append(event)
    assert [e["step"] for e in events] == [4, 8]  # no restart after the last step
    assert all(e["pruned"] == 0.5 for e in events)
    assert lrsurgery.lora_modules(model)["0"].folded_A.shape[0] == 8


def test_schedule_needs_lora_and_valid_config():
    model = tiny_mlp()
    with pytest.raises(LrsurgeryError, match="needs LoRA"):
        ReLoRASchedule(model, torch.optim.AdamW(model.parameters()), ReLoRAConfig(), total=10)
    with pytest.raises(LrsurgeryError, match="restart-warmup"):
        ReLoRAConfig(restart_every=10, restart_warmup=10)
    with pytest.raises(LrsurgeryError, match="prune-mode"):
        ReLoRAConfig(prune_mode="magic")


def test_lora_layer_fold_keeps_output(tmp_path):
    layer = LoRALinear(nn.Linear(6, 4), rank=2, alpha=4)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(3, 6)
    with torch.no_grad():
        y = layer(x)
        layer.fold()
        assert (layer(x) - y).abs().max() <= 1e-6


def test_full_rank_warm_start_then_relora(digits_vit_dir, tmp_path):
    """The warm-start workflow: train in full, merge into a new base, run ReLoRA on it."""
    from lrsurgery.ops.merge import merge_files
    from lrsurgery.run import create_run, open_run, train_run
    from lrsurgery.train.loop import TrainConfig
    create_run(str(digits_vit_dir), tmp_path / "warm", method="full")
    train_run(tmp_path / "warm", "digits:5-9", TrainConfig(steps=3, batch_size=16, progress=False))
    merge_files(str(digits_vit_dir), tmp_path / "warm" / "adapter.safetensors", tmp_path / "warm-base")
    warm = lrsurgery.load_model(str(tmp_path / "warm-base")).eval()
    trained_full = open_run(tmp_path / "warm").model.eval()
    x = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(warm(x), trained_full(x))  # the warm base is exactly the full run's model
    create_run(str(tmp_path / "warm-base"), tmp_path / "relora", rank=2, targets="preset", train="head")
    cfg = ReLoRAConfig(restart_every=2, restart_warmup=1, warmup=1)
    train_run(tmp_path / "relora", "digits:5-9", TrainConfig(steps=6, batch_size=16, relora=cfg, progress=False))
    adapter = lrsurgery.load_adapter(tmp_path / "relora" / "adapter.safetensors")
    assert adapter.modules["blocks.0.attn.qkv"]["folded_rank"] == 4  # restarts after steps 2 and 4
    # the ReLoRA adapter names the warm base, not the original one
    lrsurgery.check_base(lrsurgery.load_model(str(tmp_path / "warm-base")), adapter)
    with pytest.raises(lrsurgery.LrsurgeryError, match="other base weights"):
        lrsurgery.check_base(lrsurgery.load_model(str(digits_vit_dir)), adapter)
