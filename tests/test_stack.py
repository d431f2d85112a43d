"""Stacks with lineage: adapters trained on top of others record their parents, apply only on them, and stack exactly.

The domain scenario of docs/stacking.md runs for real on the tiny 1-channel ViT: a domain adapter
(LoRA + a head trained in full) trained on digits 0-4, then two task adapters trained on top of it
(``inject --on``), one of which adapts the head the domain adapter replaced. Every stack is
compared with an independent reference: the base state dict plus each ΔW, computed from the files.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import lrsurgery
from lrsurgery import format as fmt
from lrsurgery import lineage
from lrsurgery.cli import main
from lrsurgery.errors import BaseMismatchError, LrsurgeryError
from lrsurgery.ops.merge import delta_weight, merge_into_model
from lrsurgery.ops.stack import apply_stack, compose
from lrsurgery.run import ADAPTER, RECIPE, create_run, open_run, train_run
from lrsurgery.surgery import adapter_config
from lrsurgery.train.loop import TrainConfig
from lrsurgery.train.relora import ReLoRAConfig

GOLDEN = Path(__file__).resolve().parents[1] / "formats" / "examples"
CFG = dict(steps=3, batch_size=16, progress=False)
X = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(3))
# adapter ids of the golden v1 files: the id definition is a contract (lineage.py docstring)
GOLDEN_IDS = {
    "full-whole-model.safetensors": "be336302978c77e25036453ced219aff5c56d357d36be76c5763e37a2d1735b1",
    "lora-fp16-bf16base.safetensors": "fad6bc7c0f14badf54e49d7e44a315a6ca07109c47ae057e65db5598e14815b5",
    "lora-full-head.safetensors": "f5184e615d9f50c5093ff9b446f122e3b976a653c8d17cfb568d277cb7d173eb",
    "lora-linear-conv1d.safetensors": "3aa9d4d739c3a2846e2e69c8e02259b3025f845eeed08cb95d78a80cd7981ece",
}


@pytest.fixture(scope="module")
def sc(tmp_path_factory: pytest.TempPathFactory, digits_vit_dir: Path) -> dict:
    """base → domain (LoRA r4 + head in full, digits 0-4) → task A (qkv r2, 5-9) and task B (proj, fc1, head r2)."""
    root = tmp_path_factory.mktemp("stack")
    base = str(digits_vit_dir)
    create_run(base, root / "dom", rank=4, alpha=8, train=["head"])
    train_run(root / "dom", "digits:0-4", TrainConfig(**CFG))
    domain = Path(shutil.copy(root / "dom" / ADAPTER, root / "domain.safetensors"))
    create_run(base, root / "taskA", on=[domain], rank=2, alpha=4, targets=["attn.qkv"])
    train_run(root / "taskA", "digits:5-9", TrainConfig(**CFG))
    create_run(base, root / "taskB", on=[domain], rank=2, alpha=4, targets=["attn.proj", "mlp.fc1", "head"], seed=1)
    train_run(root / "taskB", "digits:0,2,4,6,8", TrainConfig(seed=1, **CFG))
    return {"root": root, "base": base, "domain": domain, "A": root / "taskA" / ADAPTER, "B": root / "taskB" / ADAPTER,
            "dom": fmt.read(domain), "a": fmt.read(root / "taskA" / ADAPTER), "b": fmt.read(root / "taskB" / ADAPTER)}


def reference(base: str, adapters: list[fmt.Adapter]) -> nn.Module:
    """The stack by hand: the base state dict plus each ΔW (or replaced tensor), in order, from the files."""
    model = lrsurgery.load_model(base)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for adapter in adapters:
        for name, entry in adapter.modules.items():
            if entry["kind"] == "lora":
                key = f"{name}.weight"
                state[key] = (state[key].float() + delta_weight(adapter, name)).to(state[key].dtype)
            else:
                for p in entry["tensors"]:
                    key = fmt.tensor_key(name, p)
                    state[key] = adapter.tensors[key].clone()
    model.load_state_dict(state)
    return model


def out(model: nn.Module, x: torch.Tensor = X) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def applied(base: str, adapter: fmt.Adapter) -> nn.Module:
    model = lrsurgery.load_model(base)
    lrsurgery.apply_adapter(model, adapter)
    return model


def run_cli(*args) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


# ---------------------------------------------------------------------------------------------------------------
# lineage recorded

def test_inject_on_records_parent_ids_and_the_original_base_hashes(sc) -> None:
    dom, a, b = sc["dom"], sc["a"], sc["b"]
    dom_id = lineage.adapter_id(dom)
    assert lineage.parents(dom) == [] and "parents" not in dom.meta
    assert a.meta["parents"] == b.meta["parents"] == [{"id": dom_id, "name": "domain.safetensors", "method": "lora"}]
    recipe = json.loads((sc["root"] / "taskA" / RECIPE).read_text())
    assert recipe["on"] == [{"path": str(sc["domain"].resolve()), "id": dom_id, "name": "domain.safetensors"}]
    # the child pins the ORIGINAL base weight (so a wrong base is still caught), not the folded one
    plain = lrsurgery.load_model(sc["base"])
    folded = lrsurgery.load_model(sc["base"])
    apply_stack(folded, [dom])
    qkv = "blocks.0.attn.qkv"
    original = fmt.tensor_record(plain.get_submodule(qkv).weight)
    assert a.modules[qkv]["base_tensors"]["weight"] == dom.modules[qkv]["base_tensors"]["weight"] == original
    assert fmt.tensor_record(folded.get_submodule(qkv).weight)["sha256"] != original["sha256"]
    # a LoRA on the head the domain adapter replaced pins the replaced head (its real base)
    assert b.modules["head"]["kind"] == "lora"
    assert b.modules["head"]["base_tensors"]["weight"]["sha256"] == fmt.tensor_sha256(dom.tensors["head.weight"])
    assert lineage.of(folded).chain == [{"id": dom_id, "name": "domain.safetensors", "method": "lora"}]


def test_adapter_id_covers_content_and_parents_but_not_provenance_or_name(sc, tmp_path: Path) -> None:
    a = sc["a"]
    ident = lineage.adapter_id(a)
    renamed = fmt.write(tmp_path / "renamed.safetensors",
                        fmt.Adapter(dict(a.tensors), {**a.meta, "provenance": {"tool": "someone else"}}))
    assert lineage.adapter_id(fmt.read(renamed)) == ident
    orphan = fmt.Adapter(dict(a.tensors), {k: v for k, v in a.meta.items() if k != "parents"})
    assert lineage.adapter_id(orphan) != ident
    nudged = dict(a.tensors)
    key = "blocks.0.attn.qkv.lora_B"
    nudged[key] = a.tensors[key].clone()
    nudged[key][0, 0] = torch.nextafter(nudged[key][0, 0], torch.tensor(1.0))  # one ulp
    assert lineage.adapter_id(fmt.Adapter(nudged, a.meta)) != ident


# ---------------------------------------------------------------------------------------------------------------
# refusals

def test_a_child_without_its_parent_is_refused_naming_it(sc) -> None:
    dom_short = lineage.short_id(lineage.adapter_id(sc["dom"]))
    for attempt in (lambda m: lrsurgery.apply_adapter(m, sc["a"]), lambda m: merge_into_model(m, sc["A"])):
        with pytest.raises(BaseMismatchError) as e:
            attempt(lrsurgery.load_model(sc["base"]))
        msg = str(e.value)
        assert "missing from the model: domain.safetensors (id " + dom_short in msg
        assert "lrsurgery stack MODEL domain.safetensors taskA/adapter.safetensors -o OUT" in msg
        assert "\n" not in msg
    with pytest.warns(UserWarning, match="going on because of --force"):
        lrsurgery.apply_adapter(lrsurgery.load_model(sc["base"]), sc["a"], force=True)
    # a root adapter on top of a stack it was not trained on is refused too
    model = lrsurgery.load_model(sc["base"])
    apply_stack(model, [sc["dom"]])
    with pytest.raises(BaseMismatchError, match=r"trained on the plain base.*the model also holds domain.safetensors"):
        lrsurgery.apply_adapter(model, sc["dom"])


def test_a_sibling_stack_and_a_wrong_order_are_refused(sc) -> None:
    dom, a, b = sc["dom"], sc["a"], sc["b"]
    with pytest.raises(BaseMismatchError) as e:
        compose([dom, a, b])
    msg = str(e.value)
    assert msg.startswith("taskB/adapter.safetensors (id ") and "trained on top of domain.safetensors" in msg
    assert "this stack also holds taskA/adapter.safetensors" in msg and "not a parent of it" in msg
    assert msg.endswith("lrsurgery stack MODEL domain.safetensors taskB/adapter.safetensors -o OUT; "
                        "or pass --force to go on anyway")
    with pytest.raises(BaseMismatchError, match="missing from this stack: domain.safetensors"):
        compose([a, dom])
    with pytest.raises(BaseMismatchError, match="missing from the model: domain.safetensors"):
        apply_stack(lrsurgery.load_model(sc["base"]), [a, dom])
    # a grandchild (on domain, then task A) out of order
    gc_run, _ = create_run(sc["base"], sc["root"] / "gc", on=[sc["domain"], sc["A"]], rank=2, targets=["mlp.fc2"])
    gc = fmt.read(gc_run.path / ADAPTER)
    assert [p["name"] for p in gc.meta["parents"]] == ["domain.safetensors", "taskA/adapter.safetensors"]
    compose([dom, a, gc])  # the right order is accepted
    with pytest.raises(BaseMismatchError, match="missing from this stack: taskA/adapter.safetensors"):
        compose([dom, gc])
    swapped = lineage.lineage_error(gc, lineage.chain_entries(a) + lineage.chain_entries(dom))
    assert "the model holds its parents in another order: taskA/adapter.safetensors" in swapped


# ---------------------------------------------------------------------------------------------------------------
# exactness

def test_stacks_equal_sequential_application_and_the_two_tasks_differ(sc, record_property) -> None:
    base, dom = sc["base"], sc["dom"]
    outputs = {}
    for tag, child, run in (("A", sc["a"], "taskA"), ("B", sc["b"], "taskB")):
        stacked = compose([dom, child])
        ref = out(reference(base, [dom, child]))
        seq = lrsurgery.load_model(base)
        apply_stack(seq, [dom, child])
        diffs = {"file": (out(applied(base, stacked)) - ref).abs().max().item(),
                 "sequential": (out(seq) - ref).abs().max().item(),
                 "run": (out(open_run(sc["root"] / run).model) - ref).abs().max().item()}
        record_property(f"max_abs_diff_{tag}", diffs)
        assert max(diffs.values()) <= 1e-6, diffs
        outputs[tag] = ref
        assert [x["name"] for x in stacked.meta["layers"]] == ["domain.safetensors", f"task{tag}/adapter.safetensors"]
        assert "parents" not in stacked.meta  # a stack starts at the plain base
    a_stack, b_stack = compose([dom, sc["a"]]), compose([dom, sc["b"]])
    qkv = a_stack.modules["blocks.0.attn.qkv"]  # ranks add: 4 (domain) + 2 (task A), scaling folded into B
    assert (qkv["rank"], qkv["scaling"], qkv["stacked"]) == (6, 1.0, [{"layer": 0, "rank": 4}, {"layer": 1, "rank": 2}])
    assert a_stack.modules["blocks.0.mlp.fc2"]["rank"] == 4 and a_stack.modules["head"]["kind"] == "full"
    assert torch.equal(a_stack.tensors["head.weight"], sc["dom"].tensors["head.weight"])
    # task B's LoRA on the replaced head becomes part of the full head: W_head(domain) + ΔW_B
    head = sc["dom"].tensors["head.weight"] + delta_weight(sc["b"], "head")
    assert b_stack.modules["head"]["kind"] == "full" and torch.equal(b_stack.tensors["head.weight"], head)
    gap = (outputs["A"] - outputs["B"]).abs().max().item()
    record_property("max_abs_diff_A_vs_B", gap)
    assert gap > 1e-3


def test_gpt2_conv1d_stack_equals_sequential_application(gpt2_dir: Path, cases, randomize_b, tmp_path: Path) -> None:
    ref_path, inputs = str(gpt2_dir), cases["gpt2"]
    model = lrsurgery.load_model(ref_path)
    lrsurgery.inject(model, rank=2, alpha=4, targets=["c_attn", "c_fc"])
    randomize_b(model, seed=1, scale=0.2)
    parent = fmt.write(tmp_path / "parent.safetensors", lrsurgery.adapter_from_model(model))
    model = lrsurgery.load_model(ref_path)
    apply_stack(model, [parent])
    lrsurgery.inject(model, rank=3, alpha=3, targets=["c_attn", "attn.c_proj"], rslora=True)
    randomize_b(model, seed=2, scale=0.2)
    child = fmt.write(tmp_path / "child.safetensors", lrsurgery.adapter_from_model(model))
    p, c = fmt.read(parent), fmt.read(child)
    assert c.meta["parents"][0]["id"] == lineage.adapter_id(p)
    assert c.modules["transformer.h.0.attn.c_attn"]["fan_in_fan_out"]
    stacked = compose([p, c])
    entry = stacked.modules["transformer.h.0.attn.c_attn"]
    assert entry["rank"] == 5 and entry["base_tensors"] == p.modules["transformer.h.0.attn.c_attn"]["base_tensors"]
    ref = inputs.run(reference(ref_path, [p, c]))
    stacked_out = inputs.run(applied(ref_path, stacked))
    seq = lrsurgery.load_model(ref_path)
    apply_stack(seq, [p, c])
    assert (stacked_out - ref).abs().max() <= 1e-6 and (inputs.run(seq) - ref).abs().max() <= 1e-6
    assert (ref - inputs.run(lrsurgery.load_model(ref_path))).abs().max() > 1e-2  # the stack changes the model


def test_a_stack_file_counts_as_its_layers(sc, tmp_path: Path) -> None:
    """A stack file folded into a model extends its chain by its layers: children of it stack on its parts."""
    both = fmt.write(tmp_path / "dom+A.safetensors", compose([sc["dom"], sc["a"]]))
    run, _ = create_run(sc["base"], tmp_path / "child", on=[both], rank=2, targets=["mlp.fc2"], seed=3)
    with torch.no_grad():
        for layer in lrsurgery.lora_modules(run.model).values():
            layer.lora_B.fill_(0.05)
    lrsurgery.save_adapter(run.model, tmp_path / "child.safetensors")
    child = fmt.read(tmp_path / "child.safetensors")
    assert [p["id"] for p in child.meta["parents"]] == [lineage.adapter_id(sc["dom"]), lineage.adapter_id(sc["a"])]
    via_file = compose([fmt.read(both), child])
    via_parts = compose([sc["dom"], sc["a"], child])
    assert via_file.meta["layers"] == via_parts.meta["layers"]
    ref = out(reference(sc["base"], [sc["dom"], sc["a"], child]))
    assert (out(applied(sc["base"], via_file)) - ref).abs().max() <= 1e-6
    assert (out(applied(sc["base"], via_parts)) - ref).abs().max() <= 1e-6


def test_relora_child_keeps_the_original_base_record(sc, tmp_path: Path) -> None:
    run, _ = create_run(sc["base"], tmp_path / "relora", on=[sc["domain"]], rank=2, targets=["attn.qkv"])
    cfg = TrainConfig(relora=ReLoRAConfig(restart_every=2, restart_warmup=1, warmup=1), steps=4, batch_size=16,
                      progress=False)
    train_run(run.path, "digits:5-9", cfg)
    child = fmt.read(run.path / ADAPTER)
    entry = child.modules["blocks.0.attn.qkv"]
    assert entry["folded_rank"] == 2  # the restart after step 2 folded rank 2 into the (already stacked) weight
    assert entry["base_tensors"] == sc["dom"].modules["blocks.0.attn.qkv"]["base_tensors"]
    ref = out(reference(sc["base"], [sc["dom"], child]))
    assert (out(applied(sc["base"], compose([sc["dom"], child]))) - ref).abs().max() <= 1e-6
    assert (out(open_run(run.path).model) - ref).abs().max() <= 1e-6


def test_inject_on_reuses_the_parents_head_size_and_seed(sc, tmp_path: Path) -> None:
    """A parent made with --num-classes 3 --seed 7 (head reset): the child's base is loaded the same way."""
    create_run(sc["base"], tmp_path / "dom3", num_classes=3, seed=7, rank=2, targets=["mlp.fc2"])
    child, _ = create_run(sc["base"], tmp_path / "child", on=[tmp_path / "dom3" / ADAPTER], rank=2,
                          targets=["attn.qkv"])
    assert {k: child.recipe["load"][k] for k in ("num_classes", "seed")} == {"num_classes": 3, "seed": 7}
    assert child.model.head.out_features == 3 and child.recipe["seed"] == 0
    assert adapter_config(child.model).train == []  # the parent's head stays the parent's
    open_run(child.path)


