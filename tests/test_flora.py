"""Flora and compressed gradient accumulation, checked against flora-opt (torch) and dense computations.

The reference package is imported here only; ``lrsurgery.optim.flora`` must never import it (nor
accelerate or bitsandbytes), which ``test_module_never_imports_the_reference_or_its_dependencies`` pins.
"""

from __future__ import annotations

import ast
import copy
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from lrsurgery.errors import ShapeMismatchError, TrainingError
from lrsurgery.optim import flora as F
from lrsurgery.optim.flora import CompressedAccumulator, Flora, flora_state_bytes

ref = pytest.importorskip("flora_opt.optimizers.torch.flora")

PARITY_ATOL = 1e-6


def tiny_mlp(seed: int = 0, widths: tuple[int, ...] = (64, 32, 64, 64)) -> nn.Sequential:
    """Linear layers with weights 32×64 (wide), 64×32 (tall) and 64×64 by default, tanh between."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
            layers += [nn.Linear(a, b)] + ([nn.Tanh()] if i < len(widths) - 2 else [])
        return nn.Sequential(*layers)


def batches(n: int, d_in: int, d_out: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, d_in, generator=g), torch.randn(8, d_out, generator=g)) for _ in range(n)]


def loss_of(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return ((model(x) - y) ** 2).mean()


def max_param_diff(a: nn.Module, b: nn.Module) -> float:
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


def train(model: nn.Module, opt: torch.optim.Optimizer, data: list) -> None:
    for batch in data:
        loss_of(model, batch).backward()
        opt.step()
        opt.zero_grad()


# ---------------------------------------------------------------- seeds and projections


@pytest.mark.parametrize("seed", [0, 1, 7, 42, 2**40 + 3, 9_000_000_000_000_000_000])
def test_seed_chain_matches_reference(seed):
    assert F.split_seed(seed) == ref.split_seed(seed)
    assert F.next_seed(seed) == ref.next_seed(seed)
    assert F.next_seed(F.next_seed(seed)) == ref.next_seed(ref.next_seed(seed))


@pytest.mark.parametrize("shape", [(16, 24), (24, 16)])
def test_up_of_down_is_unbiased_over_seeds(shape):
    """E[PᵀP] = I, so the mean over 2000 seeds of up(down(G)) is G (expected rel. error ≈ 0.03)."""
    rank, n_seeds = 8, 2000
    G = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    total = torch.zeros(shape, dtype=torch.float64)
    for s in range(n_seeds):
        P = F.random_projection(shape, rank, seed=s)
        assert P.shape == ((rank, shape[0]) if shape[0] < shape[1] else (shape[1], rank))
        total += F.project_up(F.project_down(G, P), P, shape).double()
    rel = ((total / n_seeds - G.double()).norm() / G.norm()).item()
    single = (F.project_up(F.project_down(G, P), P, shape) - G).norm() / G.norm()
    assert rel < 0.05 and single > 0.5, (rel, single)


# ---------------------------------------------------------------- optimizer parity with flora-opt

PARITY_CASES = {
    "momentum": dict(lr=1e-2, rank=4, kappa=3, beta1=0.9, scale_parameter=False),
    "scaled+decay": dict(lr=1e-2, rank=4, kappa=3, beta1=0.9, scale_parameter=True, weight_decay=0.1),
    "relative_step": dict(lr=None, relative_step=True, rank=4, kappa=2, beta1=0.8, clip_threshold=0.5),
    "unfactored": dict(lr=1e-2, rank=4, kappa=3, beta1=0.9, factorize_second_moment=False),
}


@pytest.mark.parametrize("case", PARITY_CASES)
def test_flora_matches_reference(case):
    """7 steps with κ ≤ 3 cross two resamples; a frozen bias still counts in the seed numbering."""
    kwargs = PARITY_CASES[case]
    theirs, ours = tiny_mlp(), tiny_mlp()
    for m in (theirs, ours):
        m[0].bias.requires_grad_(False)
    opt_theirs = ref.Flora(theirs.parameters(), **kwargs)
    opt_ours = Flora(ours.parameters(), **kwargs)
    data = batches(7, 64, 64)
    train(theirs, opt_theirs, data)
    train(ours, opt_ours, data)
    diff = max_param_diff(theirs, ours)
    print(f"parity[{case}] max |Δ| = {diff:.3g}")
    assert diff <= PARITY_ATOL
    assert max_param_diff(ours, tiny_mlp()) > 1e-3  # it did train
    assert [s.get("seed") for s in opt_ours.state.values()] == [s.get("seed") for s in opt_theirs.state.values()]


@pytest.mark.parametrize("ref_beta1", [None, 0.0])
def test_beta1_zero_is_the_reference_default_adafactor(ref_beta1):
    theirs, ours = tiny_mlp(), tiny_mlp()
    data = batches(7, 64, 64)
    train(theirs, ref.Flora(theirs.parameters(), lr=1e-2, rank=4, kappa=3, beta1=ref_beta1), data)
    opt = Flora(ours.parameters(), lr=1e-2, rank=4, kappa=3, beta1=0)
    train(ours, opt, data)
    diff = max_param_diff(theirs, ours)
    print(f"parity[adafactor, ref beta1={ref_beta1}] max |Δ| = {diff:.3g}")
    assert diff <= PARITY_ATOL
    assert all("exp_avg" not in s for s in opt.state.values())


def test_uncompressed_momentum_matches_reference():
    """Rank 40 > min dim 32 leaves 32×64 and 64×32 full; 64×8 and 8×40 exceed the 4:1 ratio."""
    kwargs = dict(lr=1e-2, rank=40, kappa=3, beta1=0.9)
    theirs, ours = tiny_mlp(widths=(64, 32, 64, 64)), tiny_mlp(widths=(64, 32, 64, 64))
    data = batches(7, 64, 64)
    train(theirs, ref.Flora(theirs.parameters(), **kwargs), data)
    train(ours, Flora(ours.parameters(), **kwargs), data)
    diff_rank = max_param_diff(theirs, ours)

    kwargs = dict(lr=1e-2, rank=4, kappa=3, beta1=0.9, scale_parameter=False)
    theirs, ours = tiny_mlp(widths=(8, 64, 40, 8)), tiny_mlp(widths=(8, 64, 40, 8))
    data = batches(7, 8, 8)
    train(theirs, ref.Flora(theirs.parameters(), **kwargs), data)
    opt = Flora(ours.parameters(), **kwargs)
    train(ours, opt, data)
    diff_ratio = max_param_diff(theirs, ours)
    print(f"parity[uncompressed: rank>min] max |Δ| = {diff_rank:.3g}; [ratio>4] max |Δ| = {diff_ratio:.3g}")
    assert diff_rank <= PARITY_ATOL and diff_ratio <= PARITY_ATOL
    assert opt.state[ours[0].weight]["exp_avg"].shape == (64, 8)  # full: 64/8 > 4
    assert opt.state[ours[2].weight]["exp_avg"].shape == (4, 64)  # 40×64 is compressed (left)


# ---------------------------------------------------------------- state


def test_state_holds_no_projection_and_matches_flora_state_bytes():
    model = tiny_mlp(widths=(8, 64, 32, 64, 64))  # 64×8 (ratio 8, full), 32×64, 64×32, 64×64, biases
    rank = 4
    opt = Flora(model.parameters(), lr=1e-2, rank=rank, kappa=2)
    train(model, opt, batches(5, 8, 64))
    for p in model.parameters():
        state = opt.state[p]
        tensors = {k: v for k, v in state.items() if torch.is_tensor(v)}
        assert all(type(v) is int for k, v in state.items() if k not in tensors), state.keys()
        nbytes = sum(v.numel() * v.element_size() for v in tensors.values())
        assert nbytes == flora_state_bytes(p.shape, rank), (tuple(p.shape), nbytes)
        if p.dim() == 2 and F.compresses_momentum(p.shape, rank):
            proj = Flora._projection(state["seed"], p.shape, rank, p)
            same_shape = [k for k, v in tensors.items() if v.shape == proj.shape]
            assert same_shape == (["exp_avg"] if proj.shape == state["exp_avg"].shape else [])
            assert not any(torch.equal(v, proj) for v in tensors.values())
    assert flora_state_bytes((64, 32), 4) == 4 * (64 + 32) + 4 * 4 * 64
    assert flora_state_bytes((4096, 4096), 256) < flora_state_bytes((4096, 4096), None) / 8


def test_state_dict_resume_equals_uninterrupted_run():
    data = batches(8, 64, 64)
    kwargs = dict(lr=1e-2, rank=4, kappa=3)
    straight = tiny_mlp()
    train(straight, Flora(straight.parameters(), **kwargs), data)

    first = tiny_mlp()
    opt = Flora(first.parameters(), **kwargs)
    train(first, opt, data[:4])
    resumed = copy.deepcopy(first)
    opt2 = Flora(resumed.parameters(), **{**kwargs, "seed": 123})  # seeds come from the state dict
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    train(resumed, opt2, data[4:])
    assert max_param_diff(straight, resumed) == 0.0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_weights_are_updated_in_fp32(dtype):
    g = torch.Generator().manual_seed(0)
    w16 = nn.Parameter(torch.randn(32, 48, generator=g).to(dtype))
    w32 = nn.Parameter(w16.detach().float())
    grads = [torch.randn(32, 48, generator=g).to(dtype) for _ in range(3)]
    o16 = Flora([w16], lr=1e-2, rank=4, kappa=2)
    o32 = Flora([w32], lr=1e-2, rank=4, kappa=2)
    for grad in grads:
        w16.grad, w32.grad = grad, grad.float()
        o16.step(), o32.step()
        assert w16.dtype == dtype
        torch.testing.assert_close(w16.detach(), w32.detach().to(dtype), rtol=0, atol=0)
        w32.data = w16.detach().float()  # the fp16 copy-back rounds; compare one step at a time
    assert all(v.dtype == torch.float32 for v in o16.state[w16].values() if torch.is_tensor(v))


def test_defaults_keep_momentum_on_and_bad_options_are_refused():
    w = nn.Parameter(torch.zeros(4, 4))
    assert Flora([w], lr=1e-3).param_groups[0]["beta1"] == 0.9
    assert Flora([w], lr=1e-3, beta1=None).param_groups[0]["beta1"] == 0.0
    for bad in (dict(lr=None), dict(lr=1e-3, relative_step=True), dict(lr=1e-3, rank=-1),
                dict(lr=1e-3, kappa=0), dict(lr=1e-3, beta1=1.0), dict(lr=1e-3, decay_rate=0.5)):
        with pytest.raises(TrainingError):
            Flora([w], **bad)


def test_module_never_imports_the_reference_or_its_dependencies():
    tree = ast.parse(Path(F.__file__).read_text())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not {n.split(".")[0] for n in names} & {"flora_opt", "accelerate", "bitsandbytes"}
    assert len(Path(F.__file__).read_text().splitlines()) < 400


# ---------------------------------------------------------------- compressed accumulation


def test_accumulator_matches_reference_flora_accelerator():
    """FloraAccelerator (τ=4, 2 micro-batches) + reference Flora against ours + our Flora, 4 windows."""
    accelerate = pytest.importorskip("accelerate")
    kwargs = dict(lr=1e-2, rank=4, kappa=2, beta1=0.9)
    theirs, ours = tiny_mlp(), tiny_mlp()
    data = batches(8, 64, 64)

    accel = ref.FloraAccelerator(accumulation_compression_rank=4, gradient_accumulation_steps=2, cpu=True)
    try:
        accel.prepare_optimizer(ref.Flora(theirs.parameters(), **kwargs))
        for batch in data:
            with accel.accumulate(theirs):  # the Flora step runs inside backward, on the sync micro-batch
                loss_of(theirs, batch).backward()
    finally:
        accelerate.state.AcceleratorState._reset_state(reset_partial_state=True)
        accelerate.state.GradientState._reset_state()

    acc = CompressedAccumulator(ours.parameters(), rank=4, accumulation_steps=2)
    opt = Flora(ours.parameters(), **kwargs)
    for i, batch in enumerate(data):
        loss_of(ours, batch).backward()
        if i % 2 == 1:
            opt.step()
            opt.zero_grad()
    diff = max_param_diff(theirs, ours)
    print(f"parity[accumulation, FloraAccelerator] max |Δ| = {diff:.3g}")
    assert diff <= PARITY_ATOL
    assert acc.seeds == [F.next_seed(F.next_seed(F.next_seed(F.next_seed(i)))) for i in range(3)]


def _dense_projection(shape: tuple[int, int], rank: int, seed: int) -> torch.Tensor:
    """P regenerated independently: N(0, 1/τ), left τ×m if m < n, else right n×τ."""
    m, n = shape
    size = (rank, m) if m < n else (n, rank)
    return torch.randn(size, generator=torch.Generator().manual_seed(seed)) / math.sqrt(rank)


def test_accumulated_gradient_is_projected_sum_and_grads_are_freed_between_micro_batches():
    model, rank, k = tiny_mlp(), 4, 3
    acc = CompressedAccumulator(model.parameters(), rank=rank, accumulation_steps=k, seed=10)
    weights = [id(p) for p in model.parameters() if p.dim() == 2]
    data = batches(2 * k, 64, 64)
    for window in range(2):
        sums = None
        for j in range(k):
            grads = torch.autograd.grad(loss_of(model, data[window * k + j]), list(model.parameters()))
            sums = grads if sums is None else [s + g for s, g in zip(sums, grads)]
            loss_of(model, data[window * k + j]).backward()
            for p in model.parameters():
                assert (p.grad is None) == (p.dim() == 2 and j < k - 1)
            assert acc.micro_step == (j + 1) % k
        seeds = [10 + i for i in range(3)] if window == 0 else [F.next_seed(10 + i) for i in range(3)]
        for p, total in zip(model.parameters(), sums):
            if p.dim() == 1:
                torch.testing.assert_close(p.grad, total)
                continue
            P = _dense_projection(tuple(p.shape), rank, seeds[weights.index(id(p))])
            expected = P.T @ P @ total if p.shape[0] < p.shape[1] else total @ P @ P.T
            torch.testing.assert_close(p.grad, expected, atol=1e-6, rtol=1e-5)
        model.zero_grad()
    assert acc.seeds == [F.next_seed(F.next_seed(10 + i)) for i in range(3)]


def test_accumulated_gradient_is_unbiased_over_seeds_at_full_rank():
    """τ = min dim = 16 on a 16×24 weight: the mean over 2000 windows (each a new seed) is Σ g_i."""
    w = nn.Parameter(torch.zeros(16, 24))
    g = torch.Generator().manual_seed(0)
    g1, g2 = torch.randn(16, 24, generator=g), torch.randn(16, 24, generator=g)
    acc = CompressedAccumulator([w], rank=16, accumulation_steps=2)
    total, n = torch.zeros(16, 24, dtype=torch.float64), 2000
    for _ in range(n):
        (w * g1).sum().backward()
        assert w.grad is None
        (w * g2).sum().backward()
        total += w.grad.double()
        w.grad = None
    rel = ((total / n - (g1 + g2)).norm() / (g1 + g2).norm()).item()
    assert rel < 0.05, rel
    acc.remove()
    (w * g1).sum().backward()
    torch.testing.assert_close(w.grad, g1)  # unhooked: plain accumulation again


def test_accumulator_drives_adamw_like_a_dense_replica():
    model, rank, k = tiny_mlp(), 4, 2
    replica = copy.deepcopy(model)
    acc = CompressedAccumulator(model.parameters(), rank=rank, accumulation_steps=k)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    opt_replica = torch.optim.AdamW(replica.parameters(), lr=1e-2, weight_decay=0.01)
    seeds = [0, 1, 2]
    data = batches(3 * k, 64, 64)
    for window in range(3):
        for j in range(k):
            loss_of(model, data[window * k + j]).backward()
            loss_of(replica, data[window * k + j]).backward()
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            for i, p in enumerate(q for q in replica.parameters() if q.dim() == 2):
                P = _dense_projection(tuple(p.shape), rank, seeds[i])
                p.grad = P.T @ P @ p.grad if p.shape[0] < p.shape[1] else p.grad @ P @ P.T
        opt_replica.step()
        opt_replica.zero_grad()
        seeds = [F.next_seed(s) for s in seeds]
    diff = max_param_diff(model, replica)
    assert diff <= 1e-6, diff
    assert acc.seeds == seeds


def test_accumulator_state_dict_resumes_mid_window():
    data = batches(4, 64, 64)
    straight = tiny_mlp()
    acc = CompressedAccumulator(straight.parameters(), rank=4, accumulation_steps=4)
    for batch in data:
        loss_of(straight, batch).backward()

    first = tiny_mlp()
    acc1 = CompressedAccumulator(first.parameters(), rank=4, accumulation_steps=4)
    for batch in data[:3]:
        loss_of(first, batch).backward()
    saved, one_d = acc1.state_dict(), [p.grad.clone() for p in first.parameters() if p.dim() == 1]
    assert saved["micro_step"] == 3 and sorted(saved["buffers"]) == [0, 1, 2]
    assert saved["buffers"][0].shape == (4, 64)  # a compressed sum, never the 32×64 gradient

    second = tiny_mlp()
    acc2 = CompressedAccumulator(second.parameters(), rank=4, accumulation_steps=4)
    acc2.load_state_dict(saved)
    for p, grad in zip((p for p in second.parameters() if p.dim() == 1), one_d):
        p.grad = grad
    loss_of(second, data[3]).backward()
    for p, q in zip(straight.parameters(), second.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0)
    assert acc2.seeds == acc.seeds

    with pytest.raises(TrainingError):
        CompressedAccumulator(tiny_mlp().parameters(), rank=8, accumulation_steps=4).load_state_dict(saved)
    with pytest.raises(ShapeMismatchError):
        CompressedAccumulator(tiny_mlp(widths=(64, 32)).parameters(), rank=4, accumulation_steps=4) \
            .load_state_dict(saved)


def test_weight_without_gradient_in_last_micro_batch_is_still_released():
    a, b = nn.Parameter(torch.zeros(8, 12)), nn.Parameter(torch.zeros(12, 8))
    acc = CompressedAccumulator([a, b], rank=4, accumulation_steps=2)
    ga = torch.randn(8, 12, generator=torch.Generator().manual_seed(0))
    ((a * ga).sum() + b.sum()).backward()
    (a * ga).sum().backward()  # b gets no gradient in the last micro-batch
    assert acc.micro_step == 0 and a.grad is not None and b.grad is not None
    P = _dense_projection((12, 8), 4, 1)
    torch.testing.assert_close(b.grad, torch.ones(12, 8) @ P @ P.T)
    with pytest.raises(TrainingError):
        CompressedAccumulator([a], rank=4, accumulation_steps=1)
    with pytest.raises(TrainingError):
        CompressedAccumulator([nn.Parameter(torch.zeros(3))], rank=4, accumulation_steps=2)
