"""Run directories: create, train (digits and text), determinism, memory report, failure modes.

A tiny 1-channel 16×16 timm ViT (5 classes) trains on ``digits:5-9`` — the image size and channel
count come from the model — and a tiny GPT-2 LM with the MiniLM tokenizer trains on a text file.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

import lrsurgery

from lrsurgery.errors import LrsurgeryError, OutputExistsError, TrainingError
from lrsurgery.run import ADAPTER, METRICS, RECIPE, create_run, open_run, train_run
from lrsurgery.train.data import build_data
from lrsurgery.train.loop import TrainConfig, train

VIT_PRESET = [f"blocks.{i}.{m}" for i in range(2) for m in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]
DIGITS = "digits:5-9"
CFG = dict(steps=5, batch_size=16, progress=False)

TEXT = """The quick brown fox jumps over the lazy dog near the river bank.
A small model learns to predict the next word from the words before it.
Low rank adapters add two thin matrices beside each frozen weight matrix.
Training only the adapters keeps the optimizer state small and cheap.
The merged model computes the same function as the adapted model.
Singular value decomposition gives the best low rank approximation.
Every run directory holds a recipe, an adapter and a metrics log.
Deterministic training repeats the same losses for the same seed.
Tokenizers split text into pieces that the model turns into vectors.
Evaluation reports the mean loss and the perplexity of held out text.
"""


@pytest.fixture(scope="module")
def rn_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("run")


@pytest.fixture(scope="module")
def text_file(rn_root: Path) -> Path:
    path = rn_root / "corpus.txt"
    path.write_text(TEXT * 2)
    return path


@pytest.fixture(scope="module")
def fresh_run(rn_root: Path, digits_vit_dir: Path) -> Path:
    """A LoRA run (rank 4, preset targets) as ``create_run`` leaves it; copy it before training."""
    create_run(str(digits_vit_dir), rn_root / "fresh", rank=4, alpha=8)
    return rn_root / "fresh"


def copy_run(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


@pytest.fixture(scope="module")
def trained(rn_root: Path, fresh_run: Path):
    """Three copies of one fresh run trained 5 steps: seeds 0, 0 and 1."""
    out = {}
    for tag, seed in (("a", 0), ("b", 0), ("c", 1)):
        path = copy_run(fresh_run, rn_root / f"trained-{tag}")
        out[tag] = (path, train_run(path, DIGITS, TrainConfig(seed=seed, **CFG)))
    return out


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def record(record_property, key: str, value) -> None:
    record_property(key, value)
    print(f"\n[run] {key} = {value}")


def adam_bytes(model: nn.Module) -> int:
    """AdamW's state: exp_avg and exp_avg_sq like each trainable parameter, plus one scalar ``step`` each."""
    step_bytes = torch.tensor(0.0).element_size()  # float32 scalar step tensor (CPU, not capturable)
    return sum(2 * p.numel() * p.element_size() + step_bytes for p in model.parameters() if p.requires_grad)


# --- create ----------------------------------------------------------------------------------------------

def test_create_run_writes_recipe_and_a_no_op_adapter(tmp_path: Path, digits_vit_dir: Path) -> None:
    out = tmp_path / "run"
    run, report = create_run(str(digits_vit_dir), out, rank=4, alpha=8)
    assert (out / RECIPE).is_file() and (out / ADAPTER).is_file()
    assert not (out / METRICS).exists()

    recipe = json.loads((out / RECIPE).read_text())
    assert recipe == run.recipe
    assert recipe["base"]["ref"] == str(digits_vit_dir.resolve())
    assert recipe["base"]["source"] == "local-dir"
    assert recipe["inject"]["method"] == "lora" and recipe["inject"]["rank"] == 4
    assert recipe["inject"]["alpha"] == 8.0
    assert recipe["inject"]["targets"] == VIT_PRESET == report.config.targets
    assert recipe["sessions"] == [] and recipe["seed"] == 0

    adapter = lrsurgery.load_adapter(out / ADAPTER)  # validated by the reader
    assert set(adapter.modules) == set(VIT_PRESET)
    assert adapter.meta["provenance"]["steps"] == 0
    for name in VIT_PRESET:
        assert int(torch.count_nonzero(adapter.tensors[f"{name}.lora_B"])) == 0
        assert int(torch.count_nonzero(adapter.tensors[f"{name}.lora_A"])) == adapter.tensors[f"{name}.lora_A"].numel()
        assert adapter.tensors[f"{name}.lora_A"].shape == (4, adapter.modules[name]["in_features"])
    assert lrsurgery.check_base(lrsurgery.load_model(str(digits_vit_dir)), adapter) == []
    assert report.trainable_params == sum(t.numel() for t in adapter.tensors.values()) == 4 * (
        2 * (32 + 96) + 2 * (32 + 32) + 2 * (32 + 128) + 2 * (128 + 32))

    with pytest.raises(OutputExistsError):
        create_run(str(digits_vit_dir), out)
    create_run(str(digits_vit_dir), out, rank=2, force=True)
    assert lrsurgery.load_adapter(out / ADAPTER).modules[VIT_PRESET[0]]["rank"] == 2


