"""Streaming merge (ops/stream_merge.py): tensor by tensor over safetensors files, bit for bit the in-memory merge.

Checkpoints: the tiny GPT-2 (Conv1D, weights stored [in, out], lora_bias on one layer), LLaMA and timm
ViT (its head trained in full: a "full" module) of conftest, in fp32, bf16 and fp16, as one file and
as 3 shards + index made here. References: ``merge_state_dict`` on the whole state dict, the adapted
model merged in memory, and ``safetensors.save_file`` for the file bytes.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
import weakref
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import lrsurgery
from lrsurgery import format as fmt
from lrsurgery.cli import main
from lrsurgery.errors import (BaseMismatchError, LrsurgeryError, ModelNotFoundError, OutputExistsError,
                              ShapeMismatchError)
from lrsurgery.ops import stream_merge as sm
from lrsurgery.ops.merge import merge_files, merge_state_dict

META = {"format": "pt"}
SPECS = {  # family → (dir fixture, LoRA targets, modules trained in full)
    "gpt2": ("gpt2_dir", "preset", ["transformer.ln_f"]),
    "llama": ("llama_dir", "preset", []),
    "vit": ("vit_dir", None, ["head"]),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@torch.no_grad()
def make_adapted(base_dir: Path, fam: str, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """The base in ``dtype`` with seeded random LoRA factors, a Δb on one GPT-2 layer, perturbed full modules."""
    _, targets, train = SPECS[fam]
    model = lrsurgery.load_model(str(base_dir)).to(dtype)
    lrsurgery.inject(model, rank=4, alpha=8, targets=targets, train=train)
    g = torch.Generator().manual_seed(seed)
    for name, layer in sorted(lrsurgery.lora_modules(model).items()):
        layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g) * 0.3)
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.3)
        if name == "transformer.h.0.attn.c_attn":
            layer.add_bias_delta(torch.randn(layer.out_features, generator=g) * 0.1)
    for name in train:
        for p in model.get_submodule(name).parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g).to(p.dtype))
    return model


@pytest.fixture(scope="module")
def families(request) -> dict[tuple[str, str], dict[str, Any]]:
    """Per (family, dtype), built on demand: base dir, checkpoint state, adapter, in-memory merged model."""
    cache: dict[tuple[str, str], dict[str, Any]] = {}

    def get(fam: str, dt: str) -> dict[str, Any]:
        if (fam, dt) not in cache:
            base_dir = request.getfixturevalue(SPECS[fam][0])
            state = {k: v.to(DTYPES[dt]) for k, v in load_file(str(base_dir / "model.safetensors")).items()}
            model = make_adapted(base_dir, fam, DTYPES[dt])
            adapter = lrsurgery.adapter_from_model(model)
            lrsurgery.merge(model)
            cache[fam, dt] = {"dir": base_dir, "state": state, "adapter": adapter, "merged_model": model}
        return cache[fam, dt]
    return get


def write_file(state: dict[str, torch.Tensor], path: Path) -> Path:
    save_file(state, str(path), metadata=META)
    return path


def write_sharded(state: dict[str, torch.Tensor], root: Path, base_dir: Path, n: int = 3) -> Path:
    """``state`` as ``n`` shards + index (transformers' names), with the base's config and a tokenizer file."""
    root.mkdir(parents=True)
    keys = list(state)
    weight_map = {}
    for i in range(n):
        name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        part = keys[i * len(keys) // n:(i + 1) * len(keys) // n]
        save_file({k: state[k] for k in part}, str(root / name), metadata=META)
        weight_map.update({k: name for k in part})
    index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in state.values())},
             "weight_map": dict(sorted(weight_map.items()))}
    (root / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    for f in base_dir.iterdir():
        if f.suffix == ".json":
            shutil.copy(f, root / f.name)
    (root / "tokenizer.json").write_text('{"fake": "tokenizer"}')
    return root


def save_adapter(adapter: fmt.Adapter, path: Path) -> Path:
    return fmt.write(path, adapter, force=True)


def assert_same_tensors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k


# --- the writer -----------------------------------------------------------------------------------------

def test_writer_reproduces_save_file_byte_for_byte(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    tensors = {"w": torch.randn(5, 3, generator=g), "h": torch.randn(7, generator=g).to(torch.float16),
               "b": torch.randn(2, 9, generator=g).to(torch.bfloat16), "d": torch.randn(3, generator=g).double(),
               "i": torch.arange(6, dtype=torch.int64).reshape(2, 3), "m": torch.tensor([True, False, True]),
               "u": torch.arange(5, dtype=torch.uint8), "s": torch.tensor(3.5), "e": torch.zeros(0, 4)}
    for metadata in (None, META):
        ref = tmp_path / "ref.safetensors"
        save_file(tensors, str(ref), metadata=metadata)
        order = [e.name for e in sm.read_header(ref).entries]  # save_file's order: by dtype, then name
        entries, pos = [], 0
        for name in order:
            entries.append(sm.Entry.of(name, tensors[name], pos))
            pos = entries[-1].end
        ours = tmp_path / "ours.safetensors"
        with open(ours, "wb") as f:
            writer = sm.ShardWriter(f, sm.Header(entries, metadata))
            for name in order:
                writer.write(name, tensors[name])
            writer.close()
        assert ours.read_bytes() == ref.read_bytes()
        assert len(sm.Header(entries, metadata).encode()) % 8 == 0  # u64 length + header padded to 8 bytes
        with safe_open(str(ours), framework="pt") as f:
            assert f.metadata() == metadata
            assert_same_tensors({k: f.get_tensor(k) for k in f.keys()}, tensors)


def test_writer_refuses_a_tensor_the_header_does_not_expect(tmp_path: Path) -> None:
    t = torch.zeros(2, 2)
    with open(tmp_path / "x.safetensors", "wb") as f:
        writer = sm.ShardWriter(f, sm.Header([sm.Entry.of("a", t, 0)], META))
        with pytest.raises(LrsurgeryError, match="'b' where the header expects 'a'"):
            writer.write("b", t)
        with pytest.raises(LrsurgeryError, match="F16"):
            writer.write("a", t.half())


def test_corrupt_or_truncated_file_is_refused(tmp_path: Path) -> None:
    good = write_file({"a": torch.zeros(4, 4), "b": torch.ones(3)}, tmp_path / "good.safetensors")
    (tmp_path / "cut.safetensors").write_bytes(good.read_bytes()[:-4])
    with pytest.raises(ModelNotFoundError, match="the tensors take 76 bytes but the file holds 72"):
        sm.read_header(tmp_path / "cut.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(ModelNotFoundError, match="header is not JSON"):
        sm.read_header(tmp_path / "junk.safetensors")


# --- single file: bit for bit ---------------------------------------------------------------------------

@pytest.mark.parametrize("dt", list(DTYPES))
@pytest.mark.parametrize("fam", list(SPECS))
def test_single_file_stream_merge_is_bit_identical_to_in_memory_merges(tmp_path: Path, families, fam: str,
                                                                     dt: str) -> None:
    case = families(fam, dt)
    adapter, state = case["adapter"], case["state"]
    kinds = {e["kind"] for e in adapter.modules.values()}
    assert kinds == ({"lora", "full"} if SPECS[fam][2] else {"lora"})
    if fam == "gpt2":
        assert all(e["fan_in_fan_out"] for e in adapter.modules.values() if e["kind"] == "lora")
        assert adapter.modules["transformer.h.0.attn.c_attn"].get("bias")
    base = write_file(state, tmp_path / "base.safetensors")
    out = tmp_path / "merged.safetensors"
    assert merge_files(str(base), save_adapter(adapter, tmp_path / "a.safetensors"), out) == out
    before = {k: v.clone() for k, v in adapter.tensors.items()}
    sm.stream_merge(sm.find_checkpoint(base), adapter, tmp_path / "again.safetensors")
    assert_same_tensors(adapter.tensors, before)  # merging never writes into the adapter's tensors
    assert (tmp_path / "again.safetensors").read_bytes() == out.read_bytes()

    want = merge_state_dict(load_file(str(base)), adapter)
    changed = [k for k in want if not torch.equal(want[k], state[k])]
    assert len(changed) >= 8  # the adapter really changes weights
    got = load_file(str(out))
    assert_same_tensors(got, want)
    # the whole file is what save_file writes for the merged state dict (same order and metadata)
    ref = write_file(want, tmp_path / "ref.safetensors")
    assert out.read_bytes() == ref.read_bytes()
    # and the adapted model merged in memory holds exactly these tensors
    mem = case["merged_model"].state_dict()
    for k, v in got.items():
        assert torch.equal(v, mem[k]), k
    # the in-memory file path (whole state dict) gives the same file
    merge_files(str(base), tmp_path / "a.safetensors", tmp_path / "mem.safetensors", stream=False)
    assert (tmp_path / "mem.safetensors").read_bytes() == out.read_bytes()


# --- shards + index ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("fam, dt", [("gpt2", "fp32"), ("llama", "fp32"), ("llama", "bf16"), ("gpt2", "fp16")])
def test_sharded_stream_merge_keeps_the_layout_and_transformers_loads_it(tmp_path: Path, families, fam: str,
                                                                         dt: str) -> None:
    from transformers import AutoModelForCausalLM
    case = families(fam, dt)
    base = write_sharded(case["state"], tmp_path / "base", case["dir"])
    out = tmp_path / "merged"
    merge_files(str(base), save_adapter(case["adapter"], tmp_path / "a.safetensors"), out)

    shards = sorted(p.name for p in base.glob("*.safetensors"))
    assert len(shards) == 3 and sorted(p.name for p in out.glob("*.safetensors")) == shards
    for name in ["config.json", "tokenizer.json", *(p.name for p in base.glob("generation_config.json"))]:
        assert (out / name).read_bytes() == (base / name).read_bytes(), name
    index_in = json.loads((base / "model.safetensors.index.json").read_text())
    index_out = json.loads((out / "model.safetensors.index.json").read_text())
    assert index_out["weight_map"] == index_in["weight_map"]
    total = sum(v.numel() * v.element_size() for v in case["state"].values())
    assert index_out["metadata"]["total_size"] == total

    want = merge_state_dict(case["state"], case["adapter"])
    for name in shards:
        part = load_file(str(base / name))
        with safe_open(str(out / name), framework="pt") as f:
            assert f.metadata() == META
            assert list(f.keys()) == list(safe_open(str(base / name), framework="pt").keys())
        ref = write_file({k: want[k] for k in part}, tmp_path / f"ref-{name}")
        assert (out / name).read_bytes() == ref.read_bytes(), name

    # transformers loads the merged shards; weights and logits equal the in-memory merged model's
    # (both loaded by from_pretrained: model.to(bf16) would also cast LLaMA's fp32 rotary buffer)
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=DTYPES[dt]).eval()
    case["merged_model"].save_pretrained(tmp_path / "mem")
    mem = AutoModelForCausalLM.from_pretrained(tmp_path / "mem", dtype=DTYPES[dt]).eval()
    mem_state = mem.state_dict()
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, mem_state[k]), k
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        y_loaded, y_mem = loaded(input_ids=ids).logits, mem(input_ids=ids).logits
    assert y_loaded.dtype == DTYPES[dt]
    assert torch.equal(y_loaded, y_mem)
    if dt == "fp32":
        with torch.no_grad():
            assert torch.equal(y_loaded, case["merged_model"](input_ids=ids).logits)


def test_at_most_one_changed_tensor_and_its_merge_are_alive(tmp_path: Path, families, monkeypatch) -> None:
    """Byte accounting: unchanged tensors are never read as tensors; each changed one is freed before the next."""
    case = families("llama", "fp32")
    base = write_sharded(case["state"], tmp_path / "base", case["dir"])
    live: dict[int, int] = {}
    stats = {"reads": 0, "max_live": 0, "max_bytes": 0}

    def track(t: torch.Tensor) -> torch.Tensor:
        live[id(t)] = t.numel() * t.element_size()
        weakref.finalize(t, live.pop, id(t))
        stats["max_live"] = max(stats["max_live"], len(live))
        stats["max_bytes"] = max(stats["max_bytes"], sum(live.values()))
        return t

    class Counting:
        def __init__(self, f):
            self.f = f

        def get_tensor(self, name):
            stats["reads"] += 1
            return track(self.f.get_tensor(name))

    real_reader, real_merged = sm._reader, sm.merged_tensor

    def reader(path, needed):
        import contextlib

        @contextlib.contextmanager
        def wrapped():
            with real_reader(path, needed) as f:
                yield None if f is None else Counting(f)
        return wrapped()

    monkeypatch.setattr(sm, "_reader", reader)
    monkeypatch.setattr(sm, "merged_tensor", lambda *a: track(real_merged(*a)))
    report = sm.stream_merge(sm.find_checkpoint(base), case["adapter"], tmp_path / "out")

    changed = [f"{n}.weight" for n in case["adapter"].modules]
    largest = max(case["state"][k].numel() * 4 for k in changed)
    total = sum(v.numel() * v.element_size() for v in case["state"].values())
    assert stats["reads"] == len(changed) == report.changed == 14
    assert stats["max_live"] == 2  # the base tensor and its merged value, never two base tensors
    assert stats["max_bytes"] <= 2 * largest
    assert report.bytes_merged == sum(case["state"][k].numel() * 4 for k in changed)
    assert report.bytes_copied + report.bytes_merged == total
    assert live == {}
    print(f"\n[stream] reads {stats['reads']}, max live tensors {stats['max_live']}, max live bytes "
          f"{stats['max_bytes']} (largest changed tensor {largest}), copied {report.bytes_copied} of {total}")


# --- refusals ---------------------------------------------------------------------------------------------

def test_missing_tensor_names_the_key_and_the_index(tmp_path: Path, families) -> None:
    case = families("llama", "fp32")
    state = dict(case["state"])
    state["model.layers.1.self_attn.v_proj.kernel"] = state.pop("model.layers.1.self_attn.v_proj.weight")
    base = write_sharded(state, tmp_path / "base", case["dir"])
    adapter = save_adapter(case["adapter"], tmp_path / "a.safetensors")
    with pytest.raises(BaseMismatchError, match=r"model\.safetensors\.index\.json \(3 shards\) has no tensor "
                                                r"'model\.layers\.1\.self_attn\.v_proj\.weight'.*--in-memory"):
        merge_files(str(base), adapter, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp dir left


def test_wrong_base_is_refused_unless_forced(tmp_path: Path, families) -> None:
    case = families("gpt2", "fp32")
    other = {k: v + 0.01 if v.dim() == 2 else v for k, v in case["state"].items()}
    base = write_sharded(other, tmp_path / "base", case["dir"])
    adapter = save_adapter(case["adapter"], tmp_path / "a.safetensors")
    with pytest.raises(BaseMismatchError, match="differs from the one the adapter was made on.*--force"):
        merge_files(str(base), adapter, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.warns(UserWarning, match="8 base weights differ.*because of --force"):
        merge_files(str(base), adapter, tmp_path / "out", force_base=True)
    with pytest.warns(UserWarning, match="8 base weights differ"):
        want = merge_state_dict(other, case["adapter"], force=True)
    got = {}
    for p in (tmp_path / "out").glob("*.safetensors"):
        got.update(load_file(str(p)))
    assert_same_tensors(got, want)


def test_shape_mismatch_output_conflicts_and_bad_index_are_refused(tmp_path: Path, families) -> None:
    case = families("llama", "fp32")
    adapter = save_adapter(case["adapter"], tmp_path / "a.safetensors")
    bad = dict(case["state"])
    bad["model.layers.0.self_attn.q_proj.weight"] = bad["model.layers.0.self_attn.q_proj.weight"][:16]
    with pytest.raises(ShapeMismatchError, match=r"q_proj\.weight has shape \[16, 32\]"):
        merge_files(str(write_file(bad, tmp_path / "bad.safetensors")), adapter, tmp_path / "o.safetensors",
                    force_base=True)
    base = write_sharded(case["state"], tmp_path / "base", case["dir"])
    with pytest.raises(LrsurgeryError, match="sharded, so the merged model is too"):
        merge_files(str(base), adapter, tmp_path / "o.safetensors")
    with pytest.raises(LrsurgeryError, match="is or contains the input"):
        merge_files(str(base), adapter, base, force=True)
    merge_files(str(base), adapter, tmp_path / "out")
    with pytest.raises(OutputExistsError):
        merge_files(str(base), adapter, tmp_path / "out")
    merge_files(str(base), adapter, tmp_path / "out", force=True)
    (base / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(ModelNotFoundError, match="maps tensors to model-00002-of-00003.safetensors"):
        merge_files(str(base), adapter, tmp_path / "out2")


# --- which path merge_files takes ---------------------------------------------------------------------

def test_hub_snapshot_is_streamed_without_building_the_model(tmp_path: Path, hub_cache, monkeypatch) -> None:
    import lrsurgery.ops.merge as merge_mod
    ref = f"hf:{hub_cache['repo']}"
    model = lrsurgery.load_model(ref)
    lrsurgery.inject(model, rank=2, targets="preset")
    with torch.no_grad():
        for layer in lrsurgery.lora_modules(model).values():
            layer.lora_B.normal_(generator=torch.Generator().manual_seed(1))
    adapter = lrsurgery.save_adapter(model, tmp_path / "a.safetensors")

    def no_model(*args, **kwargs):
        raise AssertionError("the model was built")
    monkeypatch.setattr(merge_mod, "load_model", no_model)
    merge_files(ref, adapter, tmp_path / "out")
    snapshot = hub_cache["snapshot"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", "model.safetensors"]
    assert (tmp_path / "out" / "config.json").read_bytes() == (snapshot / "config.json").read_bytes()
    want = merge_state_dict(load_file(str(snapshot / "model.safetensors")), lrsurgery.load_adapter(adapter))
    assert_same_tensors(load_file(str(tmp_path / "out" / "model.safetensors")), want)


def test_in_memory_and_required_streaming(tmp_path: Path, families, monkeypatch) -> None:
    case = families("vit", "fp32")
    adapter = save_adapter(case["adapter"], tmp_path / "a.safetensors")
    monkeypatch.setattr(sm, "stream_merge", lambda *a, **k: (_ for _ in ()).throw(AssertionError("streamed")))
    merge_files(str(case["dir"]), adapter, tmp_path / "mem", stream=False)  # builds the model
    monkeypatch.undo()
    merge_files(str(case["dir"]), adapter, tmp_path / "streamed", stream=True)
    got = load_file(str(tmp_path / "streamed" / "model.safetensors"))
    assert_same_tensors(got, load_file(str(tmp_path / "mem" / "model.safetensors")))
    assert lrsurgery.lora_modules(lrsurgery.load_model(str(tmp_path / "streamed"))) == {}
    new_head = dict(case["adapter"].meta, base={**case["adapter"].meta["base"], "num_classes": 3})
    odd = save_adapter(fmt.Adapter(case["adapter"].tensors, new_head), tmp_path / "b.safetensors")
    with pytest.raises(LrsurgeryError, match="cannot stream .*new 3-class head"):
        merge_files(str(case["dir"]), odd, tmp_path / "x", stream=True)


def test_cli_merge_streams_and_reports_errors_on_one_line(tmp_path: Path, families) -> None:
    case = families("llama", "bf16")
    base = write_sharded(case["state"], tmp_path / "base", case["dir"])
    adapter = save_adapter(case["adapter"], tmp_path / "a.safetensors")
    runner = CliRunner()
    res = runner.invoke(main, ["merge", str(base), str(adapter), "-o", str(tmp_path / "out"), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output) == {"merged": str(tmp_path / "out")}
    res = runner.invoke(main, ["merge", str(base), str(adapter), "-o", str(tmp_path / "out.safetensors")])
    assert res.exit_code == 1
    assert res.output.count("\n") == 1 and res.output.startswith("error: the base ")


# --- benchmarks/merge.py ---------------------------------------------------------------------------------

def test_benchmark_tiny_size_runs_and_checks_its_output(tmp_path: Path) -> None:
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "merge.py"
    spec = importlib.util.spec_from_file_location("lrsurgery_benchmark_merge", script)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench
    try:
        spec.loader.exec_module(bench)
        result = bench.run(size_gb=0.02, repeats=1, workdir=tmp_path)
    finally:
        sys.modules.pop(spec.name, None)
    assert result["checkpoint_bytes"] >= 0.02 * 1e9 * 0.9
    assert result["shards"] >= 2 and result["check"] == "bit-identical"
    assert result["changed_tensors"] == 2 * result["layers"]
    assert result["peak_rss_bytes"] > 0 and result["merge_s"] > 0 and result["copy_s"] > 0
    assert list(tmp_path.iterdir()) == []  # the generated checkpoint is cleaned up


def test_output_containing_the_base_is_refused_even_with_force(tmp_path):
    """-o a parent of the base directory would replace (delete) the base: refused before anything is written."""
    import lrsurgery
    from lrsurgery.errors import OutputExistsError
    from lrsurgery.ops.merge import merge_files
    from conftest import build_tiny_vit
    base = lrsurgery.save_model(build_tiny_vit(0), tmp_path / "models" / "base")
    model = lrsurgery.load_model(str(base))
    lrsurgery.inject(model, rank=2, targets=["attn.qkv"])
    lrsurgery.save_adapter(model, tmp_path / "a.safetensors")
    for out in (tmp_path / "models", base):
        with pytest.raises(OutputExistsError, match="is or contains the input"):
            merge_files(str(base), tmp_path / "a.safetensors", out, force=True)
    assert (base / "model.safetensors").is_file()