def test_stack_and_child_metadata_follow_the_schema(sc) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    validator = jsonschema.Draft202012Validator(json.loads((GOLDEN.parent / "adapter-v1.schema.json").read_text()))
    child, stack = sc["a"], compose([sc["dom"], sc["b"]])
    assert child.meta["parents"] and stack.meta["layers"]  # the lineage fields the schema must describe
    for adapter in (child, stack):
        assert [e.message for e in validator.iter_errors(adapter.meta)] == []


def test_open_run_refuses_a_changed_or_missing_parent(sc, tmp_path: Path) -> None:
    run_dir = Path(shutil.copytree(sc["root"] / "taskA", tmp_path / "taskA"))
    moved = Path(shutil.copy(sc["domain"], tmp_path / "domain.safetensors"))
    recipe = json.loads((run_dir / RECIPE).read_text())
    recipe["on"][0]["path"] = str(moved)
    (run_dir / RECIPE).write_text(json.dumps(recipe))
    open_run(run_dir)  # a moved but identical parent is fine
    dom = sc["dom"]
    tensors = dict(dom.tensors, **{"head.bias": dom.tensors["head.bias"] + 1})
    fmt.write(moved, fmt.Adapter(tensors, dom.meta), force=True)
    with pytest.raises(LrsurgeryError, match=r"domain.safetensors changed since .* was created on top of it"):
        open_run(run_dir)
    moved.unlink()
    with pytest.raises(LrsurgeryError, match="which no longer exists; put it back"):
        open_run(run_dir)