def test_open_run_rebuilds_the_trainable_model(fresh_run: Path) -> None:
    run = open_run(fresh_run)
    trainable = {n for n, p in run.model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{p}" for n in VIT_PRESET for p in "AB"}
    saved = lrsurgery.load_adapter(fresh_run / ADAPTER)
    for n, layer in lrsurgery.lora_modules(run.model).items():
        assert torch.equal(layer.lora_A, saved.tensors[f"{n}.lora_A"])


def test_open_run_without_recipe_is_refused(tmp_path: Path) -> None:
    with pytest.raises(LrsurgeryError, match="not a run directory"):
        open_run(tmp_path)
    with pytest.raises(LrsurgeryError, match="not a run directory"):
        train_run(tmp_path, DIGITS, TrainConfig(**CFG))


# --- train -----------------------------------------------------------------------------------------------

def test_train_run_changes_the_adapter_and_logs(trained, fresh_run: Path, record_property) -> None:
    # training ran at all: the digits were built at the model's 1×16×16 input (timm's ViT refuses other sizes)
    path, result = trained["a"]
    before, after = lrsurgery.load_adapter(fresh_run / ADAPTER), lrsurgery.load_adapter(path / ADAPTER)
    assert set(before.tensors) == set(after.tensors)
    for name in VIT_PRESET:
        assert int(torch.count_nonzero(after.tensors[f"{name}.lora_B"])) > 0
        assert not torch.equal(before.tensors[f"{name}.lora_A"], after.tensors[f"{name}.lora_A"])
    assert after.meta["provenance"]["steps"] == 5
    assert after.meta["provenance"]["data"] == DIGITS

    records = read_jsonl(path / METRICS)
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5]
    assert all(math.isfinite(r["loss"]) for r in steps)
    assert len(evals) == 1 and evals[0]["step"] == 5
    assert 0.0 <= evals[0]["eval_accuracy"] <= 1.0 and math.isfinite(evals[0]["eval_loss"])
    assert len(records) == 6

    assert result.steps == 5
    assert result.eval == {"loss": evals[0]["eval_loss"], "accuracy": evals[0]["eval_accuracy"]}
    assert result.train_loss == pytest.approx(sum(r["loss"] for r in steps) / 5, rel=1e-12)
    # digits 5-9: 896 images, 20% eval (179) → 717 train → 44 full batches of 16 per epoch
    assert result.epochs == pytest.approx(5 / 44)

    recipe = json.loads((path / RECIPE).read_text())
    assert len(recipe["sessions"]) == 1
    session = recipe["sessions"][0]
    assert session["data"] == DIGITS and session["steps"] == 5
    assert session["config"]["batch_size"] == 16 and session["config"]["seed"] == 0
    assert session["eval"] == result.eval
    record(record_property, "digits_losses", [round(r["loss"], 4) for r in steps])
    record(record_property, "digits_eval", result.eval)


def test_second_session_continues_and_appends(tmp_path: Path, trained) -> None:
    path = copy_run(trained["a"][0], tmp_path / "cont")
    first = lrsurgery.load_adapter(path / ADAPTER)
    train_run(path, DIGITS, TrainConfig(steps=2, batch_size=16, progress=False))
    recipe = json.loads((path / RECIPE).read_text())
    assert [s["steps"] for s in recipe["sessions"]] == [5, 2]
    second = lrsurgery.load_adapter(path / ADAPTER)
    assert second.meta["provenance"]["steps"] == 7
    assert any(not torch.equal(first.tensors[k], second.tensors[k]) for k in first.tensors)
    records = [r for r in read_jsonl(path / METRICS) if "loss" in r]
    assert [(r["session"], r["step"]) for r in records] == [(1, 1), (1, 2), (1, 3), (1, 4), (1, 5), (2, 6), (2, 7)]


