"""Merging: the file path (plain state dict) equals the in-memory path bit for bit; base checks; outputs.

Models: a tiny timm ViT (nn.Linear) and a tiny GPT-2 LM (Conv1D, weights stored [in, out]), saved to
disk once for this module. Measured differences are printed (``pytest -s``) and recorded as properties.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import lrsurgery
from lrsurgery import format as fmt
from lrsurgery.errors import BaseMismatchError, OutputExistsError, ShapeMismatchError
from lrsurgery.ops.merge import delta_weight, merge_files, merge_into_model, merge_state_dict


@pytest.fixture(scope="module")
def mg_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("merge")


SPECS = {  # family → (dir fixture, targets, modules trained in full)
    "vit": ("digits_vit_dir", None, ["head"]),
    "gpt2": ("lm_dir", "preset", ["transformer.ln_f"]),
}


@torch.no_grad()
def make_adapted(ref: str, targets, train, seed: int = 0) -> nn.Module:
    """A model with LoRA on ``targets`` (random A and B) and perturbed full-trained modules."""
    model = lrsurgery.load_model(ref)
    lrsurgery.inject(model, rank=4, alpha=8, targets=targets, train=train)
    g = torch.Generator().manual_seed(seed)
    for _, layer in sorted(lrsurgery.lora_modules(model).items()):
        layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g) * 0.2)
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.2)
    for name in train:
        for p in model.get_submodule(name).parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture(scope="module")
def adapted(request) -> dict[str, tuple[nn.Module, fmt.Adapter, Path]]:
    """Per family: the adapted model, its adapter, and the base directory."""
    out = {}
    for fam, (fixture, targets, train) in SPECS.items():
        base_dir = request.getfixturevalue(fixture)
        model = make_adapted(str(base_dir), targets, train)
        out[fam] = (model, lrsurgery.adapter_from_model(model), base_dir)
    return out


@pytest.fixture(scope="module")
def vit_adapter_file(mg_root: Path, adapted) -> Path:
    model, _, _ = adapted["vit"]
    return lrsurgery.save_adapter(model, mg_root / "vit-adapter.safetensors")


def vit_input() -> torch.Tensor:
    return torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(9))


def record(record_property, key: str, value: float) -> None:
    record_property(key, value)
    print(f"\n[merge] {key} = {value:.3e}")


# --- merge_state_dict == in-memory merge -----------------------------------------------------------------

@pytest.mark.parametrize("fam", ["vit", "gpt2"])
def test_state_dict_merge_equals_in_memory_merge_bit_for_bit(adapted, fam: str) -> None:
    _, adapter, base_dir = adapted[fam]
    state = load_file(str(base_dir / "model.safetensors"))
    pristine = {k: v.clone() for k, v in state.items()}
    lora = [n for n, e in adapter.modules.items() if e["kind"] == "lora"]
    assert len(lora) == 8
    if fam == "gpt2":
        assert all(e["fan_in_fan_out"] for e in adapter.modules.values() if e["kind"] == "lora")

    merged = merge_state_dict(state, adapter)

    model = lrsurgery.load_model(str(base_dir))
    lrsurgery.apply_adapter(model, adapter)
    lrsurgery.merge(model)
    assert lrsurgery.lora_modules(model) == {}
    mem = model.state_dict()
    assert set(merged) == set(state)  # nothing added, nothing dropped
    for k, v in merged.items():
        assert torch.equal(v, mem[k]), k
        assert v.dtype == state[k].dtype
    # every adapted weight did change, by exactly the adapter's ΔW rounded to float32
    for n in lora:
        key = f"{n}.weight"
        assert not torch.equal(merged[key], pristine[key])
        assert torch.equal(merged[key], (pristine[key].float() + delta_weight(adapter, n)).float())
    # the input state dict is not modified
    for k in state:
        assert torch.equal(state[k], pristine[k])


def test_wrong_base_is_refused_unless_forced(adapted, digits_vit_other_dir: Path) -> None:
    _, adapter, _ = adapted["vit"]
    other = load_file(str(digits_vit_other_dir / "model.safetensors"))
    with pytest.raises(BaseMismatchError, match="8 base weights differ"):
        merge_state_dict(other, adapter)
    merged = merge_state_dict(other, adapter, force=True)
    for n, e in adapter.modules.items():
        if e["kind"] == "lora":
            key = f"{n}.weight"
            assert torch.equal(merged[key], other[key] + delta_weight(adapter, n))
        else:
            for p in e["tensors"]:
                assert torch.equal(merged[f"{n}.{p}"], adapter.tensors[f"{n}.{p}"])


def test_missing_or_misshapen_key_is_refused(adapted, digits_vit_dir: Path) -> None:
    _, adapter, _ = adapted["vit"]
    state = load_file(str(digits_vit_dir / "model.safetensors"))
    missing = dict(state)
    del missing["blocks.1.mlp.fc2.weight"]
    with pytest.raises(BaseMismatchError, match="blocks.1.mlp.fc2.weight"):
        merge_state_dict(missing, adapter)
    bad = dict(state)
    bad["blocks.0.attn.qkv.weight"] = bad["blocks.0.attn.qkv.weight"][:, :16]
    with pytest.raises(ShapeMismatchError):
        merge_state_dict(bad, adapter, force=True)


# --- merge_files -----------------------------------------------------------------------------------------

def test_merge_files_with_a_model_directory(tmp_path: Path, adapted, digits_vit_dir: Path, vit_adapter_file: Path,
                                            record_property) -> None:
    model, _, _ = adapted["vit"]
    out = tmp_path / "merged"
    assert merge_files(str(digits_vit_dir), vit_adapter_file, out) == out
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    merged = lrsurgery.load_model(str(out))
    assert lrsurgery.lora_modules(merged) == {}
    assert not any("lora_" in k for k in merged.state_dict())
    assert not any("lora_" in k for k in load_file(str(out / "model.safetensors")))

    x = vit_input()
    base = lrsurgery.load_model(str(digits_vit_dir))
    with torch.no_grad():
        y_adapted, y_merged, y_base = model(x), merged(x), base(x)
    diff = (y_merged - y_adapted).abs().max().item()
    effect = (y_adapted - y_base).abs().max().item()
    record(record_property, "merge_files_dir_output_max_diff", diff)
    assert effect > 1e-2, "the adapter must change outputs, or the comparison proves nothing"
    assert diff <= 1e-5

    stamp = (out / "model.safetensors").read_bytes()
    with pytest.raises(OutputExistsError):
        merge_files(str(digits_vit_dir), vit_adapter_file, out)
    merge_files(str(digits_vit_dir), vit_adapter_file, out, force=True)
    assert (out / "model.safetensors").read_bytes() == stamp  # deterministic


def test_merge_files_with_a_safetensors_base(tmp_path: Path, adapted, digits_vit_dir: Path,
                                             vit_adapter_file: Path) -> None:
    _, adapter, _ = adapted["vit"]
    base_file = digits_vit_dir / "model.safetensors"
    out = tmp_path / "merged.safetensors"
    assert merge_files(str(base_file), vit_adapter_file, out) == out
    got = load_file(str(out))
    want = merge_state_dict(load_file(str(base_file)), lrsurgery.load_adapter(vit_adapter_file))
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    assert not any("lora_" in k for k in got)
    # the in-memory adapter and the file give the same result
    assert all(torch.equal(want[k], v) for k, v in merge_state_dict(load_file(str(base_file)), adapter).items())

    with pytest.raises(OutputExistsError):
        merge_files(str(base_file), vit_adapter_file, out)
    merge_files(str(base_file), vit_adapter_file, out, force=True)
    assert set(load_file(str(out))) == set(want)


def test_merge_files_refuses_the_wrong_base_unless_forced(tmp_path: Path, digits_vit_other_dir: Path,
                                                          vit_adapter_file: Path) -> None:
    with pytest.raises(BaseMismatchError):
        merge_files(str(digits_vit_other_dir), vit_adapter_file, tmp_path / "m")
    assert not (tmp_path / "m").exists()
    with pytest.raises(BaseMismatchError):
        merge_files(str(digits_vit_other_dir / "model.safetensors"), vit_adapter_file, tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()
    with pytest.warns(UserWarning, match="force"):
        merge_files(str(digits_vit_other_dir), vit_adapter_file, tmp_path / "m", force_base=True)
    assert lrsurgery.lora_modules(lrsurgery.load_model(str(tmp_path / "m"))) == {}


def test_merge_into_model_returns_a_plain_model(adapted, vit_adapter_file: Path, record_property) -> None:
    model, _, base_dir = adapted["vit"]
    merged = merge_into_model(lrsurgery.load_model(str(base_dir)), vit_adapter_file)
    assert lrsurgery.lora_modules(merged) == {}
    assert not hasattr(merged, "lrsurgery_adapter")
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    x = vit_input()
    with torch.no_grad():
        diff = (merged(x) - model(x)).abs().max().item()
    record(record_property, "merge_into_model_output_max_diff", diff)
    assert diff <= 1e-5
