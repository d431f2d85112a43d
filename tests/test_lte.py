"""LTE (LoRA-the-Explorer): per-head forward, merge math against a dense reference, modes, init, replicas.

Everything runs in float64 on tiny layers, so the dense reference (explicit per-head weights, a loop over
chunks, AdamW on cloned factors) must agree with the batched layer to ~1e-12.
"""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from lrsurgery.errors import TrainingError
from lrsurgery.layers.lte import HeadReplicas, LTELinear, MergeEvery, lte_parameters, merge_lte

DT = torch.float64


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)  # head inits and data come from the global RNG


def make(n_in: int = 6, n_out: int = 5, heads: int = 4, rank: int = 2, alpha: float = 4.0,
         mode: str = "parallel", bias: bool = True) -> LTELinear:
    base = nn.Linear(n_in, n_out, bias=bias).to(DT)
    base.requires_grad_(False)
    return LTELinear(base, rank=rank, alpha=alpha, heads=heads, mode=mode)


def randomize_factors(layer: LTELinear) -> None:
    with torch.no_grad():
        layer.lora_A.normal_()
        layer.lora_B.normal_()


def dense_delta(a, b, a0, b0, s: float) -> torch.Tensor:
    """mean_h s(B_h A_h − B_h⁰ A_h⁰), one head at a time."""
    return torch.stack([s * (b[h] @ a[h] - b0[h] @ a0[h]) for h in range(a.shape[0])]).mean(0)


def test_init_output_equals_base_exactly() -> None:
    layer = make()
    x = torch.randn(8, 3, 6, dtype=DT)
    expected = F.linear(x, layer.weight, layer.bias)
    layer.train()
    assert torch.equal(layer(x), expected)
    layer.eval()
    assert torch.equal(layer(x), expected)
    mh = make(mode="multihead")
    assert torch.equal(mh(x), F.linear(x, mh.weight, mh.bias))


def test_heads_are_distinct_with_orthogonal_rows() -> None:
    layer = make(n_in=16, heads=4, rank=3)
    a = layer.lora_A.detach()
    assert a.shape == (4, 3, 16) and layer.lora_B.shape == (4, 5, 3)
    eye = torch.eye(3, dtype=DT) * (16 / 3)  # gain √(n/r): A_h A_hᵀ = (n/r)·I
    for h in range(4):
        torch.testing.assert_close(a[h] @ a[h].T, eye, rtol=0, atol=1e-12)
        for g in range(h):
            assert (a[h] - a[g]).abs().max() > 0.1
    assert torch.equal(layer.lora_B, torch.zeros_like(layer.lora_B))
    assert torch.equal(layer.prev_A, a)


def test_wraps_base_parameters_and_ejects_the_same_module() -> None:
    base = nn.Linear(6, 5).to(DT)
    layer = LTELinear(base, rank=2, alpha=4, heads=2)
    assert layer.weight is base.weight and layer.bias is base.bias
    assert set(layer.state_dict()) == {"weight", "bias", "lora_A", "lora_B", "prev_A", "prev_B"}
    assert layer.eject() is base


def test_each_head_runs_its_chunk_through_its_own_delta() -> None:
    layer = make()
    randomize_factors(layer)  # pending deltas differ per head
    x = torch.randn(8, 6, dtype=DT)
    y = layer.train()(x)
    a, b, a0, b0 = layer.lora_A, layer.lora_B, layer.prev_A, layer.prev_B
    for h, xh in enumerate(x.chunk(4)):
        w_h = layer.weight + layer.scaling * (b[h] @ a[h] - b0[h] @ a0[h])
        torch.testing.assert_close(y[2 * h:2 * h + 2], F.linear(xh, w_h, layer.bias), rtol=0, atol=1e-12)
    # evaluation uses only the merged W: pending changes are ignored
    assert torch.equal(layer.eval()(x), F.linear(x, layer.weight, layer.bias))


def test_after_merge_every_head_forward_equals_merged_weight() -> None:
    layer = make().train()
    randomize_factors(layer)
    w_before = layer.weight.clone()
    delta = dense_delta(layer.lora_A, layer.lora_B, layer.prev_A, layer.prev_B, layer.scaling).detach()
    torch.testing.assert_close(layer.delta_weight(), delta, rtol=0, atol=1e-12)
    layer.merge()
    torch.testing.assert_close(layer.weight, w_before + delta, rtol=0, atol=1e-12)
    x = torch.randn(8, 3, 6, dtype=DT)
    y = layer(x)
    assert torch.equal(y, layer.base_forward(x))  # B_h A_h − B_h⁰ A_h⁰ is exactly zero
    for h, xh in enumerate(x.chunk(4)):
        torch.testing.assert_close(y[2 * h:2 * h + 2], F.linear(xh, layer.weight, layer.bias), rtol=0, atol=1e-12)
    assert torch.equal(layer.prev_A, layer.lora_A) and torch.equal(layer.prev_B, layer.lora_B)
    assert layer.prev_A.data_ptr() != layer.lora_A.data_ptr()  # a copy, not an alias