def test_training_is_deterministic_for_a_seed(trained) -> None:
    (pa, ra), (pb, rb), (pc, _) = trained["a"], trained["b"], trained["c"]
    a, b, c = (lrsurgery.load_adapter(p / ADAPTER) for p in (pa, pb, pc))
    assert set(a.tensors) == set(b.tensors) == set(c.tensors)
    for k in a.tensors:
        assert torch.equal(a.tensors[k], b.tensors[k]), k
    assert read_jsonl(pa / METRICS) == read_jsonl(pb / METRICS)
    assert ra.eval == rb.eval
    assert any(not torch.equal(a.tensors[k], c.tensors[k]) for k in a.tensors)
    assert read_jsonl(pa / METRICS) != read_jsonl(pc / METRICS)


def test_create_run_init_is_deterministic_for_a_seed(tmp_path: Path, digits_vit_dir: Path) -> None:
    create_run(str(digits_vit_dir), tmp_path / "x", rank=4, seed=3)
    torch.rand(10)  # any unrelated use of the global RNG in between
    create_run(str(digits_vit_dir), tmp_path / "y", rank=4, seed=3)
    x, y = (lrsurgery.load_adapter(tmp_path / d / ADAPTER) for d in ("x", "y"))
    for k in x.tensors:
        assert torch.equal(x.tensors[k], y.tensors[k]), k


def test_memory_report_counts_adamw_state_exactly(trained, record_property) -> None:
    path, result = trained["a"]
    mem = result.memory
    model = open_run(path).model
    trainable = [p for p in model.parameters() if p.requires_grad]
    n = sum(p.numel() for p in trainable)
    assert n == 4 * 2 * (32 + 96 + 32 + 32 + 32 + 128 + 128 + 32)
    assert mem.trainable_params == n
    assert mem.total_params == sum(p.numel() for p in model.parameters())
    assert mem.optimizer_state == adam_bytes(model) == 2 * 4 * n + 4 * len(trainable)
    assert mem.grads == 4 * n
    assert mem.params == 4 * mem.total_params
    assert mem.activations > 0
    record(record_property, "lora_memory", mem.as_dict())


def test_full_method_trains_every_parameter(tmp_path: Path, digits_vit_dir: Path, record_property) -> None:
    out = tmp_path / "full"
    run, report = create_run(str(digits_vit_dir), out, method="full")
    base = lrsurgery.load_model(str(digits_vit_dir))
    names = dict(base.named_parameters())
    assert report.trainable_params == report.total_params == sum(p.numel() for p in names.values())
    before = lrsurgery.load_adapter(out / ADAPTER)
    assert list(before.modules) == [""] and before.modules[""]["kind"] == "full"  # the whole model
    assert set(before.tensors) == set(names)

    result = train_run(out, DIGITS, TrainConfig(steps=3, batch_size=16, progress=False))
    after = lrsurgery.load_adapter(out / ADAPTER)
    assert set(after.tensors) == set(names)
    changed = [k for k in names if not torch.equal(after.tensors[k], names[k])]
    assert sorted(changed) == sorted(names)  # every parameter moved
    mem = result.memory
    assert mem.trainable_params == mem.total_params == report.total_params
    assert mem.optimizer_state == adam_bytes(base) == 2 * 4 * report.total_params + 4 * len(names)
    assert mem.activations > 0
    record(record_property, "full_memory", mem.as_dict())

    model = open_run(out).model  # the whole-model entry reapplies onto a fresh base
    for k, p in model.named_parameters():
        assert torch.equal(p, after.tensors[k]), k


def test_full_method_with_train_modules_trains_only_them(tmp_path: Path, digits_vit_dir: Path) -> None:
    create_run(str(digits_vit_dir), tmp_path / "r", method="full", train=["head"])
    model = open_run(tmp_path / "r").model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"head.weight", "head.bias"}


# --- text ------------------------------------------------------------------------------------------------

