"""LTE through inject → train → save → apply/merge → resume, on one and on two processes; GaLore per head."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

import lrsurgery
from lrsurgery.cli import main
from lrsurgery.errors import AdapterFormatError, LrsurgeryError, ShapeMismatchError, TrainingError
from lrsurgery.layers.lte import HeadReplicas, LTELinear
from lrsurgery.optim.flora import Flora
from lrsurgery.optim.galore import GaLoreAdamW
from lrsurgery.run import create_run, open_run, train_run
from lrsurgery.surgery import inject, lte_layers
from lrsurgery.train.loop import TrainConfig
from conftest import train_until_killed

LTE = dict(method="lte", rank=2, alpha=4, heads=4, merge_every=3, targets=["mlp.fc1", "mlp.fc2"], train="head")


def tensors(run_dir) -> dict[str, torch.Tensor]:
    return lrsurgery.load_adapter(run_dir / "adapter.safetensors").tensors


def test_inject_lte_wraps_targets_and_replicates_trained_modules(digits_vit_dir):
    model = lrsurgery.load_model(str(digits_vit_dir))
    x = torch.randn(8, 1, 16, 16)
    with torch.no_grad():
        before = model.eval()(x)
    report = inject(model, **LTE)
    layers = lte_layers(model)
    assert sorted(n for n, m in layers.items() if isinstance(m, LTELinear)) == \
        [f"blocks.{i}.mlp.{f}" for i in range(2) for f in ("fc1", "fc2")]
    assert isinstance(model.head, HeadReplicas) and len(model.head.replicas) == 4
    # 4 heads × r(m+n) per layer (fc1 32→128, fc2 128→32) + 4 copies of the 32→5 head
    assert report.trainable_params == 4 * 2 * (2 * (32 + 128)) * 2 + 4 * (32 * 5 + 5)
    assert report.config.heads == 4 and report.config.merge_every == 3 and report.config.lte_mode == "parallel"
    with torch.no_grad():  # B = 0: the injected model computes the base, in training mode too
        assert torch.equal(model.eval()(x), before)
        assert float((model.train()(x) - before).abs().max()) == 0.0


def test_inject_lte_needs_heads_and_interval(digits_vit_dir):
    model = lrsurgery.load_model(str(digits_vit_dir))
    with pytest.raises(LrsurgeryError, match="--heads H"):
        inject(model, method="lte", rank=2, heads=4)


def test_lte_run_saves_dense_change_and_heads_and_reopens_exactly(digits_vit_dir, tmp_path):
    create_run(str(digits_vit_dir), tmp_path / "run", seed=1, **LTE)
    result = train_run(tmp_path / "run", "digits:5-9", TrainConfig(steps=7, batch_size=16, lr=1e-3, progress=False))
    assert result.steps == 7
    adapter = lrsurgery.load_adapter(tmp_path / "run" / "adapter.safetensors")
    entry = adapter.modules["blocks.0.mlp.fc1"]
    assert entry["kind"] == "delta" and entry["lte"] == {"heads": 4, "rank": 2, "alpha": 4.0, "mode": "parallel"}
    assert adapter.tensors["blocks.0.mlp.fc1.delta"].shape == (128, 32)
    assert adapter.tensors["blocks.0.mlp.fc1.lte_A"].shape == (4, 2, 32)
    assert adapter.modules["head"]["kind"] == "full"
    # merges at steps 3, 6 and after the last step 7: the change since injection is full rank
    assert torch.linalg.matrix_rank(adapter.tensors["blocks.0.mlp.fc1.delta"].double()) == 32
    # the dense change is exactly W_trained − W_base (to float rounding of one subtraction)
    base = lrsurgery.load_model(str(digits_vit_dir))
    reopened = open_run(tmp_path / "run").model
    layer = reopened.blocks[0].mlp.fc1
    assert torch.equal(layer.initial_weight, base.blocks[0].mlp.fc1.weight)
    diff = (layer.weight.detach().double() - base.blocks[0].mlp.fc1.weight.detach().double() - adapter.tensors["blocks.0.mlp.fc1.delta"].double())
    assert float(diff.abs().max()) <= 1e-7
    # reopening gives back the heads as stored; their snapshots equal them (stored as merged)
    assert torch.equal(layer.lora_A, adapter.tensors["blocks.0.mlp.fc1.lte_A"])
    assert torch.equal(layer.prev_B, layer.lora_B)
    # applying the file to the plain base = merging it: the same outputs as the reopened run
    plain = lrsurgery.load_model(str(digits_vit_dir))
    lrsurgery.apply_adapter(plain, adapter)
    x = torch.randn(8, 1, 16, 16)
    with torch.no_grad():
        assert float((plain.eval()(x) - reopened.eval()(x)).abs().max()) <= 1e-6


def test_lte_eval_uses_merged_weight_and_final_merge(digits_vit_dir, tmp_path):
    """After training the layer holds no pending change: the last step is always followed by a merge."""
    create_run(str(digits_vit_dir), tmp_path / "run", seed=1, **LTE)
    run = open_run(tmp_path / "run")
    from lrsurgery.train.data import build_data
    from lrsurgery.train.loop import train
    data = build_data("digits:5-9", image_size=(16, 16), in_chans=1, seed=0)
    records = []
    train(run.model, data, TrainConfig(steps=5, batch_size=16, lr=1e-3, progress=False), log=records.append)
    merges = [r["step"] for r in records if "lte_merge" in r]
    assert merges == [3, 5]
    for m in lte_layers(run.model).values():
        if isinstance(m, LTELinear):
            # B A − B⁰ A⁰ with B⁰ A⁰ = B A, summed in one matmul: zero up to float rounding
            assert float(m.delta_weight().abs().max()) <= 1e-8


def test_lte_batch_must_split_over_heads(digits_vit_dir, tmp_path):
    create_run(str(digits_vit_dir), tmp_path / "run", seed=1, **LTE)
    with pytest.raises(TrainingError, match="multiple of 4"):
        train_run(tmp_path / "run", "digits:5-9", TrainConfig(steps=2, batch_size=18, lr=1e-3, progress=False))


def test_lte_reset_optimizer_zeroes_head_state(digits_vit_dir, tmp_path):
    create_run(str(digits_vit_dir), tmp_path / "run", seed=1, reset_optimizer=True, **LTE)
    run = open_run(tmp_path / "run")
    from lrsurgery.train import lte as schedule
    from lrsurgery.train.distributed import World
    opt = torch.optim.AdamW([p for p in run.model.parameters() if p.requires_grad], lr=1e-3)
    x = torch.randn(8, 1, 16, 16)
    run.model.train()(x).square().mean().backward()
    opt.step()
    s = schedule.LTESchedule(run.model, opt, total=10, w=World())
    assert s.after_step(3) == {"lte_merge": 1}
    layer = run.model.blocks[0].mlp.fc1
    assert float(opt.state[layer.lora_B]["exp_avg"].abs().max()) == 0.0
    assert float(opt.state[run.model.head.replicas[0].weight]["exp_avg"].abs().max()) > 0.0  # not a head factor


def test_lte_kill_and_resume_is_bit_identical(digits_vit_dir, tmp_path):
    config = TrainConfig(steps=10, batch_size=16, accumulation=2, lr=1e-3, progress=False, seed=3)
    for d in ("straight", "killed"):
        create_run(str(digits_vit_dir), tmp_path / d, seed=1, **LTE)
    train_run(tmp_path / "straight", "digits:5-9", config)
    train_until_killed(tmp_path / "killed", "digits:5-9", config, kill_after=8, checkpoint_every=4)
    train_run(tmp_path / "killed", "digits:5-9", config, resume=True)
    a, b = tensors(tmp_path / "straight"), tensors(tmp_path / "killed")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_two_processes_equal_one(digits_vit_dir, tmp_path):
    """torchrun, 2 CPU processes with 2 heads each == one process with 4 heads, same data."""
    for d in ("one", "two"):
        create_run(str(digits_vit_dir), tmp_path / d, seed=1, **LTE)
    train_run(tmp_path / "one", "digits:5-9", TrainConfig(steps=5, batch_size=16, accumulation=2, lr=1e-3,
                                                          progress=False))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "lrsurgery", "train", str(tmp_path / "two"), "--data", "digits:5-9", "--steps", "5",
           "--batch-size", "16", "--accumulation", "2", "--lr", "1e-3", "--no-progress", "--device", "cpu"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = tensors(tmp_path / "one"), tensors(tmp_path / "two")
    assert one.keys() == two.keys()
    for k in one:
        assert float((one[k].double() - two[k].double()).abs().max()) <= 1e-6, k


def test_galore_on_stacked_heads_equals_one_optimizer_per_head():
    """GaLore/Flora treat an [H, m, n] parameter as H matrices: the same as H separate parameters."""
    torch.manual_seed(0)
    stack = torch.nn.Parameter(torch.randn(3, 12, 10, dtype=torch.float64))
    singles = [torch.nn.Parameter(stack.detach()[h].clone()) for h in range(3)]
    grads = [torch.randn(3, 12, 10, dtype=torch.float64) for _ in range(7)]
    for make in (lambda ps: GaLoreAdamW([{"params": ps, "rank": 4, "update_proj_gap": 3}], lr=1e-2),
                 lambda ps: Flora([{"params": ps}], lr=1e-2, rank=4, kappa=3, seed=5)):
        big = torch.nn.Parameter(stack.detach().clone())
        small = [torch.nn.Parameter(s.detach().clone()) for s in singles]
        opt_big = make([big])
        opts = [make([s]) for s in small]
        for g in grads:
            big.grad = g.clone()
            opt_big.step()
            for h, (s, o) in enumerate(zip(small, opts)):
                s.grad = g[h].clone()
                o.step()
        for h in range(3):
            assert float((big[h] - small[h]).abs().max()) <= 1e-12, (make, h)


def test_lte_with_galore_compresses_each_head(digits_vit_dir, tmp_path):
    from lrsurgery.optim import OptimConfig, build_optimizer
    create_run(str(digits_vit_dir), tmp_path / "run", seed=1, **dict(LTE, rank=8))
    model = open_run(tmp_path / "run").model
    opt = build_optimizer(model, OptimConfig(name="galore", rank=4, update_gap=2), lr=1e-3)
    projected = [p for g in opt.param_groups if "rank" in g for p in g["params"]]
    layer = model.blocks[0].mlp.fc1
    assert any(p is layer.lora_A for p in projected) and any(p is layer.lora_B for p in projected)
    model.train()(torch.randn(8, 1, 16, 16)).square().mean().backward()
    opt.step()
    # one basis per head: B_h is 128×8, std projects from the right: moments [4, 128, 4], basis [4, 4, 8]
    state = opt.state[layer.lora_B]
    assert state["exp_avg"].shape == (4, 128, 4) and state["proj_right"].shape == (4, 4, 8)


def test_cli_inject_lte(digits_vit_dir, tmp_path):
    runner = CliRunner()
    out = runner.invoke(main, ["inject", str(digits_vit_dir), "--method", "lte", "--heads", "2", "--merge-every", "2",
                               "--rank", "2", "--targets", "mlp.fc1", "--train", "head", "-o", str(tmp_path / "run")])
    assert out.exit_code == 0, out.output
    assert "lte: 2 adapted modules" in out.output
    bad = runner.invoke(main, ["inject", str(digits_vit_dir), "--method", "lte", "--rank", "2",
                               "-o", str(tmp_path / "bad")])
    assert bad.exit_code == 1 and bad.output.startswith("error:") and "--merge-every" in bad.output


def test_delta_entries_are_validated(tmp_path):
    from lrsurgery import format as fmt
    rec = {"sha256": "0" * 64, "shape": [3, 2], "dtype": "float32"}
    entry = {"kind": "delta", "in_features": 2, "out_features": 3, "fan_in_fan_out": False,
             "base_tensors": {"weight": rec}}
    meta = {"base": {"ref": None}, "modules": {"l": entry}}
    fmt.validate({"l.delta": torch.zeros(3, 2)}, meta)
    with pytest.raises(ShapeMismatchError, match="shape"):
        fmt.validate({"l.delta": torch.zeros(2, 3)}, meta)
    with pytest.raises(AdapterFormatError, match="missing tensors"):
        fmt.validate({"l.delta": torch.zeros(3, 2)}, {**meta, "modules": {"l": {**entry, "lte": {"heads": 2, "rank": 1}}}})
    with pytest.raises(AdapterFormatError, match="heads and rank"):
        fmt.validate({"l.delta": torch.zeros(3, 2)}, {**meta, "modules": {"l": {**entry, "lte": {"heads": 0}}}})


def test_extract_lte_run_dense_or_svd(digits_vit_dir, tmp_path):
    """Dense copy (heads dropped unless asked) merges to the trained model; SVD at a rank gets LoRA entries."""
    from lrsurgery.ops.extract import extract_from_run
    from lrsurgery.ops.merge import merge_files
    create_run(str(digits_vit_dir), tmp_path / "run", seed=1, **LTE)
    train_run(tmp_path / "run", "digits:5-9", TrainConfig(steps=6, batch_size=16, lr=1e-3, progress=False))
    dense, _ = extract_from_run(tmp_path / "run", tmp_path / "dense.safetensors")
    kept, _ = extract_from_run(tmp_path / "run", tmp_path / "kept.safetensors", keep_heads=True)
    d, k = lrsurgery.load_adapter(dense), lrsurgery.load_adapter(kept)
    assert "blocks.0.mlp.fc1.lte_A" not in d.tensors and "lte" not in d.modules["blocks.0.mlp.fc1"]
    assert "blocks.0.mlp.fc1.lte_A" in k.tensors
    svd, stats = extract_from_run(tmp_path / "run", tmp_path / "svd.safetensors", rank=32)
    s = lrsurgery.load_adapter(svd)
    assert s.modules["blocks.0.mlp.fc1"]["kind"] == "lora" and s.modules["blocks.0.mlp.fc1"]["rank"] == 32
    trained = open_run(tmp_path / "run").model.eval()
    x = torch.randn(8, 1, 16, 16)
    for path in (dense, svd):  # rank 32 = min(m, n): the SVD keeps everything
        merged = lrsurgery.load_model(str(merge_files(str(digits_vit_dir), path, tmp_path / path.stem))).eval()
        with torch.no_grad():
            assert float((trained(x) - merged(x)).abs().max()) <= 1e-5, path


def test_lte_galore_benchmark_smoke():
    """benchmarks/lte_galore.py for 2 steps: GaLore keeps less state on LTE heads than AdamW (no timing)."""
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "lte_galore.py"
    spec = importlib.util.spec_from_file_location("lrsurgery_benchmark_lte_galore", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = {r["variant"]: r for r in bench.run(steps=2)}
    adamw, galore = rows["LTE H=4 r=16 + AdamW"], rows["LTE H=4 r=16 + GaLore r=4"]
    assert adamw["trainable"] == galore["trainable"]
    # AdamW: two fp32 moments of every trainable value, plus a 4-byte step counter per tensor
    # (4 blocks × 4 layers × (A, B) + 4 head replicas × (weight, bias) = 40 tensors)
    assert adamw["optimizer_state"] == 2 * 4 * adamw["trainable"] + 4 * 40
    assert galore["state_vs_lte_adamw"] < 0.35


@pytest.mark.parametrize("kwargs, message", [
    (dict(method="lora", heads=2), "--heads applies to --method lte, not lora"),
    (dict(method="lte", heads=2, merge_every=2, velora_groups=2), "--velora-groups applies to --method lora, not lte"),
    (dict(method="lte", heads=2, merge_every=2, dropout=0.5), "no dropout or rsLoRA"),
    (dict(method="lora", groups=8), "--groups applies to --method velora, not lora"),
    (dict(method="velora", groups=8, reset_optimizer=True), "--reset-optimizer applies to --method lte"),
])
def test_options_of_another_method_are_refused(digits_vit_dir, kwargs, message):
    model = lrsurgery.load_model(str(digits_vit_dir))
    with pytest.raises(LrsurgeryError, match=message):
        inject(model, rank=2, targets=["mlp.fc1"], **kwargs)
