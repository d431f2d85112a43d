"""Exact byte counts for lrsurgery.memory; every expected number is worked out by hand (fp32 = 4 B)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from lrsurgery.errors import LrsurgeryError
from lrsurgery.memory import (
    MemoryReport,
    SavedTensorMeter,
    format_bytes,
    grad_bytes,
    lora_estimate,
    measure_step,
    optimizer_state_bytes,
    parameter_bytes,
)

F32 = 4


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def test_linear_saves_input_but_not_weight() -> None:
    # addmm saves the input for grad_weight; x needs no grad, so the weight is not saved at all.
    lin, x = nn.Linear(64, 32), torch.randn(8, 64)
    with SavedTensorMeter(exclude=lin.parameters()) as meter:
        lin(x).sum()
    assert (meter.bytes, meter.count) == (8 * 64 * F32, 1)


def test_frozen_linear_saves_only_the_weight_which_is_excluded() -> None:
    lin = nn.Linear(64, 32).requires_grad_(False)
    x = torch.randn(8, 64, requires_grad=True)
    with SavedTensorMeter() as unfiltered:  # proves what is saved: weight.t(), a view of the weight
        lin(x).sum()
    assert (unfiltered.bytes, unfiltered.count) == (64 * 32 * F32, 1)
    with SavedTensorMeter(exclude=lin.parameters()) as meter:
        lin(x).sum()
    assert (meter.bytes, meter.count) == (0, 0)


def test_tensor_saved_twice_is_counted_once() -> None:
    x = torch.randn(10, requires_grad=True)
    with SavedTensorMeter() as meter:
        (x * x).sum()  # mul saves both operands: the same storage twice
    assert (meter.bytes, meter.count) == (10 * F32, 1)


def test_adamw_state_after_one_step() -> None:
    lin = nn.Linear(64, 32)
    opt = torch.optim.AdamW(lin.parameters())
    lin(torch.randn(8, 64)).sum().backward()
    opt.step()
    steps = [state["step"] for state in opt.state.values()]
    assert [(s.shape, s.dtype) for s in steps] == [(torch.Size([]), torch.float32)] * 2
    # exp_avg + exp_avg_sq for weight and bias, plus one fp32 scalar `step` per parameter.
    assert optimizer_state_bytes(opt) == 2 * (64 * 32 + 32) * F32 + 2 * F32 == 16648


def test_optimizer_state_nested_and_shared_storages() -> None:
    class Fake:
        t = torch.zeros(10)
        state = {"a": {"m": t, "more": [t[:5], (torch.zeros(3, dtype=torch.float64),)]}, "b": {"n": 1}}

    assert optimizer_state_bytes(Fake()) == 10 * F32 + 3 * 8  # t and its view counted once


def test_grad_bytes_after_backward() -> None:
    lin = nn.Linear(64, 32)
    assert grad_bytes(lin) == 0
    lin(torch.randn(8, 64)).sum().backward()
    assert grad_bytes(lin) == (64 * 32 + 32) * F32 == 8320


def test_parameter_bytes_counts_tied_parameter_once() -> None:
    model = nn.ModuleDict({"emb": nn.Embedding(100, 16), "head": nn.Linear(16, 100, bias=False),
                           "norm": nn.LayerNorm(16)})
    model["head"].weight = model["emb"].weight
    model["norm"].requires_grad_(False)
    # One 100x16 matrix plus LayerNorm weight and bias (16 each, frozen).
    assert parameter_bytes(model) == ((1600 + 32) * F32, 1600, 1632)


def test_format_bytes() -> None:
    assert format_bytes(0) == "0 B"
    assert format_bytes(512) == "512 B"
    assert format_bytes(1023) == "1023 B"
    assert format_bytes(1024) == "1.00 KiB"
    assert format_bytes(3 * 2**19) == "1.50 MiB"
    assert format_bytes(int(3.2 * 2**30)) == "3.20 GiB"


def test_lora_estimate() -> None:
    assert lora_estimate([(576, 192)], rank=8) == {
        "trainable_params": 6144, "param_bytes": 24576, "grad_bytes": 24576, "optimizer_bytes": 49152}
    both = lora_estimate([(576, 192), (192, 576)], rank=4, bytes_per_param=2, optimizer_states=1)
    assert both == {"trainable_params": 6144, "param_bytes": 12288, "grad_bytes": 12288,
                    "optimizer_bytes": 12288}
    with pytest.raises(LrsurgeryError, match="rank >= 1"):
        lora_estimate([(576, 192)], rank=0)


def _mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))


def test_measure_step_on_mlp_matches_independent_counts() -> None:
    model, x = _mlp(), torch.randn(8, 16)
    opt = torch.optim.AdamW(model.parameters())
    report = measure_step(model, lambda: model(x).pow(2).mean(), opt)

    n_params = 16 * 32 + 32 + 32 * 4 + 4  # 676
    # Saved: x for grad of W1 (512 B); relu output, kept by ReLU and by Linear2 (1024 B, once);
    # pow's input (128 B). W2.t(), saved by Linear2 for grad_input, is a parameter view: excluded.
    activations = 8 * 16 * F32 + 8 * 32 * F32 + 8 * 4 * F32
    assert activations == 1664
    assert report == MemoryReport(
        params=n_params * F32, trainable_params=n_params, total_params=n_params,
        grads=n_params * F32, optimizer_state=2 * n_params * F32 + 4 * F32,
        activations=activations, cuda_peak=None, buffers=0)
    assert (report.params, report.trainable_params, report.total_params) == parameter_bytes(model)
    assert report.grads == grad_bytes(model)
    assert report.optimizer_state == optimizer_state_bytes(opt)
    assert report.total == (4 * n_params + 4) * F32 + activations
    assert report.as_dict()["total"] == report.total


def test_measure_step_without_optimizer_and_with_checkpointing() -> None:
    model, x = _mlp(), torch.randn(8, 16)
    report = measure_step(model, lambda: checkpoint(model, x, use_reentrant=False).pow(2).mean())
    # Checkpointing keeps only its input x; the MLP's activations are recomputed in backward.
    assert report.activations == 8 * 16 * F32 + 8 * 4 * F32
    assert report.optimizer_state == 0
    assert report.grads == report.params


def test_optimizer_state_bytes_counts_tensors_held_by_objects():
    """galore-torch keeps its basis in a projector object inside the state: it must be counted."""
    class Projector:
        def __init__(self):
            self.ortho_matrix = torch.zeros(8, 16)
            self.me = self  # a cycle must not loop forever

    p = torch.nn.Parameter(torch.zeros(16, 16))
    opt = torch.optim.SGD([p], lr=0.1)
    opt.state[p] = {"exp_avg": torch.zeros(8, 16), "projector": Projector()}
    assert optimizer_state_bytes(opt) == 2 * 8 * 16 * 4
