"""A killed run resumed from its checkpoint reaches bit-identical weights to an uninterrupted run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import lrsurgery
from lrsurgery.errors import LrsurgeryError
from lrsurgery.optim import OptimConfig
from lrsurgery.run import create_run, train_run
from lrsurgery.train.loop import TrainConfig
from lrsurgery.train.relora import ReLoRAConfig
from conftest import train_until_killed


def configs() -> dict[str, TrainConfig]:
    common = dict(steps=10, batch_size=16, accumulation=2, lr=3e-3, max_grad_norm=1.0, progress=False, seed=3)
    return {
        "adamw": TrainConfig(**common),
        "relora": TrainConfig(**common, relora=ReLoRAConfig(restart_every=4, restart_warmup=1, warmup=2, prune=0.9)),
    }


def adapter_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    return lrsurgery.load_adapter(run_dir / "adapter.safetensors").tensors


@pytest.mark.parametrize("name", ["adamw", "relora"])
def test_kill_and_resume_is_bit_identical(digits_vit_dir, tmp_path, name):
    config = configs()[name]
    for d in ("straight", "killed"):
        create_run(str(digits_vit_dir), tmp_path / d, rank=2, alpha=4, targets="preset", train="head", seed=1)
    train_run(tmp_path / "straight", "digits:5-9", config)

    # the process dies after step 8; the last checkpoint is step 6
    train_until_killed(tmp_path / "killed", "digits:5-9", config, kill_after=8, checkpoint_every=3)
    assert (tmp_path / "killed" / "checkpoint" / "trainer.pt").is_file()
    # resume ignores the settings given now and continues with the killed session's own
    train_run(tmp_path / "killed", "digits:5-9", TrainConfig(progress=False), resume=True)

    a, b = adapter_tensors(tmp_path / "straight"), adapter_tensors(tmp_path / "killed")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    steps = [json.loads(ln)["step"] for ln in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(ln)]
    assert steps == list(range(1, 11))  # the steps logged after the checkpoint were replaced, not duplicated
    assert not (tmp_path / "killed" / "checkpoint").exists()  # a finished session removes its checkpoint
    if name == "relora":
        assert lrsurgery.load_adapter(tmp_path / "killed" / "adapter.safetensors").modules["blocks.0.attn.qkv"][
            "folded_rank"] == 4  # two restarts of rank 2


def test_resume_without_checkpoint_is_an_error(digits_vit_dir, tmp_path):
    create_run(str(digits_vit_dir), tmp_path / "run", rank=2, targets="preset", train="head")
    with pytest.raises(LrsurgeryError, match="nothing to resume"):
        train_run(tmp_path / "run", "digits:5-9", TrainConfig(progress=False), resume=True)


def test_config_round_trips_through_a_dict():
    config = TrainConfig(steps=5, optim=OptimConfig(name="galore", rank=4), relora=ReLoRAConfig(restart_every=10, restart_warmup=2))
    assert TrainConfig.from_dict(config.as_dict()) == config


def test_cli_resume_names_the_given_options_it_ignores(digits_vit_dir, tmp_path):
    from click.testing import CliRunner
    from lrsurgery.cli import main
    create_run(str(digits_vit_dir), tmp_path / "run", rank=2, alpha=4, targets="preset", train="head", seed=1)
    config = TrainConfig(steps=6, batch_size=16, lr=3e-3, progress=False)
    train_until_killed(tmp_path / "run", "digits:5-9", config, kill_after=4, checkpoint_every=3)
    result = CliRunner().invoke(main, ["train", str(tmp_path / "run"), "--data", "digits:5-9", "--resume",
                                       "--lr", "0.5", "--steps", "100", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "warning: --resume continues the killed session with its own settings; ignoring --lr, --steps" \
        in result.output
    assert json.loads((tmp_path / "run" / "recipe.json").read_text())["sessions"][-1]["steps"] == 6


def test_resume_in_a_later_session_keeps_run_wide_step_numbers(digits_vit_dir, tmp_path):
    create_run(str(digits_vit_dir), tmp_path / "run", rank=2, alpha=4, targets="preset", train="head", seed=1)
    train_run(tmp_path / "run", "digits:5-9", TrainConfig(steps=3, batch_size=16, progress=False))
    config = TrainConfig(steps=6, batch_size=16, lr=3e-3, progress=False)
    # session 2 dies after its step 5 (run-wide step 8); its last checkpoint is its step 4 (run-wide 7)
    train_until_killed(tmp_path / "run", "digits:5-9", config, kill_after=8, checkpoint_every=2)
    train_run(tmp_path / "run", "digits:5-9", config, resume=True)
    records = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["session"], r["step"]) for r in records if "loss" in r] == \
        [(1, 1), (1, 2), (1, 3)] + [(2, s) for s in range(4, 10)]