def test_gpt2_preset_targets_are_the_conv1d_projections(lm_dir: Path) -> None:
    model = lrsurgery.load_model(str(lm_dir))
    report = lrsurgery.inject(model, rank=2, targets="preset")
    want = [f"transformer.h.{i}.{m}" for i in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    assert sorted(report.config.targets) == sorted(want)
    assert all(layer.fan_in_fan_out for layer in lrsurgery.lora_modules(model).values())


def test_text_training_on_a_causal_lm(tmp_path: Path, lm_dir: Path, text_file: Path, record_property) -> None:
    out = tmp_path / "lm"
    _, report = create_run(str(lm_dir), out, rank=2, targets="preset")
    assert {n.rsplit(".", 1)[-1] for n in report.config.targets} == {"c_attn", "c_proj", "c_fc"}
    before = lrsurgery.load_adapter(out / ADAPTER)
    result = train_run(out, f"text:{text_file}", TrainConfig(steps=3, batch_size=2, progress=False), max_length=16)
    assert result.steps == 3
    records = read_jsonl(out / METRICS)
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    # an untrained LM over 30522 tokens starts near ln(30522) ≈ 10.3
    assert abs(losses[0] - math.log(30522)) < 1.0
    assert set(result.eval) == {"loss", "perplexity"}
    assert math.isfinite(result.eval["perplexity"])
    assert result.eval["perplexity"] == pytest.approx(math.exp(result.eval["loss"]), rel=1e-12)
    after = lrsurgery.load_adapter(out / ADAPTER)
    assert any(not torch.equal(before.tensors[k], after.tensors[k]) for k in before.tensors)
    record(record_property, "text_losses", [round(v, 4) for v in losses])
    record(record_property, "text_eval", result.eval)


# --- failures --------------------------------------------------------------------------------------------

def test_nan_loss_raises_training_error_and_keeps_the_adapter(tmp_path: Path, fresh_run: Path) -> None:
    path = copy_run(fresh_run, tmp_path / "nan")
    stamp = (path / ADAPTER).read_bytes()
    with pytest.raises(TrainingError, match="loss became nan at step 2"):
        train_run(path, DIGITS, TrainConfig(steps=5, batch_size=16, lr=1e30, progress=False))
    assert (path / ADAPTER).read_bytes() == stamp
    assert json.loads((path / RECIPE).read_text())["sessions"] == []


def test_nan_from_the_model_raises_training_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                  fresh_run: Path) -> None:
    import lrsurgery.train.loop as loop

    real = loop.compute_loss

    def poisoned(*args, **kwargs):
        loss, hits = real(*args, **kwargs)
        return loss * float("nan"), hits

    monkeypatch.setattr(loop, "compute_loss", poisoned)
    path = copy_run(fresh_run, tmp_path / "nan2")
    with pytest.raises(TrainingError, match="at step 1"):
        train_run(path, DIGITS, TrainConfig(**CFG))


def test_nothing_trainable_raises_training_error(digits_vit_dir: Path) -> None:
    model = lrsurgery.load_model(str(digits_vit_dir))
    for p in model.parameters():
        p.requires_grad_(False)
    data = build_data(DIGITS, image_size=(16, 16), in_chans=1)
    with pytest.raises(TrainingError, match="no trainable parameters"):
        train(model, data, TrainConfig(**CFG))


def test_class_count_mismatch_names_num_classes(tmp_path: Path, digits_vit_dir: Path) -> None:
    run, _ = create_run(str(digits_vit_dir), tmp_path / "r3", num_classes=3, rank=2)
    assert run.recipe["inject"]["train"] == ["head"]  # a new head is trained in full
    with pytest.raises(LrsurgeryError, match="--num-classes 5"):
        train_run(tmp_path / "r3", DIGITS, TrainConfig(**CFG))


def test_class_count_mismatch_with_the_saved_head(tmp_path: Path, fresh_run: Path) -> None:
    path = copy_run(fresh_run, tmp_path / "r10")
    with pytest.raises(LrsurgeryError, match="--num-classes 10"):
        train_run(path, "digits", TrainConfig(**CFG))


def test_run_with_a_relative_base_path_opens_from_anywhere(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                           digits_vit_dir: Path) -> None:
    monkeypatch.chdir(digits_vit_dir.parent)
    create_run(digits_vit_dir.name, tmp_path / "rel", rank=2)
    monkeypatch.chdir(tmp_path)
    assert open_run(tmp_path / "rel").recipe["base"]["ref"] == str(digits_vit_dir.resolve())
