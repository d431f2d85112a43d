"""Golden adapter files (formats/examples/): every v1 file ever written must stay readable, with these exact values.

The files were generated once by formats/examples/make_examples.py. Never regenerate them to make
this test pass: a failure here means a change broke reading of existing adapters.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import struct
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

from lrsurgery import format as fmt
from lrsurgery.adapter import apply_adapter, check_base
from lrsurgery.errors import BaseMismatchError
from lrsurgery.surgery import lora_modules

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "formats" / "examples"
SCHEMA = ROOT / "formats" / "adapter-v1.schema.json"

REV = "0123456789abcdef0123456789abcdef01234567"

# ---------------------------------------------------------------------------------------------------------------
# Literals read once from the generated files. Everything below is the v1 contract.

FILE_SHA256 = {
    "lora-linear-conv1d.safetensors": "2c863a6f913bb571bd7585f78e8850a2884359182bfa534022cfa63fa1b2fb33",
    "lora-full-head.safetensors": "b6e2a22895f0b8179472d5934b53b79337e72b89a4038ad8d5fb21a0903a348d",
    "lora-fp16-bf16base.safetensors": "6d71a468dd503e7a46d884f6956e4ce379b274ef853c88a3730b6ee443a2df10",
    "full-whole-model.safetensors": "1e06399fe06fde7d976a49522737b67b5d5e002d17dc32d606c95b1c5b1116b2",
}
FILES = sorted(FILE_SHA256)

META = {
    "lora-linear-conv1d.safetensors": {
        "base": {"library": "transformers", "ref": f"hf:lrsurgery/tiny-gpt2@{REV}", "revision": REV,
                 "source": "hub-cache"},
        "config": {"alpha": 8.0, "dropout": 0.05, "method": "lora", "rank": 4, "rslora": False},
        "method": "lora",
        "modules": {
            "encoder.c_attn": {
                "alpha": 4.0,
                "base_tensors": {"weight": {
                    "dtype": "float32", "shape": [6, 9],
                    "sha256": "a7e904cd18f545ed298ed5637a58dab38350ab4a00bfedc8bfd430b4f6f66720"}},
                "dtype": "float32", "fan_in_fan_out": True, "in_features": 6, "kind": "lora",
                "out_features": 9, "rank": 2, "rslora": True, "scaling": 2.82842712474619},
            "encoder.fc": {
                "alpha": 8.0,
                "base_tensors": {"weight": {
                    "dtype": "float32", "shape": [12, 8],
                    "sha256": "3c58caa1aa7aa956f5640da5d78763703eff17b2eb39c1efdeb030cc2124a6bc"}},
                "dtype": "float32", "fan_in_fan_out": False, "in_features": 8, "kind": "lora",
                "out_features": 12, "rank": 4, "rslora": False, "scaling": 2.0},
        },
        "provenance": {"example": "lora-linear-conv1d", "seed": 1, "tool": "lrsurgery 0.1.0"},
    },
    "lora-full-head.safetensors": {
        "base": {"head_reset": True, "init_seed": 0, "library": "timm", "num_classes": 3, "ref": "timm:tiny_test",
                 "source": "file", "weights": "/models/tiny_test.safetensors",
                 "weights_sha256": "38f74a875b69ee26d3556bbe72f1c8886e3228a44c14b0be075dcc236c9d0e99"},
        "config": {"alpha": 6.0, "dropout": 0.0, "method": "lora", "rank": 3, "rslora": False},
        "method": "lora",
        "modules": {
            "backbone.proj": {
                "alpha": 6.0,
                "base_tensors": {"weight": {
                    "dtype": "float32", "shape": [12, 12],
                    "sha256": "ac6ffd412de18552a3a1c7665fcc349e251eee53e2939f30ce2669b3ea6835c9"}},
                "dtype": "float32", "fan_in_fan_out": False, "in_features": 12, "kind": "lora",
                "out_features": 12, "rank": 3, "rslora": False, "scaling": 2.0},
            "head": {"kind": "full", "tensors": {"bias": {"dtype": "float32", "shape": [3]},
                                                 "weight": {"dtype": "float32", "shape": [3, 12]}}},
        },
        "provenance": {"example": "lora-full-head", "seed": 2, "tool": "lrsurgery 0.1.0"},
    },
    "lora-fp16-bf16base.safetensors": {
        "base": {"init_seed": 7, "library": "timm", "ref": "timm:tiny_bf16", "source": "random-init"},
        "config": {"alpha": 16.0, "dropout": 0.0, "method": "lora", "rank": 2, "rslora": False},
        "method": "lora",
        "modules": {
            "layer": {
                "alpha": 16.0,
                "base_tensors": {"weight": {
                    "dtype": "bfloat16", "shape": [12, 8],
                    "sha256": "371c88bba380b47066c18a0224935806c557d59da7b8d2922458386ee3a506b4"}},
                "dtype": "float16", "fan_in_fan_out": False, "in_features": 8, "kind": "lora",
                "out_features": 12, "rank": 2, "rslora": False, "scaling": 8.0},
        },
        "provenance": {"example": "lora-fp16-bf16base", "seed": 3, "tool": "lrsurgery 0.1.0"},
    },
    "full-whole-model.safetensors": {
        "base": {"library": "timm", "ref": "/models/tiny-dir", "source": "local-dir"},
        "config": {"alpha": 0.0, "dropout": 0.0, "method": "full", "rank": 0, "rslora": False},
        "method": "full",
        "modules": {
            "": {"kind": "full", "tensors": {"fc.bias": {"dtype": "float32", "shape": [3]},
                                             "fc.weight": {"dtype": "float32", "shape": [3, 4]},
                                             "norm.bias": {"dtype": "float32", "shape": [3]},
                                             "norm.weight": {"dtype": "float32", "shape": [3]}}},
        },
        "provenance": {"example": "full-whole-model", "seed": 4, "tool": "lrsurgery 0.1.0"},
    },
}

# name -> (dtype, shape, tensor_sha256, first element, last element)
TENSORS = {
    "lora-linear-conv1d.safetensors": {
        "encoder.c_attn.lora_A": (torch.float32, [2, 6],
                                  "a9018468de7716a5f71ab43a4634859de5918924299af00da28c48042f208128", 0.8125, -0.0),
        "encoder.c_attn.lora_B": (torch.float32, [9, 2],
                                  "8e2e02e22f9ee2eeee820c064061cf8ddcbf7e8a0cd8cdad3218cd7f90635780", 1.03125, -0.15625),
        "encoder.fc.lora_A": (torch.float32, [4, 8],
                              "bbb88a73a4c382764d9c09db86e47214ff044eb530bb24a917ac0b54d78d81bd", -0.3125, 0.890625),
        "encoder.fc.lora_B": (torch.float32, [12, 4],
                              "c91880d8da1426534eeb129f155d8ab6a888b5bf261cbb979537cf76b2a7ec94", 0.640625, -1.046875),
    },
    "lora-full-head.safetensors": {
        "backbone.proj.lora_A": (torch.float32, [3, 12],
                                 "4f0b4b2c060f1a723b7d6b9dd6750254df559271aed18adfad257533a991d80f", -0.78125, 1.015625),
        "backbone.proj.lora_B": (torch.float32, [12, 3],
                                 "8166d4ca6a14ef2aae3c62ecc2988bd5630ede2306e6e462ce80baa3e72ef843", 0.71875, 0.015625),
        "head.bias": (torch.float32, [3],
                      "b8a209a6b03f5b6d479be2588bc32805d3efac550447f725f19b480402032044", 0.671875, 1.1875),
        "head.weight": (torch.float32, [3, 12],
                        "334cf519b2b4ef0a6dc8e3795b5f6fa1ff6459319df73246e5bc2cda881d2092", -0.875, 0.421875),
    },
    "lora-fp16-bf16base.safetensors": {
        "layer.lora_A": (torch.float16, [2, 8],
                         "4613a9cf88adfd5800f7a288dffc6c9de67b63c1aa930ebe580eea60c7ce9657", -0.21875, 0.546875),
        "layer.lora_B": (torch.float16, [12, 2],
                         "37818c567f6f28bfa088a2da4e1a09b0802e6b68d2471addcad1a8a06f111b5f", -0.453125, -1.3125),
    },
    "full-whole-model.safetensors": {  # the root module "": bare parameter names
        "fc.bias": (torch.float32, [3],
                    "55eca388fb2b16c3b415a56a22fe1a4bb04b4df000776a12317d40001f31df10", -0.078125, -0.875),
        "fc.weight": (torch.float32, [3, 4],
                      "4ecc74e5c0b6fd7abf9d62d2734402feed65d9b0ae682fdbb14eb52a19e9bd51", -1.609375, 1.765625),
        "norm.bias": (torch.float32, [3],
                      "40e12159934db9a4d8c22b38faa721b2f460d5bd6d224d05efdf55575518e614", -0.65625, 0.15625),
        "norm.weight": (torch.float32, [3],
                        "0ce5386c25567175dacb656711c746756f2c8e3486810cc31a54a87bfd5968cc", -0.28125, 0.875),
    },
}

# module -> (ΔW shape in the stored weight's orientation, sum(B@A) [exact], sum(ΔW), sum|ΔW|, ΔW[0,0], ΔW[-1,-1])
DELTAS = {
    "lora-linear-conv1d.safetensors": {
        "encoder.fc": ([12, 8], 1.12841796875, 2.2568359375, 304.3447265625, -1.47509765625, 1.04638671875),
        "encoder.c_attn": ([6, 9], 13.5830078125, 38.418547732514405, 214.55304644076898,
                           3.5134368190206575, -9.086045924660734),
    },
    "lora-full-head.safetensors": {
        "backbone.proj": ([12, 12], 35.03369140625, 70.0673828125, 320.8671875, 2.26318359375, -2.24755859375),
    },
    "lora-fp16-bf16base.safetensors": {
        "layer": ([12, 8], 1.206787109375, 9.654296875, 614.998046875, 1.98828125, 1.28125),
    },
    "full-whole-model.safetensors": {},
}

_SAFETENSORS_DTYPE = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}


@pytest.fixture(scope="module", params=FILES)
def golden(request):
    name = request.param
    return name, fmt.read(GOLDEN / name)


def test_golden_directory_holds_exactly_the_pinned_files():
    assert sorted(p.name for p in GOLDEN.glob("*.safetensors")) == FILES


@pytest.mark.parametrize("name", FILES)
def test_file_bytes_are_unchanged_and_tiny(name):
    path = GOLDEN / name
    assert path.stat().st_size < 10_000
    assert fmt.file_sha256(path) == FILE_SHA256[name], f"{name} was modified: golden files must never change"


@pytest.mark.parametrize("name", FILES)
def test_container_metadata(name):
    with safe_open(str(GOLDEN / name), framework="pt") as f:
        raw = f.metadata()
    assert raw["format"] == "lrsurgery.adapter"
    assert raw["format_version"] == "1"
    assert json.loads(raw["adapter"]) == META[name]
    assert fmt.read_header(GOLDEN / name) == META[name]


def test_read_gives_the_exact_metadata(golden):
    name, adapter = golden
    assert adapter.meta == META[name]
    assert list(adapter.modules) == sorted(META[name]["modules"])
    assert adapter.path == GOLDEN / name


def test_read_gives_the_exact_tensors(golden):
    name, adapter = golden
    expected = TENSORS[name]
    assert sorted(adapter.tensors) == sorted(expected)
    for tname, (dtype, shape, sha, first, last) in expected.items():
        t = adapter.tensors[tname]
        assert t.dtype == dtype and list(t.shape) == shape, tname
        assert fmt.tensor_sha256(t) == sha, tname
        flat = t.reshape(-1)
        assert flat[0].item() == first and flat[-1].item() == last, tname
        assert math.copysign(1.0, flat[-1].item()) == math.copysign(1.0, last), f"{tname}: sign of zero"
    assert adapter.num_parameters() == sum(math.prod(s) for _, s, *_ in expected.values())


def _independent_read(path: Path) -> tuple[dict[str, str], dict[str, tuple[str, list[int], bytes]]]:
    """A reader written from the spec alone: no torch, no safetensors library."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n].decode("utf-8"))
    meta = header.pop("__metadata__")
    body = data[8 + n:]
    tensors = {}
    for tname, info in header.items():
        begin, end = info["data_offsets"]
        tensors[tname] = (info["dtype"], info["shape"], body[begin:end])
    return meta, tensors