def test_training_with_merges_matches_dense_reference() -> None:
    heads, rank, steps, every = 4, 2, 7, 3
    layer = make(heads=heads, rank=rank).train()
    s = layer.scaling
    # the reference: cloned factors, explicit per-head weights, a dense merge
    a_ref = layer.lora_A.detach().clone().requires_grad_(True)
    b_ref = layer.lora_B.detach().clone().requires_grad_(True)
    a0, b0, w, bias = a_ref.detach().clone(), b_ref.detach().clone(), layer.weight.clone(), layer.bias.clone()
    w0_start = w.clone()
    opt = torch.optim.AdamW([layer.lora_A, layer.lora_B], lr=0.05, weight_decay=0.01)
    opt_ref = torch.optim.AdamW([a_ref, b_ref], lr=0.05, weight_decay=0.01)
    schedule = MergeEvery(layer, every)
    data = [(torch.randn(8, 6, dtype=DT), torch.randn(8, 5, dtype=DT)) for _ in range(steps)]
    for step, (x, t) in enumerate(data, start=1):
        opt.zero_grad()
        F.mse_loss(layer(x), t, reduction="sum").backward()
        opt.step()
        schedule.after_step(step)

        opt_ref.zero_grad()
        ys = [F.linear(xh, w + s * (b_ref[h] @ a_ref[h] - b0[h] @ a0[h]), bias) for h, xh in enumerate(x.chunk(heads))]
        F.mse_loss(torch.cat(ys), t, reduction="sum").backward()
        opt_ref.step()
        if step % every == 0:
            with torch.no_grad():
                w += dense_delta(a_ref, b_ref, a0, b0, s)
                a0, b0 = a_ref.detach().clone(), b_ref.detach().clone()

    assert schedule.merges == steps // every
    torch.testing.assert_close(layer.lora_A, a_ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(layer.lora_B, b_ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(layer.weight, w, rtol=0, atol=1e-10)
    torch.testing.assert_close(layer.prev_B, b0, rtol=0, atol=1e-10)
    assert (layer.weight != w0_start).any()  # the merges changed W


def test_multihead_mode_equals_dense_sum_and_merge_keeps_output() -> None:
    layer = make(mode="multihead")
    assert layer.prev_A is None and layer.prev_B is None
    randomize_factors(layer)
    x = torch.randn(5, 6, dtype=DT)  # every head sees the whole batch: no divisibility needed
    dense = layer.weight + layer.scaling * sum(layer.lora_B[h] @ layer.lora_A[h] for h in range(4))
    expected = F.linear(x, dense, layer.bias).detach()
    torch.testing.assert_close(layer.train()(x), expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(layer.eval()(x), expected, rtol=0, atol=1e-12)
    layer.merge()  # W ← W + s Σ B_h A_h, B ← 0
    torch.testing.assert_close(layer.weight, dense.detach(), rtol=0, atol=1e-12)
    assert torch.equal(layer.lora_B, torch.zeros_like(layer.lora_B))
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-12)


def test_batch_not_divisible_by_heads_raises() -> None:
    layer = make(heads=4).train()
    with pytest.raises(TrainingError, match=r"batch size 6.*H=4"):
        layer(torch.randn(6, 6, dtype=DT))
    layer.eval()(torch.randn(6, 6, dtype=DT))  # evaluation does not split the batch
    with pytest.raises(TrainingError, match=r"batch size 3.*H=2"):
        HeadReplicas(nn.LayerNorm(6), heads=2).train()(torch.randn(3, 6))


def test_conv1d_fan_in_fan_out() -> None:
    base = Conv1D(5, 6).to(DT)  # nf=out=5, nx=in=6: weight stored [in, out]
    with torch.no_grad():
        base.bias.normal_()
    base.requires_grad_(False)
    layer = LTELinear(base, rank=2, alpha=4, heads=2).train()
    assert (layer.in_features, layer.out_features, layer.fan_in_fan_out) == (6, 5, True)
    x = torch.randn(4, 3, 6, dtype=DT)
    ref = base(x)
    assert torch.equal(layer(x), ref)
    randomize_factors(layer)
    delta = dense_delta(layer.lora_A, layer.lora_B, layer.prev_A, layer.prev_B, layer.scaling).detach()  # [out, in]
    y = layer(x)
    for h, xh in enumerate(x.chunk(2)):
        w_h = layer.weight.T + layer.scaling * (layer.lora_B[h] @ layer.lora_A[h] - layer.prev_B[h] @ layer.prev_A[h])
        torch.testing.assert_close(y[2 * h:2 * h + 2], F.linear(xh, w_h, layer.bias), rtol=0, atol=1e-12)
    w_before = layer.weight.clone()
    layer.merge()
    torch.testing.assert_close(layer.weight, w_before + delta.T, rtol=0, atol=1e-12)
    torch.testing.assert_close(layer(x), x @ layer.weight + layer.bias, rtol=0, atol=1e-12)
    assert layer.eject() is base and torch.equal(base(x), layer.base_forward(x))


def test_head_replicas_route_chunks_and_merge_averages() -> None:
    lin = nn.Linear(4, 3).to(DT)
    rep = HeadReplicas(lin, heads=3).train()
    assert rep.replicas[0] is lin
    with torch.no_grad():
        for m in rep.replicas:
            m.weight.normal_()
            m.bias.normal_()
    x = torch.randn(6, 4, dtype=DT)
    y = rep(x)
    for h, m in enumerate(rep.replicas):
        assert torch.equal(y[2 * h:2 * h + 2], m(x[2 * h:2 * h + 2]))
    assert torch.equal(rep.eval()(x), lin(x))
    mean_w = torch.stack([m.weight.detach() for m in rep.replicas]).mean(0)
    mean_b = torch.stack([m.bias.detach() for m in rep.replicas]).mean(0)
    assert merge_lte(nn.Sequential(rep)) == 1
    for m in rep.replicas:
        torch.testing.assert_close(m.weight, mean_w, rtol=0, atol=1e-14)
        assert torch.equal(m.weight, rep.replicas[0].weight) and torch.equal(m.bias, rep.replicas[0].bias)
    torch.testing.assert_close(lin.bias, mean_b, rtol=0, atol=1e-14)
    assert all(m.weight is not lin.weight for m in rep.replicas[1:])


def adam_step(model: nn.Module, x: torch.Tensor) -> torch.optim.Optimizer:
    opt = torch.optim.AdamW(lte_parameters(model), lr=0.01)
    model(x).square().sum().backward()
    opt.step()
    model(x).square().sum().backward()  # B is nonzero now: both factors get state
    opt.step()
    return opt


@pytest.mark.parametrize("reset", [False, True])
def test_optimizer_state_kept_across_merges_or_zeroed(reset: bool) -> None:
    model = nn.Sequential(make(), nn.Tanh(), make(n_in=5, n_out=3)).train()
    opt = adam_step(model, torch.randn(8, 6, dtype=DT))
    params = lte_parameters(model)
    assert len(params) == 4
    before = {id(p): {k: v for k, v in opt.state[p].items()} for p in params}
    values = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in params}
    schedule = MergeEvery(model, 2, opt, reset_optimizer=reset)
    assert schedule.after_step(1) is None
    assert schedule.after_step(2) == {"step": 2, "merge": 1, "modules": 2}
    for p in params:
        state = opt.state[p]
        for k, v in state.items():
            assert v is before[id(p)][k]  # the same tensors, never replaced
            if k == "step" or not reset:
                assert torch.equal(v, values[id(p)][k])
            else:
                assert values[id(p)][k].abs().max() > 0 and torch.equal(v, torch.zeros_like(v))


def test_merge_every_needs_lte_layers_and_an_optimizer_to_reset() -> None:
    with pytest.raises(TrainingError, match="no LTE layers"):
        MergeEvery(nn.Linear(2, 2), 2)
    with pytest.raises(TrainingError, match="needs the optimizer"):
        MergeEvery(make(), 2, reset_optimizer=True)


def test_parallel_lte_trains_full_rank_through_low_rank_heads() -> None:
    n, heads, rank = 8, 4, 2
    layer = make(n_in=n, n_out=n, heads=heads, rank=rank, alpha=2.0, bias=False).train()
    w0 = layer.weight.clone()
    target = torch.randn(n, n, dtype=DT)  # full-rank regression target
    x = torch.randn(64, n, dtype=DT)
    y = x @ target.T
    opt = torch.optim.Adam(lte_parameters(layer), lr=0.02)
    schedule = MergeEvery(layer, 2)

    def loss() -> float:
        with torch.no_grad():
            return F.mse_loss(layer.eval()(x), y).item()

    first = loss()
    layer.train()
    for step in range(1, 301):
        opt.zero_grad()
        F.mse_loss(layer(x), y).backward()
        opt.step()
        schedule.after_step(step)
    last = loss()
    rank_change = int(torch.linalg.matrix_rank(layer.weight - w0))
    print(f"LTE regression loss {first:.3f} → {last:.4f}, rank(W − W0) = {rank_change} (r = {rank})")
    assert last < 0.1 * first
    assert rank_change > rank
