"""The CLI end to end (click runner, and once as a real subprocess); errors are one line, exit 1."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import lrsurgery
from lrsurgery.cli import main
from lrsurgery.run import open_run

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def test_inject_train_extract_show_merge(digits_vit_dir, tmp_path):
    code, out, err = run("inject", digits_vit_dir, "--rank", "4", "--alpha", "8", "--train", "head",
                         "-o", tmp_path / "run", "--json")
    assert code == 0, err
    info = json.loads(out)
    assert info["train"] == ["head"] and len(info["targets"]) == 8  # 2 blocks × (qkv, proj, fc1, fc2)
    assert info["trainable_params"] == sum(4 * (i + o) for o, i in [(96, 32), (32, 32), (128, 32), (32, 128)]) * 2 \
        + 5 * 32 + 5

    code, out, err = run("train", tmp_path / "run", "--data", "digits:5-9", "--steps", "3", "--batch-size", "16",
                         "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["steps"] == 3 and 0.0 <= result["eval"]["accuracy"] <= 1.0
    assert result["memory"]["activations"] > 0 and result["memory"]["optimizer_state"] > 0
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 4  # 3 steps + 1 eval

    code, out, err = run("extract", tmp_path / "run", "-o", tmp_path / "a.safetensors")
    assert code == 0, err
    code, out, err = run("show", tmp_path / "a.safetensors", "--json")
    assert code == 0, err
    shown = json.loads(out)
    assert shown["valid"] and shown["provenance"]["steps"] == 3 and shown["provenance"]["data"] == "digits:5-9"
    assert {m["name"] for m in shown["modules"]} >= {"head", "blocks.0.attn.qkv"}

    code, out, err = run("merge", digits_vit_dir, tmp_path / "a.safetensors", "-o", tmp_path / "merged")
    assert code == 0, err
    merged = lrsurgery.load_model(str(tmp_path / "merged"))
    adapted = open_run(tmp_path / "run").model.eval()
    x = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        assert (merged(x) - adapted(x)).abs().max() <= 1e-5
    assert not lrsurgery.lora_modules(merged)


def test_human_output_has_tables(digits_vit_dir, tmp_path):
    code, out, _ = run("inspect", digits_vit_dir, "--rank", "2")
    assert code == 0 and "blocks.0.attn.qkv" in out and "8 target modules" in out
    run("inject", digits_vit_dir, "-o", tmp_path / "run")
    code, out, _ = run("show", tmp_path / "run" / "adapter.safetensors")
    assert code == 0 and "valid" in out and "blocks.1.mlp.fc2" in out


@pytest.mark.parametrize("args, message", [
    (["show", "missing.safetensors"], "no such file"),
    (["inspect", "timm:vit_tiny_patch16_224"], "--weights FILE"),
    (["inspect", "timm:not_a_model_at_all", "--init", "random"], "timm has no architecture"),
    (["inject", "{vit}", "--targets", "qkvv", "-o", "{tmp}/r"], "closest names"),
    (["train", "{tmp}", "--data", "digits"], "not a run directory"),
])
def test_user_errors_are_one_line_without_traceback(digits_vit_dir, tmp_path, args, message):
    args = [a.format(vit=digits_vit_dir, tmp=tmp_path) for a in args]
    code, out, err = run(*args)
    assert code == 1
    assert err.startswith("error: ") and message in err and "Traceback" not in err + out


def test_nothing_is_overwritten_without_force(digits_vit_dir, tmp_path):
    assert run("inject", digits_vit_dir, "-o", tmp_path / "run")[0] == 0
    code, _, err = run("inject", digits_vit_dir, "-o", tmp_path / "run")
    assert code == 1 and "--force" in err
    assert run("inject", digits_vit_dir, "-o", tmp_path / "run", "--force")[0] == 0
    target = tmp_path / "a.safetensors"
    target.write_bytes(b"precious")
    code, _, err = run("extract", tmp_path / "run", "-o", target)
    assert code == 1 and target.read_bytes() == b"precious"


def test_merge_refuses_another_base_unless_forced(digits_vit_dir, tmp_path):
    run("inject", digits_vit_dir, "-o", tmp_path / "run", "--train", "head")
    other = lrsurgery.load_model(str(digits_vit_dir))
    with torch.no_grad():
        other.blocks[0].attn.qkv.weight.add_(1e-3)
    lrsurgery.save_model(other, tmp_path / "other.safetensors")
    adapter = tmp_path / "run" / "adapter.safetensors"
    code, _, err = run("merge", tmp_path / "other.safetensors", adapter, "-o", tmp_path / "m.safetensors")
    assert code == 1 and "blocks.0.attn.qkv" in err and "--force" in err
    code, _, err = run("merge", tmp_path / "other.safetensors", adapter, "-o", tmp_path / "m.safetensors", "--force")
    assert code == 0 and (tmp_path / "m.safetensors").is_file()


def test_svd_extract_from_two_models(digits_vit_dir, tmp_path):
    tuned = lrsurgery.load_model(str(digits_vit_dir))
    with torch.no_grad():
        u, v = torch.randn(96, 2), torch.randn(2, 32)
        tuned.blocks[0].attn.qkv.weight.add_(u @ v * 0.01)
    lrsurgery.save_model(tuned, tmp_path / "tuned")
    code, out, err = run("extract", "--base", digits_vit_dir, "--tuned", tmp_path / "tuned", "--rank", "2",
                         "-o", tmp_path / "svd.safetensors", "--json")
    assert code == 0, err
    rows = {r["module"]: r for r in json.loads(out)["modules"]}
    assert rows["blocks.0.attn.qkv"]["rank"] == 2 and rows["blocks.0.attn.qkv"]["energy"] == pytest.approx(1.0)
    assert "blocks.1.mlp.fc2" not in rows  # unchanged layer: no entry
    assert set(lrsurgery.load_adapter(tmp_path / "svd.safetensors").modules) == {"blocks.0.attn.qkv"}


def test_subprocess_entry_points(digits_vit_dir, tmp_path):
    run("inject", digits_vit_dir, "-o", tmp_path / "run")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    ok = subprocess.run([sys.executable, "-m", "lrsurgery", "show", str(tmp_path / "run" / "adapter.safetensors"),
                         "--json"], capture_output=True, text=True, env=env, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["method"] == "lora"
    bad = subprocess.run(["lrsurgery", "show", str(tmp_path / "nope.safetensors")], capture_output=True, text=True,
                         env=env, timeout=300)
    assert bad.returncode == 1 and bad.stderr.startswith("error: ") and "Traceback" not in bad.stderr


def test_demo_quick_merges_exactly(tmp_path):
    code, out, err = run("demo", "--quick", "-o", tmp_path / "demo", "--json")
    assert code == 0, err
    result = json.loads(out)
    lora = [r for r in result["rows"] if r["method"] == "lora"]
    full = [r for r in result["rows"] if r["method"] == "full"]
    assert len(lora) == 2 and len(full) == 1
    assert full[0]["trainable_params"] == full[0]["total_params"]
    assert all(r["trainable_params"] < full[0]["trainable_params"] for r in lora)
    assert result["merge_max_abs_diff"] <= 1e-5
    assert result["merged_accuracy"] == max(r["accuracy"] for r in lora)
    for r in result["rows"]:
        m = r["memory"]
        assert r["memory_bytes"] == m["params"] + m["grads"] + m["optimizer_state"] + m["activations"]


def test_readme_starts_with_the_two_commands_and_ci_runs_the_second():
    readme = (ROOT / "README.md").read_text()
    commands = re.search(r"```bash\n(.*?)\n```", readme, re.S).group(1).splitlines()
    assert commands == ["pip install -e . && lrsurgery demo", "pip install -e '.[dev]' && python -m pytest"]
    assert commands[1] in (ROOT / ".ci" / "run").read_text()
