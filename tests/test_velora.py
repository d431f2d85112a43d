"""VeLoRA (lrsurgery.layers.velora) against the dense closed form, PEFT's autograd function and the
saved-tensor meter."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lrsurgery.errors import TargetError
from lrsurgery.layers.lora import LoRALinear
from lrsurgery.layers.velora import (
    VeLoRALinear,
    VeLoRALoRALinear,
    VeLoRAProjection,
    group_dim,
    saved_bytes,
    velora_linear,
)
from lrsurgery.memory import SavedTensorMeter


def unit(n: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    v = torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    return v / v.norm()


def grads(fn, x, w, b):
    """(y, ∂x, ∂W, ∂b) of sum(y · r) for a fixed random r (so ∂y is not constant)."""
    x, w, b = (t.detach().clone().requires_grad_() for t in (x, w, b))
    y = fn(x, w, b)
    r = torch.randn(y.shape, generator=torch.Generator().manual_seed(99), dtype=y.dtype)
    (y * r).sum().backward()
    return y.detach(), x.grad, w.grad, b.grad


def data(d: int, out: int = 6, dtype=torch.float64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 5, d, generator=g, dtype=dtype), torch.randn(out, d, generator=g, dtype=dtype),
            torch.randn(out, generator=g, dtype=dtype))


def sub_mean(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Mean of all sub-tokens of x [..., D] (G divides D)."""
    return x.reshape(-1, x.shape[-1] // groups).mean(0)


def test_forward_equals_linear_in_train_and_eval():
    torch.manual_seed(0)
    base = nn.Linear(12, 7)
    layer = VeLoRALinear(base, groups=3)
    x = torch.randn(2, 5, 12)
    assert torch.equal(layer(x), F.linear(x, base.weight, base.bias))  # training: VeLoRA path
    assert layer.velora.initialized
    layer.eval()
    assert torch.equal(layer(x), F.linear(x, base.weight, base.bias))
    assert layer.weight is base.weight and layer.bias is base.bias and layer.eject() is base


def test_grad_x_and_grad_b_are_exact():
    x, w, b = data(12, dtype=torch.float32)
    v = unit(4, 1, torch.float32)
    y, gx, _, gb = grads(lambda x, w, b: velora_linear(x, w, b, v, 3, 0.5), x, w, b)
    y0, gx0, _, gb0 = grads(F.linear, x, w, b)
    assert torch.equal(y, y0)
    assert torch.allclose(gx, gx0, atol=1e-6) and torch.allclose(gb, gb0, atol=1e-6)


@pytest.mark.parametrize("d,groups", [(12, 3), (12, 4), (16, 1), (16, 8), (30, 5)])
def test_grad_w_is_the_true_gradient_projected_per_group(d, groups):
    x, w, b = data(d)
    v, scale = unit(d // groups, d + groups), 0.7
    _, _, gw, _ = grads(lambda x, w, b: velora_linear(x, w, b, v, groups, scale), x, w, b)
    _, _, gw_true, _ = grads(F.linear, x, w, b)
    closed = scale * gw_true @ torch.kron(torch.eye(groups, dtype=v.dtype), torch.outer(v, v))
    assert torch.allclose(gw, closed, atol=1e-6)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_one_element_groups_give_the_exact_gradient(sign):
    x, w, b = data(8)
    _, _, gw, _ = grads(lambda x, w, b: velora_linear(x, w, b, torch.tensor([sign], dtype=x.dtype), 8), x, w, b)
    _, _, gw_true, _ = grads(F.linear, x, w, b)
    assert torch.allclose(gw, gw_true, rtol=1e-12, atol=1e-12)


def load_peft_velora():
    """PEFT's velora.py loaded on its own (it imports only torch), skipping peft's slow package import."""
    spec = importlib.util.find_spec("peft")
    if spec is None or spec.origin is None:
        pytest.skip("peft is not installed")
    path = Path(spec.origin).parent / "tuners" / "lora" / "velora.py"
    module_spec = importlib.util.spec_from_file_location("_peft_velora", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("d,groups,pad", [(16, 4, False), (24, 8, False), (10, 4, True)])
def test_matches_peft_velora_function(d, groups, pad):
    peft_velora = load_peft_velora()
    x, w, b = data(d, dtype=torch.float32, seed=3)
    v = unit(group_dim(d, groups, pad), 5, torch.float32)
    ours = grads(lambda x, w, b: velora_linear(x, w, b, v, groups, 0.1, pad=pad), x, w, b)
    theirs = grads(lambda x, w, b: peft_velora.VeloraFunction.apply(x, w, b, v, groups, 0.1), x, w, b)
    for a, t in zip(ours, theirs):
        assert torch.allclose(a, t, atol=1e-6)


def test_batch_average_v_matches_peft_init():
    peft_velora = load_peft_velora()
    x = torch.randn(3, 4, 10)
    proj = VeLoRAProjection(10, 4, init="batch_average", pad=True)
    proj(x, nn.Parameter(torch.randn(2, 10)))
    grouped = peft_velora._reshape_to_grouped_subtokens(x, 4)
    expected = peft_velora._normalize_projection(grouped.reshape(-1, grouped.shape[-1]).mean(0))
    assert torch.allclose(proj.v, expected, atol=1e-6)


def activation_bytes(model: nn.Module, fn) -> int:
    with SavedTensorMeter(exclude=model.parameters()) as meter:
        fn()
    return meter.bytes


def test_saved_bytes_drop_by_d_over_g():
    b, n, d, groups = 2, 5, 64, 8
    torch.manual_seed(0)
    base = nn.Linear(d, 32)
    x = torch.randn(b, n, d)  # no grad: the layer is the first op
    plain = activation_bytes(base, lambda: base(x))
    layer = VeLoRALinear(base, groups=groups)
    velora = activation_bytes(layer, lambda: layer(x))
    m = d // groups
    assert plain == b * n * d * 4 == 2560
    assert velora == b * n * groups * 4 + m * 4 == saved_bytes(b * n, d, groups, 4) == 352
    assert plain / (velora - m * 4) == d / groups


def test_frozen_weight_saves_nothing():
    x, w, b = data(12, dtype=torch.float32)
    x.requires_grad_()
    with SavedTensorMeter(exclude=[w]) as meter:
        velora_linear(x, w, b, unit(4, 0, torch.float32), 3)
    assert meter.bytes == 0


def test_no_saving_when_another_op_holds_the_input():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 64)
    other, base = nn.Linear(64, 16), nn.Linear(64, 32)
    both = nn.ModuleList([other, base])
    plain = activation_bytes(both, lambda: (other(x), base(x)))
    layer = VeLoRALinear(base, groups=8)
    shared = activation_bytes(both, lambda: (other(x), layer(x)))
    assert plain == 2 * 5 * 64 * 4  # x once: both linears save the same storage
    assert shared == plain + saved_bytes(10, 64, 8, 4)  # x still held; z and v come on top


@pytest.mark.parametrize("target,pays_off", [("attn.qkv", True), ("mlp.fc1", True), ("mlp.fc2", True),
                                             ("attn.proj", False)])
def test_which_timm_vit_targets_pay_off(target, pays_off):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=4, embed_dim=32,
                            depth=1, num_heads=2, num_classes=5)
    images = torch.randn(2, 3, 16, 16)
    before = activation_bytes(vit, lambda: vit(images))
    parent_name, _, child = target.rpartition(".")
    parent = vit.blocks[0].get_submodule(parent_name)
    setattr(parent, child, VeLoRALinear(getattr(parent, child), groups=8))
    after = activation_bytes(vit, lambda: vit(images))
    tokens, d = 2 * 17, getattr(parent, child).in_features  # 16 patches + class token
    if pays_off:
        assert before - after == tokens * d * 4 - saved_bytes(tokens, d, 8, 4)
    else:
        assert after == before + saved_bytes(tokens, d, 8, 4)


def two_batches(d: int = 12):
    g = torch.Generator().manual_seed(1)
    return torch.randn(4, d, generator=g) + 1.0, torch.randn(4, d, generator=g) - 0.5


def test_batch_average_once_freezes_after_the_first_training_batch():
    layer = VeLoRALinear(nn.Linear(12, 3), groups=3)
    x1, x2 = two_batches()
    layer.eval()
    layer(x1)
    assert not layer.velora.initialized and not layer.velora.v.any()  # eval never sets v
    layer.train()
    with torch.no_grad():
        layer(x1)
    assert not layer.velora.initialized  # no grad: plain linear, v untouched
    layer(x1)
    first = layer.velora.v.clone()
    assert torch.allclose(first, F.normalize(sub_mean(x1, 3), dim=0), atol=1e-6)
    layer(x2)
    assert torch.equal(layer.velora.v, first)
    assert torch.isclose(first.norm(), torch.tensor(1.0))


def test_batch_average_follows_every_batch():
    layer = VeLoRALinear(nn.Linear(12, 3), groups=3, init="batch_average")
    x1, x2 = two_batches()
    layer(x1)
    layer(x2)
    assert torch.allclose(layer.velora.v, F.normalize(sub_mean(x2, 3), dim=0), atol=1e-6)
    assert torch.isclose(layer.velora.v.norm(), torch.tensor(1.0))


def test_ema_follows_the_formula():
    decay = 0.9
    layer = VeLoRALinear(nn.Linear(12, 3), groups=3, init="ema", ema_decay=decay)
    x1, x2 = two_batches()
    layer(x1)
    v1 = F.normalize(sub_mean(x1, 3), dim=0)
    assert torch.allclose(layer.velora.v, v1, atol=1e-6)
    layer(x2)
    v2 = F.normalize(decay * v1 + (1 - decay) * sub_mean(x2, 3), dim=0)
    assert torch.allclose(layer.velora.v, v2, atol=1e-6)
    assert torch.isclose(layer.velora.v.norm(), torch.tensor(1.0))


def test_v_is_saved_and_a_loaded_v_stays_frozen():
    trained = VeLoRALinear(nn.Linear(12, 3), groups=3)
    x1, x2 = two_batches()
    trained(x1)
    resumed = VeLoRALinear(nn.Linear(12, 3), groups=3)
    resumed.load_state_dict(trained.state_dict())
    assert set(trained.state_dict()) == {"weight", "bias", "velora.v"}
    resumed(x2)
    assert torch.equal(resumed.velora.v, trained.velora.v)


def test_groups_not_dividing_d_name_the_valid_divisors():
    with pytest.raises(TargetError, match=r"G=5 .*D=12.*Nearest valid G: 4 or 6.*1, 2, 3, 4, 6, 12"):
        VeLoRALinear(nn.Linear(12, 3), groups=5)
    with pytest.raises(TargetError, match="D=12"):
        velora_linear(torch.randn(2, 12), torch.randn(3, 12), None, torch.ones(3), 5)
    padded = VeLoRALinear(nn.Linear(12, 3), groups=5, pad=True)
    assert padded.velora.group_dim == 3
    x = torch.randn(4, 12)
    assert torch.equal(padded(x), F.linear(x, padded.weight, padded.bias))


def lora_pair(groups: int, scale: float = 1.0):
    torch.manual_seed(0)
    base = nn.Linear(16, 8)
    base.requires_grad_(False)
    lora = LoRALinear(base, rank=2, alpha=4)
    velora = VeLoRALoRALinear(base, rank=2, alpha=4, groups=groups, scale=scale)
    with torch.no_grad():
        lora.lora_B.normal_()
        velora.lora_A.copy_(lora.lora_A)
        velora.lora_B.copy_(lora.lora_B)
    return lora, velora


def test_velora_lora_equals_lora_with_exact_b_grad_and_projected_a_grad():
    groups, scale = 4, 0.5
    lora, velora = lora_pair(groups, scale)
    x = torch.randn(3, 5, 16)
    r = torch.randn(3, 5, 8)
    y0, y1 = lora(x), velora(x)
    assert torch.equal(y0, y1)
    (y0 * r).sum().backward()
    (y1 * r).sum().backward()
    v = velora.velora.v
    closed = scale * lora.lora_A.grad @ torch.kron(torch.eye(groups), torch.outer(v, v))
    assert torch.allclose(velora.lora_B.grad, lora.lora_B.grad, atol=1e-6)
    assert torch.allclose(velora.lora_A.grad, closed, atol=1e-6)
    assert velora.weight.grad is None and velora.bias.grad is None
    velora.eval()
    assert torch.equal(velora(x), lora.eval()(x))


def test_velora_lora_saves_z_instead_of_the_adapter_input():
    t, d, r, groups = 15, 16, 2, 4
    lora, velora = lora_pair(groups)
    x = torch.randn(3, 5, d)
    plain = activation_bytes(lora, lambda: lora(x))
    compressed = activation_bytes(velora, lambda: velora(x))
    assert plain == (t * d + t * r) * 4  # A's input x, and B's input A x
    assert compressed == saved_bytes(t, d, groups, 4) + t * r * 4


def test_two_forwards_before_one_backward_each_use_their_own_v():
    torch.manual_seed(0)
    layer = VeLoRALinear(nn.Linear(12, 3), groups=3, init="batch_average")
    x1, x2 = two_batches()
    r = torch.randn(4, 3)
    ((layer(x1) + layer(x2)) * r).sum().backward()  # v moves in between; backward must not break
    together = layer.weight.grad.clone()
    layer.weight.grad = None
    for x in (x1, x2):
        (layer(x) * r).sum().backward()
    assert torch.allclose(layer.weight.grad, together, atol=1e-6)