# ---------------------------------------------------------------------------------------------------------------
# old files

@pytest.mark.parametrize("name", sorted(GOLDEN_IDS))
def test_golden_files_read_as_roots_and_stack_alone(name: str) -> None:
    golden = fmt.read(GOLDEN / name)
    assert lineage.parents(golden) == [] and lineage.layers(golden) is None
    # the id, recomputed here from its definition, and pinned
    content = {"modules": golden.meta["modules"], "parents": [],
               "tensors": {k: fmt.tensor_sha256(t) for k, t in golden.tensors.items()}}
    text = json.dumps(content, sort_keys=True, separators=(",", ":"))
    assert lineage.adapter_id(golden) == hashlib.sha256(text.encode()).hexdigest() == GOLDEN_IDS[name]
    alone = compose([golden])
    ranks = sorted({e["rank"] for e in golden.modules.values() if e["kind"] == "lora"})
    assert alone.meta["layers"] == [{"id": GOLDEN_IDS[name], "name": name, "method": golden.meta["method"],
                                     "ranks": ranks}]
    assert set(alone.tensors) == set(golden.tensors)
    assert all(torch.equal(alone.tensors[k], golden.tensors[k]) for k in golden.tensors)
    for module, entry in golden.modules.items():
        got = {k: v for k, v in alone.modules[module].items() if k != "stacked"}
        assert got == entry


