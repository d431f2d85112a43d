"""torchrun with 2 CPU processes (gloo) equals one process with the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import lrsurgery
from lrsurgery.optim import OptimConfig
from lrsurgery.run import create_run, open_run, train_run
from lrsurgery.train.loop import TrainConfig

CASES = {  # name: (inject kwargs, CLI optimizer args, OptimConfig)
    "adamw-lora": (dict(rank=2, alpha=4, targets="preset", train="head"), [], OptimConfig()),
    "galore-full": (dict(method="full"), ["--optimizer", "galore", "--optim-rank", "4", "--update-gap", "2"],
                    OptimConfig(name="galore", rank=4, update_gap=2)),
    "flora-full": (dict(method="full"), ["--optimizer", "flora", "--optim-rank", "4", "--kappa", "2"],
                   OptimConfig(name="flora", rank=4, kappa=2)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_two_processes_equal_one(digits_vit_dir, tmp_path, case):
    inject_kwargs, cli_args, optim = CASES[case]
    for d in ("one", "two"):
        create_run(str(digits_vit_dir), tmp_path / d, seed=1, **inject_kwargs)
    train_run(tmp_path / "one", "digits:5-9", TrainConfig(steps=4, batch_size=16, accumulation=2, lr=1e-3,
                                                          optim=optim, progress=False))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "lrsurgery", "train", str(tmp_path / "two"), "--data", "digits:5-9", "--steps", "4",
           "--batch-size", "16", "--accumulation", "2", "--lr", "1e-3", "--no-progress", "--device", "cpu",
           *cli_args]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    one = lrsurgery.load_adapter(tmp_path / "one" / "adapter.safetensors").tensors
    two = lrsurgery.load_adapter(tmp_path / "two" / "adapter.safetensors").tensors
    for k in one:
        a, b = one[k].double(), two[k].double()
        if k.endswith("attn.qkv.bias"):
            # The key bias gets only float-noise gradients (softmax ignores a per-query constant);
            # Adafactor's ε=1e-30 turns noise into full steps, so compare the q and v thirds only.
            a, b = torch.cat([a[:32], a[64:]]), torch.cat([b[:32], b[64:]])
        assert float((a - b).abs().max()) <= 1e-5, k
    x = torch.randn(8, 1, 16, 16)
    with torch.no_grad():
        y1, y2 = (open_run(tmp_path / d).model.eval()(x) for d in ("one", "two"))
    assert float((y1 - y2).abs().max()) <= 1e-5
