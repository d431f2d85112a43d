"""`lrsurgery show`: an adapter's parents, a stack file's layers, and an LTE delta's heads in the rank column."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

import lrsurgery
from lrsurgery import format as fmt
from lrsurgery.cli import main
from lrsurgery.lineage import adapter_id
from lrsurgery.ops.stack import compose, fold_adapter


def cells(text: str, module: str) -> list[list[str]]:
    """The table rows of ``module``, as stripped cells."""
    return [[c.strip() for c in line.split("│")[1:-1]] for line in text.splitlines() if f"│ {module} " in line]


def show(path: Path, *args: str) -> str:
    result = CliRunner().invoke(main, ["show", str(path), *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.stdout


@pytest.fixture(scope="module")
def files(vit_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """root.safetensors (LoRA r=2 on qkv), child.safetensors (r=3 on fc2, trained on root), their stack, an LTE file."""
    out = tmp_path_factory.mktemp("show")
    root = lrsurgery.load_model(vit_dir)
    lrsurgery.inject(root, rank=2, alpha=4, targets=["attn.qkv"])
    lrsurgery.save_adapter(root, out / "root.safetensors")
    child = lrsurgery.load_model(vit_dir)
    fold_adapter(child, out / "root.safetensors")
    lrsurgery.inject(child, rank=3, alpha=3, targets=["mlp.fc2"])
    lrsurgery.save_adapter(child, out / "child.safetensors")
    fmt.write(out / "stack.safetensors", compose([out / "root.safetensors", out / "child.safetensors"]))
    lte = lrsurgery.load_model(vit_dir)
    lrsurgery.inject(lte, method="lte", heads=4, rank=2, alpha=8, merge_every=1, targets=["attn.qkv"])
    lrsurgery.save_adapter(lte, out / "lte.safetensors")
    return {p.stem: p for p in out.iterdir()}


def test_root_adapter_shows_no_lineage(files):
    text = show(files["root"])
    assert "parents" not in text and "layers" not in text
    data = json.loads(show(files["root"], "--json"))
    assert data["parents"] == [] and data["layers"] is None
    assert data["id"] == adapter_id(fmt.read(files["root"]))


def test_child_shows_its_parent_by_name_and_short_id(files):
    root_id = adapter_id(fmt.read(files["root"]))
    assert f"parents (root first): root.safetensors (id {root_id[:12]})\n" in show(files["child"])
    data = json.loads(show(files["child"], "--json"))
    assert data["parents"] == [{"id": root_id, "name": "root.safetensors", "method": "lora"}]
    assert data["layers"] is None


def test_stack_file_shows_its_layers_in_order_with_ranks(files):
    root_id, child_id = (adapter_id(fmt.read(files[k])) for k in ("root", "child"))
    text = show(files["stack"])
    assert (f"layers (applied in order): root.safetensors (id {root_id[:12]}, lora, rank 2) → "
            f"child.safetensors (id {child_id[:12]}, lora, rank 3)\n") in text
    assert "parents" not in text  # a stack file is a root adapter
    data = json.loads(show(files["stack"], "--json"))
    assert [(x["id"], x["name"], x["ranks"]) for x in data["layers"]] == [
        (root_id, "root.safetensors", [2]), (child_id, "child.safetensors", [3])]


def test_lte_delta_shows_heads_times_rank(files, tmp_path):
    assert cells(show(files["lte"]), "blocks.0.attn.qkv") == [
        ["blocks.0.attn.qkv", "delta", "4×2 heads", "8.0", "4.0", "96×32", "4,096"]]
    module = json.loads(show(files["lte"], "--json"))["modules"][0]
    assert module["lte"] == {"heads": 4, "rank": 2, "alpha": 8.0, "mode": "parallel"}
    assert (module["rank"], module["scaling"], module["shape"]) == (None, 4.0, "96×32")
    assert module["params"] == 96 * 32 + 4 * 2 * 32 + 4 * 96 * 2  # ΔW + the heads' A and B = 4,096

    # without its heads (``extract RUN`` drops them) a delta row has no rank, alpha or scaling
    adapter = fmt.read(files["lte"])
    for name, entry in adapter.modules.items():
        del entry["lte"]
        del adapter.tensors[f"{name}.lte_A"], adapter.tensors[f"{name}.lte_B"]
    fmt.write(tmp_path / "dense.safetensors", adapter)
    module = json.loads(show(tmp_path / "dense.safetensors", "--json"))["modules"][0]
    assert (module["rank"], module["alpha"], module["scaling"], module["params"]) == (None, None, None, 96 * 32)
    assert cells(show(tmp_path / "dense.safetensors"), "blocks.1.attn.qkv") == [
        ["blocks.1.attn.qkv", "delta", "", "", "", "96×32", "3,072"]]