# ---------------------------------------------------------------------------------------------------------------
# CLI

def test_cli_inject_on_stack_and_merge(sc, tmp_path: Path) -> None:
    code, stdout, err = run_cli("inject", sc["base"], "--on", sc["domain"], "-r", "2", "--targets", "mlp.fc2",
                                "-o", tmp_path / "run", "--json")
    assert code == 0, err
    assert json.loads(stdout)["on"][0]["id"] == lineage.adapter_id(sc["dom"])
    assert fmt.read(tmp_path / "run" / ADAPTER).meta["parents"][0]["name"] == "domain.safetensors"

    code, stdout, err = run_cli("stack", sc["base"], sc["domain"], sc["A"], "-o", tmp_path / "s.safetensors", "--json")
    assert code == 0, err
    info = json.loads(stdout)
    assert [x["id"] for x in info["layers"]] == [lineage.adapter_id(sc["dom"]), lineage.adapter_id(sc["a"])]
    assert info["merged"] is False and info["modules"] == {"lora": 8, "delta": 0, "full": 1}
    ref = out(reference(sc["base"], [sc["dom"], sc["a"]]))
    assert (out(applied(sc["base"], fmt.read(tmp_path / "s.safetensors"))) - ref).abs().max() <= 1e-6

    code, stdout, err = run_cli("stack", sc["base"], sc["domain"], sc["A"], "-o", tmp_path / "merged", "--merge")
    assert code == 0, err
    assert "taskA/adapter.safetensors" in stdout and "8 LoRA, 1 full modules" in stdout
    merged = lrsurgery.load_model(str(tmp_path / "merged"))
    assert not lrsurgery.lora_modules(merged) and (out(merged) - ref).abs().max() <= 1e-6

    state = Path(sc["base"]) / "model.safetensors"
    code, _, err = run_cli("stack", state, sc["domain"], sc["A"], "-o", tmp_path / "m.safetensors", "--merge")
    assert code == 0, err
    plain = lrsurgery.load_model(sc["base"])
    from safetensors.torch import load_file
    plain.load_state_dict(load_file(str(tmp_path / "m.safetensors")))
    assert (out(plain) - ref).abs().max() <= 1e-6

    code, stdout, err = run_cli("stack", sc["base"], sc["A"], "-o", tmp_path / "bad.safetensors")
    assert code == 1 and stdout == "" and len(err.strip().splitlines()) == 1
    assert err.startswith("error: taskA/adapter.safetensors (id ")
    assert "missing from this stack: domain.safetensors" in err
    assert not (tmp_path / "bad.safetensors").exists()
    code, _, err = run_cli("stack", sc["base"], sc["domain"], sc["A"], sc["B"], "-o", tmp_path / "bad.safetensors")
    assert code == 1 and "this stack also holds taskA/adapter.safetensors" in err
    code, _, err = run_cli("merge", sc["base"], sc["A"], "-o", tmp_path / "bad", "--in-memory")
    assert code == 1 and "missing from the model: domain.safetensors" in err
    code, _, err = run_cli("stack", sc["base"], sc["domain"], sc["A"], "-o", tmp_path / "s.safetensors")
    assert code == 1 and "exists; pass --force" in err
    code, _, err = run_cli("stack", sc["base"], sc["A"], "-o", tmp_path / "s.safetensors", "--force")
    assert code == 0 and "warning: taskA/adapter.safetensors" in err


def test_file_merges_refuse_a_child_without_its_parents(tmp_path):
    """The streaming and state-dict merges check lineage too: a plain checkpoint holds no parents."""
    import pytest as _pytest
    from lrsurgery.errors import BaseMismatchError
    from lrsurgery.ops.merge import merge_state_dict
    from conftest import tiny_child_adapter
    child = tiny_child_adapter()
    with _pytest.raises(BaseMismatchError, match="dom.safetensors"):
        merge_state_dict({"l.weight": torch.zeros(2, 2)}, child)
