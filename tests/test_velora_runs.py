"""VeLoRA through inject/train/save/apply/merge: `--method velora --groups G` and `--method lora --velora-groups G`."""

from __future__ import annotations

import pytest
import torch

import lrsurgery
from lrsurgery.layers.velora import VeLoRALinear, VeLoRALoRALinear
from lrsurgery.memory import SavedTensorMeter
from lrsurgery.optim import OptimConfig
from lrsurgery.run import create_run, open_run, train_run
from lrsurgery.train.loop import TrainConfig
from conftest import train_until_killed

CFG = dict(steps=4, batch_size=16, progress=False)


def test_velora_run_trains_saves_and_merges(digits_vit_dir, tmp_path):
    run, report = create_run(str(digits_vit_dir), tmp_path / "v", method="velora", groups=8, targets=["mlp.fc2"],
                             train="head")
    assert all(isinstance(run.model.get_submodule(n), VeLoRALinear) for n in report.config.targets)
    assert report.trainable_params == 2 * (32 * 128 + 32) + 5 * 32 + 5  # two full fc2 layers + the head
    train_run(tmp_path / "v", "digits:5-9", TrainConfig(**CFG))
    adapter = lrsurgery.load_adapter(tmp_path / "v" / "adapter.safetensors")
    assert adapter.meta["method"] == "velora" and adapter.meta["config"]["groups"] == 8
    assert {n for n, e in adapter.modules.items() if e["kind"] == "full"} == {"head", "blocks.0.mlp.fc2",
                                                                              "blocks.1.mlp.fc2"}
    trained = open_run(tmp_path / "v").model.eval()
    plain = lrsurgery.load_model(str(digits_vit_dir))
    lrsurgery.apply_adapter(plain, adapter)  # onto a plain model: the trained weights, no VeLoRA needed
    x = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(trained(x), plain.eval()(x))
    merged = lrsurgery.merge(trained)
    assert not any(isinstance(m, VeLoRALinear) for m in merged.modules())


def test_lora_with_velora_on_the_a_branch(digits_vit_dir, tmp_path):
    run, report = create_run(str(digits_vit_dir), tmp_path / "lv", rank=4, targets=["mlp.fc2"], train="head",
                             velora_groups=4)
    assert all(isinstance(run.model.get_submodule(n), VeLoRALoRALinear) for n in report.config.targets)
    train_run(tmp_path / "lv", "digits:5-9", TrainConfig(**CFG, optim=OptimConfig(name="adamw")))
    adapter = lrsurgery.load_adapter(tmp_path / "lv" / "adapter.safetensors")
    assert adapter.modules["blocks.0.mlp.fc2"]["kind"] == "lora"
    reopened = open_run(tmp_path / "lv").model
    assert isinstance(reopened.get_submodule("blocks.0.mlp.fc2"), VeLoRALoRALinear)


def test_velora_fc2_saves_d_over_g_fewer_bytes_in_a_vit(digits_vit_dir):
    """fc2's input (the GELU output) is held by nothing else, so compressing it pays off exactly."""
    def saved(method: str) -> int:
        model = lrsurgery.load_model(str(digits_vit_dir)).train()
        if method == "velora":
            lrsurgery.inject(model, method="velora", groups=8, targets=["mlp.fc2"])
        else:
            lrsurgery.inject(model, method="full", train=["blocks.0.mlp.fc2", "blocks.1.mlp.fc2"])
        x = torch.randn(4, 1, 16, 16)
        meter = SavedTensorMeter(exclude=[*model.parameters(), *model.buffers()])
        with meter:
            model(x).sum()
        return meter.bytes
    tokens, width, groups = 4 * 17, 128, 8  # 16 patches + the class token; fc2's input width
    plain, velora = saved("full"), saved("velora")
    per_layer = tokens * width * 4 - (tokens * groups * 4 + (width // groups) * 4)
    assert plain - velora == 2 * per_layer


def test_velora_needs_groups(digits_vit_dir, tmp_path):
    with pytest.raises(lrsurgery.LrsurgeryError, match="--groups"):
        create_run(str(digits_vit_dir), tmp_path / "x", method="velora", targets=["mlp.fc2"])


def test_velora_resume_is_bit_identical(digits_vit_dir, tmp_path):
    config = TrainConfig(steps=6, batch_size=16, progress=False)
    for d in ("a", "b"):
        create_run(str(digits_vit_dir), tmp_path / d, rank=2, targets=["mlp.fc2"], velora_groups=4, train="head")
    train_run(tmp_path / "a", "digits:5-9", config)
    train_until_killed(tmp_path / "b", "digits:5-9", config, kill_after=5, checkpoint_every=3)
    train_run(tmp_path / "b", "digits:5-9", config, resume=True)
    a = lrsurgery.load_adapter(tmp_path / "a" / "adapter.safetensors").tensors
    b = lrsurgery.load_adapter(tmp_path / "b" / "adapter.safetensors").tensors
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("kwargs", [dict(method="velora", groups=8), dict(rank=4, velora_groups=8)])
def test_adapter_file_carries_velora_vectors(digits_vit_dir, tmp_path, kwargs):
    """v is set by the first batch; the file stores it (with G and its init) and a reopened run gets it back."""
    create_run(str(digits_vit_dir), tmp_path / "r", targets=["mlp.fc2"], train="head", **kwargs)
    train_run(tmp_path / "r", "digits:5-9", TrainConfig(**CFG))
    adapter = lrsurgery.load_adapter(tmp_path / "r" / "adapter.safetensors")
    entry = adapter.modules["blocks.0.mlp.fc2"]
    assert entry["velora"] == {"groups": 8, "group_dim": 16, "init": "batch_average_once", "scale": 1.0, "pad": False}
    v = adapter.tensors["blocks.0.mlp.fc2.velora_v"]
    assert v.shape == (16,) and abs(float(v.norm()) - 1.0) < 1e-6  # a unit vector, set by training
    reopened = open_run(tmp_path / "r").model
    assert torch.equal(reopened.blocks[0].mlp.fc2.velora.v, v)
    # a plain base (no VeLoRA layer) ignores the vector: inference does not need it
    plain = lrsurgery.load_model(str(digits_vit_dir))
    lrsurgery.apply_adapter(plain, adapter)
