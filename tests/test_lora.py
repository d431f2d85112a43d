"""LoRA layers on real architectures: exact no-op at init, merge == adapted, PEFT parity, init, dropout, dtypes.

Models: a tiny timm ViT, a tiny GPT-2 (Conv1D, weights stored [in, out]), a tiny LLaMA and the real
pretrained MiniLM BERT. Measured differences are printed (``pytest -s``) and recorded as properties.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lrsurgery
from lrsurgery.errors import LrsurgeryError, TargetError
from lrsurgery.layers.lora import LoRALinear, lora_scaling


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)  # LoRA A and random heads come from the global RNG: same values on every run


MODELS = ["vit", "gpt2", "llama", "minilm"]


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


# --- exact no-op at injection -------------------------------------------------------------------------

@pytest.mark.parametrize("name", MODELS)
def test_inject_is_exact_noop_and_keeps_state_dict_keys(cases, name: str) -> None:
    case = cases[name]
    model = case.load()
    y0 = case.run(model)
    keys0 = set(model.state_dict())
    modules0 = {n: m for n, m in model.named_modules()}

    report = lrsurgery.inject(model, rank=4, alpha=8)  # targets=None: the family preset

    layers = lrsurgery.lora_modules(model)
    assert len(layers) == case.n_preset == len(report.config.targets)
    assert torch.equal(case.run(model), y0)
    # base keys unchanged; the only new keys are the factors
    keys1 = set(model.state_dict())
    assert keys0 <= keys1
    assert keys1 - keys0 == {f"{n}.lora_{p}" for n in layers for p in "AB"}
    # the wrapper reuses the base Parameters, it does not copy them
    for n, layer in layers.items():
        assert layer.base_layer is modules0[n]
        assert layer.weight is modules0[n].weight
    # only the factors train
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{p}" for n in layers for p in "AB"}
    assert report.trainable_params == sum(l.lora_A.numel() + l.lora_B.numel() for l in layers.values())


# --- merge == adapted model ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", MODELS)
def test_merged_model_equals_adapted_model(cases, randomize_b, record_property, name: str) -> None:
    case = cases[name]
    model = case.load()
    y_base = case.run(model)
    originals = {n: m for n, m in model.named_modules()}
    lrsurgery.inject(model, rank=4, alpha=8)
    randomize_b(model, seed=1)
    y_adapted = case.run(model)
    effect = max_diff(y_adapted, y_base)
    assert effect > 1e-3, "the random B must change the output, or the comparison below proves nothing"

    names = list(lrsurgery.lora_modules(model))
    assert lrsurgery.merge(model) is model
    assert lrsurgery.lora_modules(model) == {}
    assert not hasattr(model, "lrsurgery_adapter")
    for n in names:  # the very module objects that were wrapped are back
        assert model.get_submodule(n) is originals[n]
    y_merged = case.run(model)
    diff = max_diff(y_merged, y_adapted)
    record_property("merge_max_abs_diff", diff)
    print(f"\n[merge] {name}: max|merged - adapted| = {diff:.3e} (adapter effect {effect:.3e})")
    assert diff <= 1e-5


def test_merge_of_model_without_adapters_is_refused(cases) -> None:
    with pytest.raises(LrsurgeryError, match="no adapters"):
        lrsurgery.merge(cases["vit"].load())


@pytest.mark.parametrize("name", ["vit", "gpt2"])
def test_merge_then_unmerge_restores_weights(cases, randomize_b, name: str) -> None:
    case = cases[name]
    model = case.load()
    lrsurgery.inject(model, rank=4, alpha=8)
    randomize_b(model, seed=2)
    layers = lrsurgery.lora_modules(model)
    w0 = {n: l.weight.detach().clone() for n, l in layers.items()}
    y_adapted = case.run(model)

    for layer in layers.values():
        layer.merge()
    for n, layer in layers.items():
        expected = w0[n] + layer.delta_weight()
        assert torch.allclose(layer.weight, expected, rtol=0, atol=1e-6)
        assert max_diff(layer.weight, w0[n]) > 1e-4  # the merge did change the weight
    # merged layers skip the branch: the model still computes the adapted function
    assert max_diff(case.run(model), y_adapted) <= 1e-5
    with pytest.raises(RuntimeError, match="already merged"):
        next(iter(layers.values())).merge()

    for layer in layers.values():
        layer.unmerge()
    for n, layer in layers.items():
        assert torch.allclose(layer.weight, w0[n], rtol=0, atol=1e-6), n
    assert max_diff(case.run(model), y_adapted) <= 1e-5
    with pytest.raises(RuntimeError, match="not merged"):
        next(iter(layers.values())).unmerge()


def test_conv1d_delta_is_stored_transposed(cases, randomize_b) -> None:
    model = cases["gpt2"].load()
    lrsurgery.inject(model, rank=4, alpha=8, targets=["c_attn"])
    randomize_b(model, seed=3)
    layer = model.get_submodule("transformer.h.0.attn.c_attn")
    assert layer.fan_in_fan_out and (layer.in_features, layer.out_features) == (32, 96)
    assert layer.lora_A.shape == (4, 32) and layer.lora_B.shape == (96, 4)
    assert layer.weight.shape == (32, 96)
    delta = layer.delta_weight()
    assert delta.shape == (32, 96)
    assert torch.equal(delta, ((layer.lora_B @ layer.lora_A) * 2.0).T)
    # the branch is x @ ΔW with ΔW in the stored [in, out] orientation
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(layer(x), x @ (layer.weight + delta) + layer.bias, rtol=0, atol=1e-6)


# --- scaling -----------------------------------------------------------------------------------------

def test_scaling_values() -> None:
    assert lora_scaling(8, 4) == 2.0
    assert lora_scaling(8, 4, rslora=True) == 4.0
    assert lora_scaling(16, 16, rslora=True) == 4.0
    assert lora_scaling(16, 64, rslora=True) == 2.0
    assert LoRALinear(nn.Linear(16, 8), rank=4, alpha=8).scaling == 2.0
    assert LoRALinear(nn.Linear(16, 8), rank=4, alpha=8, rslora=True).scaling == 4.0


@pytest.mark.parametrize("rslora, scale", [(False, 8 / 16), (True, 8 / math.sqrt(16))])
def test_lora_branch_is_scaled_bax(rslora: bool, scale: float) -> None:
    torch.manual_seed(0)
    base = nn.Linear(24, 10)
    layer = LoRALinear(base, rank=16, alpha=8, rslora=rslora)
    with torch.no_grad():
        layer.lora_B.normal_()
    assert layer.scaling == pytest.approx(scale, abs=0)
    x = torch.randn(5, 24)
    with torch.no_grad():
        expected = base(x) + scale * (x @ layer.lora_A.T @ layer.lora_B.T)
        assert torch.allclose(layer(x), expected, rtol=0, atol=1e-5)


def test_rslora_inject_sets_alpha_over_sqrt_r_everywhere(cases) -> None:
    model = cases["llama"].load()
    report = lrsurgery.inject(model, rank=16, alpha=8, rslora=True)
    assert report.config.rslora
    layers = lrsurgery.lora_modules(model)
    assert len(layers) == 14
    assert {layer.scaling for layer in layers.values()} == {2.0}


def test_alpha_defaults_to_rank() -> None:
    model = nn.Sequential(nn.Linear(4, 4))
    report = lrsurgery.inject(model, rank=3, targets=["0"])
    assert report.config.alpha == 3.0
    assert lrsurgery.lora_modules(model)["0"].scaling == 1.0


def test_invalid_arguments_are_refused() -> None:
    with pytest.raises(TargetError, match="rank"):
        lrsurgery.inject(nn.Sequential(nn.Linear(4, 4)), rank=0, targets=["0"])
    with pytest.raises(LrsurgeryError, match="dropout"):
        lrsurgery.inject(nn.Sequential(nn.Linear(4, 4)), rank=2, targets=["0"], dropout=1.0)
    with pytest.raises(LrsurgeryError, match="unknown method"):
        lrsurgery.inject(nn.Sequential(nn.Linear(4, 4)), method="dora", targets=["0"])
    with pytest.raises(TargetError, match="cannot take LoRA"):
        LoRALinear(nn.Conv2d(3, 3, 1), rank=2, alpha=2)
    model = nn.Sequential(nn.Linear(4, 4))
    lrsurgery.inject(model, rank=2, targets=["0"])
    with pytest.raises(LrsurgeryError, match="already has LoRA"):
        lrsurgery.inject(model, rank=2, targets=["0"])


# --- dropout only on the branch ----------------------------------------------------------------------

def test_dropout_is_applied_to_the_branch_input_only() -> None:
    torch.manual_seed(0)
    base = nn.Linear(16, 12)
    layer = LoRALinear(base, rank=4, alpha=8, dropout=0.5)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(6, 16)
    layer.train()
    torch.manual_seed(123)
    y = layer(x)
    torch.manual_seed(123)
    h = F.dropout(x, 0.5, training=True)  # the same mask the layer drew
    assert not torch.equal(h, x)
    with torch.no_grad():
        expected = F.linear(x, base.weight, base.bias) + 2.0 * F.linear(F.linear(h, layer.lora_A), layer.lora_B)
    assert torch.allclose(y, expected, rtol=0, atol=1e-6)
    # eval: no dropout at all, deterministic, and the full branch
    layer.eval()
    with torch.no_grad():
        full = F.linear(x, base.weight, base.bias) + 2.0 * F.linear(F.linear(x, layer.lora_A), layer.lora_B)
        assert torch.equal(layer(x), layer(x))
        assert torch.allclose(layer(x), full, rtol=0, atol=1e-6)


def test_dropout_in_a_model_never_touches_the_base_path(cases, randomize_b) -> None:
    case = cases["vit"]  # timm ViT has no dropout of its own: train mode is deterministic without LoRA
    model = case.load()
    y_base = case.run(model)
    torch.manual_seed(5)  # A is drawn from the global RNG: the reference below draws the same A
    lrsurgery.inject(model, rank=4, alpha=8, dropout=0.5)
    model.train()
    # B = 0: whatever dropout does to the branch input, train-mode output is exactly the base output
    torch.manual_seed(0)
    assert torch.equal(case.run(model), y_base)
    randomize_b(model, seed=4)
    torch.manual_seed(0)
    y1 = case.run(model)
    torch.manual_seed(1)
    y2 = case.run(model)
    assert max_diff(y1, y2) > 1e-4  # dropout is active on the branch in train mode
    model.eval()
    y_eval = case.run(model)
    assert torch.equal(y_eval, case.run(model))  # deterministic in eval mode
    reference = case.load()  # the same adapter without dropout
    torch.manual_seed(5)
    lrsurgery.inject(reference, rank=4, alpha=8)
    assert all(torch.equal(a.lora_A, b.lora_A) for a, b in
               zip(lrsurgery.lora_modules(model).values(), lrsurgery.lora_modules(reference).values()))
    randomize_b(reference, seed=4)
    assert torch.equal(case.run(reference), y_eval)


# --- init and dtypes ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["gpt2", "minilm"])
def test_init_a_kaiming_uniform_b_zero(cases, name: str) -> None:
    model = cases[name].load()
    torch.manual_seed(0)
    lrsurgery.inject(model, rank=8, alpha=16)
    for n, layer in lrsurgery.lora_modules(model).items():
        bound = 1 / math.sqrt(layer.in_features)
        a = layer.lora_A.detach()
        assert a.shape == (8, layer.in_features) and layer.lora_B.shape == (layer.out_features, 8)
        assert a.abs().max().item() <= bound, n
        assert a.abs().max().item() > 0.9 * bound, n  # uniform over the whole interval, not a narrower one
        # U(-b, b) has std b/sqrt(3)
        assert a.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.25), n
        assert torch.count_nonzero(layer.lora_B) == 0, n
        assert layer.lora_A.dtype == layer.lora_B.dtype == torch.float32


def test_bf16_base_gets_fp32_factors(cases, randomize_b) -> None:
    case = cases["llama"]
    model = case.load().to(torch.bfloat16)
    y0 = case.run(model)
    assert y0.dtype == torch.bfloat16
    lrsurgery.inject(model, rank=4, alpha=8)
    for layer in lrsurgery.lora_modules(model).values():
        assert layer.weight.dtype == torch.bfloat16
        assert layer.lora_A.dtype == layer.lora_B.dtype == torch.float32
    y1 = case.run(model)
    assert y1.dtype == torch.bfloat16 and torch.equal(y1, y0)
    randomize_b(model, seed=5)
    assert max_diff(case.run(model), y0) > 1e-3
    lrsurgery.merge(model)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


def test_explicit_adapter_dtype() -> None:
    layer = LoRALinear(nn.Linear(8, 8).to(torch.bfloat16), rank=2, alpha=2, adapter_dtype=torch.bfloat16)
    assert layer.lora_A.dtype == torch.bfloat16
    assert LoRALinear(nn.Linear(8, 8).double(), rank=2, alpha=2).lora_A.dtype == torch.float64


# --- eject -------------------------------------------------------------------------------------------

def test_eject_without_merge_restores_the_base_function(cases, randomize_b) -> None:
    case = cases["gpt2"]
    model = case.load()
    y0 = case.run(model)
    state0 = {k: v.clone() for k, v in model.state_dict().items()}
    lrsurgery.inject(model, rank=4, alpha=8)
    randomize_b(model, seed=6)
    names = lrsurgery.eject(model)
    assert len(names) == 8 and lrsurgery.lora_modules(model) == {}
    assert torch.equal(case.run(model), y0)
    state1 = model.state_dict()
    assert set(state1) == set(state0) and all(torch.equal(state1[k], state0[k]) for k in state0)


# --- parity with PEFT --------------------------------------------------------------------------------

@pytest.mark.parametrize("rslora", [False, True], ids=["lora", "rslora"])
@pytest.mark.parametrize("name", MODELS)
def test_equals_peft(cases, record_property, name: str, rslora: bool) -> None:
    peft = pytest.importorskip("peft")
    from peft.tuners.lora import LoraLayer

    case = cases[name]
    ours, theirs = case.load(), case.load()
    y_base = case.run(ours)
    peft_model = peft.get_peft_model(theirs, peft.LoraConfig(r=4, lora_alpha=8, target_modules=case.preset,
                                                              use_rslora=rslora, **case.peft_extra))
    lrsurgery.inject(ours, rank=4, alpha=8, targets=case.preset, rslora=rslora)
    layers = lrsurgery.lora_modules(ours)

    g = torch.Generator().manual_seed(7)
    copied = set()
    with torch.no_grad():
        for full_name, module in peft_model.named_modules():
            if not isinstance(module, LoraLayer):
                continue
            name_ = full_name.removeprefix("base_model.model.")
            a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
            b.copy_(torch.randn(b.shape, generator=g) * 0.1)  # PEFT's B starts at zero too
            layers[name_].lora_A.copy_(a)
            layers[name_].lora_B.copy_(b)
            assert layers[name_].scaling == module.scaling["default"]
            assert layers[name_].fan_in_fan_out == (name == "gpt2")
            copied.add(name_)
    assert copied == set(layers) and len(copied) == case.n_preset

    peft_model.eval()
    y_ours, y_peft = case.run(ours), case.run(peft_model)
    diff = max_diff(y_ours, y_peft)
    assert max_diff(y_ours, y_base) > 1e-3  # the adapters matter
    lrsurgery.merge(ours)
    merged = peft_model.merge_and_unload()
    s_ours, s_peft = ours.state_dict(), merged.state_dict()
    assert set(s_ours) == set(s_peft)
    wdiff = max(max_diff(s_ours[k], s_peft[k]) for k in s_ours)
    record_property("peft_output_max_abs_diff", diff)
    record_property("peft_merged_weight_max_abs_diff", wdiff)
    print(f"\n[peft] {name} rslora={rslora}: max|ours - peft| output {diff:.3e}, merged weights {wdiff:.3e}")
    assert diff <= 1e-6
    assert wdiff <= 1e-6
