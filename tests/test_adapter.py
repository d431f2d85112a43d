"""Adapter files against real bases: exact round trips, and refusing adapters made for other weights or shapes."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import lrsurgery
from lrsurgery import format as fmt
from lrsurgery.errors import BaseMismatchError, LrsurgeryError, OutputExistsError, ShapeMismatchError


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)  # LoRA A and random heads come from the global RNG: same values on every run


def make_adapted(case, randomize_b, seed: int = 0, train=None, rslora: bool = False, **load_kwargs) -> nn.Module:
    model = case.load(**load_kwargs)
    torch.manual_seed(seed)
    lrsurgery.inject(model, rank=4, alpha=8, train=train, rslora=rslora)
    randomize_b(model, seed=seed + 100)
    with torch.no_grad():
        for name in train or []:
            for p in model.get_submodule(name).parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)))
    return model


# --- round trips --------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, train, rslora", [
    ("vit", ["head"], False),
    ("gpt2", None, True),
    ("llama", None, False),
    ("minilm", None, False),
])
def test_save_then_apply_reproduces_outputs_exactly(cases, randomize_b, tmp_path: Path, name: str, train,
                                                    rslora: bool) -> None:
    case = cases[name]
    model = make_adapted(case, randomize_b, train=train, rslora=rslora)
    y = case.run(model)
    assert (y - case.run(case.load())).abs().max().item() > 1e-3
    path = lrsurgery.save_adapter(model, tmp_path / "a.safetensors")

    fresh = case.load()
    adapter = lrsurgery.apply_adapter(fresh, path)
    assert torch.equal(case.run(fresh), y)
    layers, applied = lrsurgery.lora_modules(model), lrsurgery.lora_modules(fresh)
    assert list(applied) == list(layers) and len(applied) == case.n_preset
    for n, layer in applied.items():
        assert torch.equal(layer.lora_A, layers[n].lora_A) and torch.equal(layer.lora_B, layers[n].lora_B)
        assert (layer.rank, layer.scaling, layer.rslora) == (4, layers[n].scaling, rslora)
    assert not any(p.requires_grad for p in fresh.parameters())  # applied for inference: frozen
    cfg = fresh.lrsurgery_adapter
    assert (cfg.rank, cfg.alpha, cfg.rslora, cfg.targets, cfg.train) == (4, 8.0, rslora, list(layers), train or [])
    # what the file says
    assert adapter.meta["base"]["ref"] == case.ref
    assert adapter.meta["method"] == "lora"
    kinds = [e["kind"] for e in adapter.modules.values()]
    assert kinds.count("lora") == case.n_preset and kinds.count("full") == len(train or [])
    first = next(iter(layers))
    rec = adapter.modules[first]["base_tensors"]["weight"]
    assert rec == {"sha256": fmt.tensor_sha256(layers[first].weight), "shape": list(layers[first].weight.shape),
                   "dtype": "float32"}
    assert adapter.modules[first]["fan_in_fan_out"] is (name == "gpt2")


def test_apply_into_existing_lora_layers(cases, randomize_b, tmp_path: Path) -> None:
    case = cases["vit"]
    model = make_adapted(case, randomize_b)
    path = lrsurgery.save_adapter(model, tmp_path / "a.safetensors")
    target = case.load()
    lrsurgery.inject(target, rank=4, alpha=8)  # B = 0: a no-op adapter, to be overwritten
    lrsurgery.apply_adapter(target, path)
    assert torch.equal(case.run(target), case.run(model))
    other_rank = case.load()
    lrsurgery.inject(other_rank, rank=2, alpha=8)
    y_before = case.run(other_rank)
    with pytest.raises(ShapeMismatchError, match=r"rank 2 in the model but .*rank 4"):
        lrsurgery.apply_adapter(other_rank, path)
    assert torch.equal(case.run(other_rank), y_before)


def test_apply_then_merge_equals_adapted(cases, randomize_b, tmp_path: Path) -> None:
    case = cases["llama"]
    model = make_adapted(case, randomize_b)
    path = lrsurgery.save_adapter(model, tmp_path / "a.safetensors")
    fresh = case.load()
    lrsurgery.apply_adapter(fresh, path)
    lrsurgery.merge(fresh)
    assert (case.run(fresh) - case.run(model)).abs().max().item() <= 1e-5


def test_apply_trainable_leaves_only_adapter_parts_trainable(cases, randomize_b, tmp_path: Path) -> None:
    case = cases["vit"]
    path = lrsurgery.save_adapter(make_adapted(case, randomize_b, train=["head"]), tmp_path / "a.safetensors")
    fresh = case.load()
    lrsurgery.apply_adapter(fresh, path, trainable=True)
    trainable = {n for n, p in fresh.named_parameters() if p.requires_grad}
    expected = {f"{n}.lora_{p}" for n in lrsurgery.lora_modules(fresh) for p in "AB"} | {"head.weight", "head.bias"}
    assert trainable == expected


def test_save_adapter_refuses_to_overwrite(cases, randomize_b, tmp_path: Path) -> None:
    model = make_adapted(cases["vit"], randomize_b)
    path = lrsurgery.save_adapter(model, tmp_path / "a.safetensors")
    before = path.read_bytes()
    with pytest.raises(OutputExistsError):
        lrsurgery.save_adapter(model, path)
    assert path.read_bytes() == before
    lrsurgery.save_adapter(model, path, force=True)


# --- refusing the wrong base --------------------------------------------------------------------------

def test_other_base_weights_are_refused(cases, randomize_b, vit_other_dir: Path, tmp_path: Path) -> None:
    path = lrsurgery.save_adapter(make_adapted(cases["vit"], randomize_b), tmp_path / "a.safetensors")
    other = lrsurgery.load_model(str(vit_other_dir))
    y_other = cases["vit"].run(other)
    with pytest.raises(BaseMismatchError) as err:
        lrsurgery.apply_adapter(other, path)
    msg = str(err.value)
    assert "8 of 8 modified weights differ" in msg and "--force" in msg
    assert "(e.g. blocks.0.attn.proj)" in msg  # the first mismatch in the file's (sorted) module order
    assert cases["vit"].ref in msg
    # refused before touching the model
    assert lrsurgery.lora_modules(other) == {}
    assert torch.equal(cases["vit"].run(other), y_other)


def test_one_changed_weight_is_named(cases, randomize_b, tmp_path: Path) -> None:
    path = lrsurgery.save_adapter(make_adapted(cases["gpt2"], randomize_b), tmp_path / "a.safetensors")
    base = cases["gpt2"].load()
    with torch.no_grad():
        base.transformer.h[1].mlp.c_fc.weight[3, 5] += 1e-3
    expected = r"1 of 8 modified weights differ \(e\.g\. transformer\.h\.1\.mlp\.c_fc\)"
    with pytest.raises(BaseMismatchError, match=expected):
        lrsurgery.apply_adapter(base, path)


def test_force_applies_with_a_warning(cases, randomize_b, vit_other_dir: Path, tmp_path: Path) -> None:
    model = make_adapted(cases["vit"], randomize_b)
    path = lrsurgery.save_adapter(model, tmp_path / "a.safetensors")
    other = lrsurgery.load_model(str(vit_other_dir))
    adapter = lrsurgery.load_adapter(path)
    with pytest.warns(UserWarning, match="applying anyway because of --force") as rec:
        mismatched = lrsurgery.check_base(other, adapter, force=True)
    assert len(rec) == 1
    assert mismatched == sorted(lrsurgery.lora_modules(model))
    with pytest.warns(UserWarning, match="--force"):
        lrsurgery.apply_adapter(other, path, force=True)
    applied = lrsurgery.lora_modules(other)
    assert len(applied) == 8
    assert all(torch.equal(applied[n].lora_B, l.lora_B) for n, l in lrsurgery.lora_modules(model).items())


def test_wrong_num_classes_says_so(cases, randomize_b, vit_dir: Path, tmp_path: Path) -> None:
    case = cases["vit"]
    model = make_adapted(case, randomize_b, train=["head"], num_classes=3)
    assert model.head.out_features == 3
    path = lrsurgery.save_adapter(model, tmp_path / "a.safetensors")
    with pytest.raises(ShapeMismatchError) as err:
        lrsurgery.apply_adapter(lrsurgery.load_model(str(vit_dir)), path)
    msg = str(err.value)
    assert msg == "head.bias has shape [5] in this model but [3] in the adapter; load the base with num_classes=3"
    right = lrsurgery.load_model(str(vit_dir), num_classes=3, seed=9)  # another head init: it is overwritten
    lrsurgery.apply_adapter(right, path)
    assert torch.equal(case.run(right), case.run(model))


def test_adapter_for_another_architecture_is_refused(cases, randomize_b, tmp_path: Path) -> None:
    path = lrsurgery.save_adapter(make_adapted(cases["gpt2"], randomize_b), tmp_path / "gpt2.safetensors")
    llama = cases["llama"].load()
    with pytest.raises(BaseMismatchError) as err:
        lrsurgery.apply_adapter(llama, path)
    assert "'transformer.h.0.attn.c_attn' does not exist in this model" in str(err.value)
    assert lrsurgery.lora_modules(llama) == {}


def test_module_of_another_kind_or_size_is_refused(cases, randomize_b, tmp_path: Path) -> None:
    adapter = lrsurgery.adapter_from_model(make_adapted(cases["vit"], randomize_b))
    model = cases["vit"].load()
    model.blocks[0].attn.qkv = nn.Identity()
    with pytest.raises(BaseMismatchError, match="blocks.0.attn.qkv is a Identity here"):
        lrsurgery.check_base(model, adapter)
    model.blocks[0].attn.qkv = nn.Linear(32, 64)
    with pytest.raises(ShapeMismatchError, match=r"64×32 \(out×in\) but the adapter expects 96×32"):
        lrsurgery.check_base(model, adapter)


# --- what cannot be an adapter ------------------------------------------------------------------------

def test_merged_model_cannot_be_saved_as_adapter(cases, randomize_b, tmp_path: Path) -> None:
    model = make_adapted(cases["vit"], randomize_b)
    lrsurgery.merge(model)
    with pytest.raises(LrsurgeryError, match="no adapters"):
        lrsurgery.save_adapter(model, tmp_path / "a.safetensors")
    # merged in place but still wrapped
    model = make_adapted(cases["vit"], randomize_b)
    model.get_submodule("blocks.1.mlp.fc1").merge()
    with pytest.raises(LrsurgeryError, match="blocks.1.mlp.fc1 is merged into its base; unmerge"):
        lrsurgery.save_adapter(model, tmp_path / "a.safetensors")
    assert not (tmp_path / "a.safetensors").exists()
    with pytest.raises(LrsurgeryError, match="no adapters"):
        lrsurgery.adapter_from_model(cases["vit"].load())


# --- dtypes and the base hash -------------------------------------------------------------------------

def test_bf16_base_adapter_applies_to_the_same_weights_upcast(cases, randomize_b, tmp_path: Path) -> None:
    case = cases["llama"]
    model = case.load().to(torch.bfloat16)
    torch.manual_seed(0)
    lrsurgery.inject(model, rank=4, alpha=8)
    randomize_b(model, seed=1)
    path = lrsurgery.save_adapter(model, tmp_path / "a.safetensors")
    adapter = lrsurgery.load_adapter(path)
    entry = next(iter(adapter.modules.values()))
    assert entry["base_tensors"]["weight"]["dtype"] == "bfloat16" and entry["dtype"] == "float32"
    assert all(t.dtype == torch.float32 for t in adapter.tensors.values())

    upcast = case.load().to(torch.bfloat16).to(torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # accepted without the --force warning
        assert lrsurgery.check_base(upcast, adapter) == []
        lrsurgery.apply_adapter(upcast, adapter)
    layers, applied = lrsurgery.lora_modules(model), lrsurgery.lora_modules(upcast)
    for n, layer in applied.items():
        assert torch.equal(layer.weight, layers[n].weight.float())
        assert torch.equal(layer.lora_A, layers[n].lora_A) and torch.equal(layer.lora_B, layers[n].lora_B)
    # the fp32 model computes what the bf16 one approximates
    y32, y16 = case.run(upcast), case.run(model)
    assert (y32 - y16.float()).abs().max().item() < 0.05 * y32.abs().max().item()


def test_fp32_adapter_refuses_the_base_rounded_to_bf16(cases, randomize_b, tmp_path: Path) -> None:
    case = cases["llama"]
    path = lrsurgery.save_adapter(make_adapted(case, randomize_b), tmp_path / "a.safetensors")
    rounded = case.load().to(torch.bfloat16)
    with pytest.raises(BaseMismatchError, match="14 of 14 modified weights differ"):
        lrsurgery.apply_adapter(rounded, path)