@pytest.mark.parametrize("name", FILES)
def test_independent_reader_sees_the_same_bytes_and_hashes(name):
    meta, tensors = _independent_read(GOLDEN / name)
    assert meta["format"] == "lrsurgery.adapter" and meta["format_version"] == "1"
    assert json.loads(meta["adapter"]) == META[name]
    assert sorted(tensors) == sorted(TENSORS[name])
    for tname, (code, shape, raw) in tensors.items():
        dtype, exp_shape, sha, _, _ = TENSORS[name][tname]
        assert _SAFETENSORS_DTYPE[code] == fmt.dtype_name(dtype) and shape == exp_shape
        assert len(raw) == math.prod(shape) * dtype.itemsize
        assert hashlib.sha256(raw).hexdigest() == sha  # the hash is the SHA-256 of the stored bytes


def _delta(adapter: fmt.Adapter, name: str) -> torch.Tensor:
    """ΔW = scaling · B @ A in float64, in the orientation of the stored base weight."""
    entry = adapter.modules[name]
    a = adapter.tensors[f"{name}.lora_A"].double()
    b = adapter.tensors[f"{name}.lora_B"].double()
    d = entry["scaling"] * (b @ a)
    return d.T if entry["fan_in_fan_out"] else d


def test_delta_w_and_scaling(golden):
    name, adapter = golden
    lora = {n: e for n, e in adapter.modules.items() if e["kind"] == "lora"}
    assert sorted(lora) == sorted(DELTAS[name])
    for mod, (shape, ba_sum, d_sum, d_abs, d00, dlast) in DELTAS[name].items():
        entry = lora[mod]
        r, alpha = entry["rank"], entry["alpha"]
        assert entry["scaling"] == (alpha / math.sqrt(r) if entry["rslora"] else alpha / r)
        assert list(adapter.tensors[f"{mod}.lora_A"].shape) == [r, entry["in_features"]]
        assert list(adapter.tensors[f"{mod}.lora_B"].shape) == [entry["out_features"], r]
        ba = adapter.tensors[f"{mod}.lora_B"].double() @ adapter.tensors[f"{mod}.lora_A"].double()
        assert float(ba.sum()) == ba_sum  # factors are multiples of 1/64: exact in float64
        d = _delta(adapter, mod)
        assert list(d.shape) == shape == entry["base_tensors"]["weight"]["shape"]
        assert float(d.sum()) == pytest.approx(d_sum, rel=1e-12)
        assert float(d.abs().sum()) == pytest.approx(d_abs, rel=1e-12)
        assert float(d[0, 0]) == pytest.approx(d00, rel=1e-12)
        assert float(d[-1, -1]) == pytest.approx(dlast, rel=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# The base models the files were made on, rebuilt from make_examples.py's closed formula (no RNG).

def pattern(shape, dtype, salt=0):
    n = math.prod(shape)
    v = ((torch.arange(n, dtype=torch.int64) * 7 + salt) % 17 - 8).to(torch.float64) / 16
    return v.reshape(shape).to(dtype)


def _linear(n_in, n_out, salt, dtype=torch.float32):
    layer = nn.Linear(n_in, n_out, dtype=dtype)
    with torch.no_grad():
        layer.weight.copy_(pattern((n_out, n_in), dtype, salt))
        layer.bias.copy_(pattern((n_out,), dtype, salt + 1))
    return layer


def _conv1d(n_in, n_out, salt):
    Conv1D = pytest.importorskip("transformers.pytorch_utils").Conv1D
    layer = Conv1D(n_out, n_in)
    with torch.no_grad():
        layer.weight.copy_(pattern((n_in, n_out), torch.float32, salt))
        layer.bias.copy_(pattern((n_out,), torch.float32, salt + 1))
    return layer


def _container(**children):
    m = nn.Module()
    for k, v in children.items():
        setattr(m, k, v)
    return m


BASES = {
    "lora-linear-conv1d.safetensors": lambda: _container(
        encoder=_container(fc=_linear(8, 12, 0), c_attn=_conv1d(6, 9, 3))),
    "lora-full-head.safetensors": lambda: _container(
        backbone=_container(proj=_linear(12, 12, 5)), head=_linear(12, 3, 9)),
    "lora-fp16-bf16base.safetensors": lambda: _container(layer=_linear(8, 12, 11, torch.bfloat16)),
    "full-whole-model.safetensors": lambda: _container(fc=_linear(4, 3, 13), norm=nn.LayerNorm(3)),
}


def test_rebuilt_base_matches_the_recorded_hashes_and_applies(golden):
    name, adapter = golden
    model = BASES[name]()
    for mod, entry in adapter.modules.items():
        if entry["kind"] == "lora":
            w = model.get_submodule(mod).weight
            assert fmt.tensor_record(w) == entry["base_tensors"]["weight"], mod
    assert check_base(model, adapter) == []
    apply_adapter(model, adapter)
    layers = lora_modules(model)
    for mod, entry in adapter.modules.items():
        if entry["kind"] == "lora":
            assert layers[mod].scaling == entry["scaling"]
            assert layers[mod].fan_in_fan_out == entry["fan_in_fan_out"]
            torch.testing.assert_close(layers[mod].delta_weight().double(), _delta(adapter, mod),
                                       rtol=1e-6, atol=1e-6)
        else:
            params = dict(model.get_submodule(mod).named_parameters())
            for p in entry["tensors"]:
                key = f"{mod}.{p}" if mod else p  # the root module "" has bare parameter names
                assert torch.equal(params[p], adapter.tensors[key])
    assert set(layers) == {m for m, e in adapter.modules.items() if e["kind"] == "lora"}


def test_perturbed_base_is_refused_unless_forced(golden):
    name, adapter = golden
    model = BASES[name]()
    mod = next((n for n, e in adapter.modules.items() if e["kind"] == "lora"), None)
    if mod is None:  # full modules replace their parameters: they carry no base hash to refuse on
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        assert check_base(model, adapter) == []
        return
    with torch.no_grad():
        model.get_submodule(mod).weight.view(-1)[0] += 1.0
    with pytest.raises(BaseMismatchError, match="other base weights"):
        check_base(model, adapter)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert check_base(model, adapter, force=True) == [mod]
    assert any("--force" in str(w.message) for w in caught)


# ---------------------------------------------------------------------------------------------------------------
# JSON Schema (only when jsonschema is installed: it is not a dependency).

@pytest.fixture(scope="module")
def validator():
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def test_golden_metadata_validates_against_the_schema(golden, validator):
    name, adapter = golden
    errors = sorted(validator.iter_errors(adapter.meta), key=str)
    assert not errors, f"{name}: {[e.message for e in errors]}"


def _broken(meta, edit):
    m = copy.deepcopy(meta)
    edit(m)
    return m


SCHEMA_REJECTS = {
    "no base": lambda m: m.pop("base"),
    "no modules": lambda m: m.pop("modules"),
    "empty modules": lambda m: m.update(modules={}),
    "unknown kind": lambda m: m["modules"]["encoder.fc"].update(kind="dora"),
    "rank 0": lambda m: m["modules"]["encoder.fc"].update(rank=0),
    "rank not a number": lambda m: m["modules"]["encoder.fc"].update(rank="4"),
    "lora without scaling": lambda m: m["modules"]["encoder.fc"].pop("scaling"),
    "lora without base hash": lambda m: m["modules"]["encoder.fc"]["base_tensors"]["weight"].pop("sha256"),
    "bad sha256": lambda m: m["modules"]["encoder.fc"]["base_tensors"]["weight"].update(sha256="ABC"),
    "unknown dtype": lambda m: m["modules"]["encoder.fc"].update(dtype="float8"),
    "fan_in_fan_out not boolean": lambda m: m["modules"]["encoder.fc"].update(fan_in_fan_out="yes"),
    "full without tensors": lambda m: m["modules"].update(head={"kind": "full", "tensors": {}}),
    "full tensor without shape": lambda m: m["modules"].update(head={"kind": "full", "tensors": {"w": {"dtype": "float32"}}}),
    "base ref missing": lambda m: m["base"].pop("ref"),
    "lora on the root module": lambda m: m["modules"].update({"": m["modules"]["encoder.fc"]}),
}


@pytest.mark.parametrize("case", sorted(SCHEMA_REJECTS))
def test_schema_rejects_invalid_metadata(case, validator):
    meta = _broken(META["lora-linear-conv1d.safetensors"], SCHEMA_REJECTS[case])
    assert not validator.is_valid(meta), case


def test_schema_accepts_unknown_fields_and_a_null_base(validator):
    meta = _broken(META["lora-linear-conv1d.safetensors"], lambda m: (
        m.update(future_field={"x": 1}, base={"ref": None}),
        m["modules"]["encoder.fc"].update(future_flag=True),
        m["provenance"].update(run="abc")))
    assert validator.is_valid(meta)


def test_schema_accepts_what_svd_extraction_writes(validator):
    """lrsurgery.ops.extract writes another config: {extracted, rank, energy}, with nulls allowed."""
    meta = _broken(META["lora-full-head.safetensors"], lambda m: (
        m.update(config={"extracted": "svd", "rank": None, "energy": 0.9}),
        m["provenance"].update(method="svd-extract", tuned=None, retained_energy={"backbone.proj": 0.93}),
        m["modules"]["backbone.proj"].update(rank=3, alpha=3.0, scaling=1.0)))
    assert validator.is_valid(meta)
