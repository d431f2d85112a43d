"""Adapter format v1 (lrsurgery.format): round trips, property tests, every refusal, atomic writes, hashing.

Invalid files are built here, in temporary directories, by writing safetensors directly (bypassing
the validating writer); formats/examples/ holds valid golden files only (tests/test_golden.py).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from lrsurgery import format as fmt
from lrsurgery.errors import AdapterFormatError, LrsurgeryError, OutputExistsError, ShapeMismatchError
from lrsurgery.layers.lora import lora_scaling

SHA_A = "a" * 64

try:  # optional: not a dependency
    import jsonschema
    SCHEMA = jsonschema.Draft202012Validator(
        json.loads((Path(__file__).resolve().parents[1] / "formats" / "adapter-v1.schema.json").read_text()))
except ImportError:  # pragma: no cover
    SCHEMA = None


def raw_bytes(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def assert_bit_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert a[k].shape == b[k].shape, k
        assert raw_bytes(a[k]) == raw_bytes(b[k]), k


def lora_meta(n_in: int, n_out: int, rank: int, alpha: float = 8.0, *, rslora: bool = False, fifo: bool = False,
              dtype: str = "float32") -> dict:
    wshape = [n_in, n_out] if fifo else [n_out, n_in]
    return {"kind": "lora", "rank": rank, "alpha": alpha, "rslora": rslora, "scaling": lora_scaling(alpha, rank, rslora),
            "in_features": n_in, "out_features": n_out, "fan_in_fan_out": fifo, "dtype": dtype,
            "base_tensors": {"weight": {"sha256": SHA_A, "shape": wshape, "dtype": "float32"}}}


def small_adapter() -> fmt.Adapter:
    """Two LoRA modules (Linear 8→12, Conv1D-style 6→9 with rsLoRA) and a full head."""
    g = torch.Generator().manual_seed(0)
    tensors = {
        "enc.fc.lora_A": torch.randn(4, 8, generator=g), "enc.fc.lora_B": torch.randn(12, 4, generator=g),
        "enc.attn.lora_A": torch.randn(2, 6, generator=g), "enc.attn.lora_B": torch.randn(9, 2, generator=g),
        "head.weight": torch.randn(3, 12, generator=g), "head.bias": torch.randn(3, generator=g),
    }
    meta = {"base": {"ref": "timm:tiny", "library": "timm", "source": "random-init", "init_seed": 0},
            "method": "lora",
            "config": {"method": "lora", "rank": 4, "alpha": 8.0, "rslora": False, "dropout": 0.0},
            "modules": {"enc.fc": lora_meta(8, 12, 4),
                        "enc.attn": lora_meta(6, 9, 2, 4.0, rslora=True, fifo=True),
                        "head": {"kind": "full", "tensors": {"weight": {"shape": [3, 12], "dtype": "float32"},
                                                             "bias": {"shape": [3], "dtype": "float32"}}}},
            "provenance": {"tool": "lrsurgery 0.1.0"}}
    return fmt.Adapter(tensors=tensors, meta=meta)


def write_raw(path: Path, tensors: dict[str, torch.Tensor], meta=None, *, adapter_text: str | None = None,
              version: str | None = "1", fmt_name: str | None = "lrsurgery.adapter") -> Path:
    """Write a safetensors file with arbitrary metadata, without any validation."""
    md = {}
    if fmt_name is not None:
        md["format"] = fmt_name
    if version is not None:
        md["format_version"] = version
    if adapter_text is not None:
        md["adapter"] = adapter_text
    elif meta is not None:
        md["adapter"] = json.dumps(meta)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=md or None)
    return path


def ls(d: Path) -> list[str]:
    return sorted(os.listdir(d))


# ---------------------------------------------------------------------------------------------------------------
# Round trip

def test_round_trip_is_bit_exact_and_keeps_the_metadata(tmp_path):
    a = small_adapter()
    path = fmt.write(tmp_path / "a.safetensors", a)
    assert path == tmp_path / "a.safetensors"
    b = fmt.read(path)
    assert_bit_identical(a.tensors, b.tensors)
    assert b.meta == a.meta
    assert b.path == path
    assert b.num_parameters() == a.num_parameters() == 4 * 8 + 12 * 4 + 2 * 6 + 9 * 2 + 3 * 12 + 3
    assert fmt.read_header(path) == a.meta
    assert ls(tmp_path) == ["a.safetensors"]


def test_written_container_metadata(tmp_path):
    a = small_adapter()
    path = fmt.write(tmp_path / "a.safetensors", a)
    with safe_open(str(path), framework="pt") as f:
        raw = f.metadata()
    assert set(raw) == {"format", "format_version", "adapter"}
    assert raw["format"] == fmt.FORMAT == "lrsurgery.adapter"
    assert raw["format_version"] == "1" == str(fmt.FORMAT_VERSION)
    # compact, sorted JSON: the exact serialization lrsurgery writes
    assert raw["adapter"] == json.dumps(a.meta, sort_keys=True, separators=(",", ":"))


def test_write_creates_parent_directories(tmp_path):
    path = fmt.write(tmp_path / "x" / "y" / "a.safetensors", small_adapter())
    assert fmt.read(path).meta == small_adapter().meta


def test_unknown_fields_are_kept_and_ignored(tmp_path):
    a = small_adapter()
    a.meta["from_the_future"] = {"x": [1, 2]}
    a.meta["modules"]["enc.fc"]["future_flag"] = True
    a.meta["base"]["future"] = "yes"
    b = fmt.read(fmt.write(tmp_path / "a.safetensors", a))
    assert b.meta == a.meta


def test_root_module_full_entry_uses_bare_parameter_names(tmp_path):
    tensors = {"fc.weight": torch.randn(3, 4), "fc.bias": torch.randn(3)}
    meta = {"base": {"ref": None}, "method": "full",
            "config": {"method": "full", "rank": 0, "alpha": 0.0, "rslora": False, "dropout": 0.0},
            "modules": {"": {"kind": "full", "tensors": {"fc.weight": {"shape": [3, 4], "dtype": "float32"},
                                                         "fc.bias": {"shape": [3], "dtype": "float32"}}}},
            "provenance": {"tool": "lrsurgery 0.1.0"}}
    assert fmt.expected_tensors("", meta["modules"][""]) == {"fc.weight": (3, 4), "fc.bias": (3,)}
    b = fmt.read(fmt.write(tmp_path / "a.safetensors", fmt.Adapter(tensors, meta)))
    assert b.meta == meta
    assert_bit_identical(tensors, b.tensors)
    with pytest.raises(AdapterFormatError, match=r"missing tensors \['fc\.bias', 'fc\.weight'\]"):
        fmt.validate({".fc.weight": tensors["fc.weight"], ".fc.bias": tensors["fc.bias"]}, meta)


def test_metadata_only_base_ref_null_is_accepted(tmp_path):
    a = small_adapter()
    a.meta["base"] = {"ref": None}
    assert fmt.read(fmt.write(tmp_path / "a.safetensors", a)).meta["base"] == {"ref": None}


# ---------------------------------------------------------------------------------------------------------------
# Property tests: random module sets round-trip exactly and validate

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
NAME = st.from_regex(r"[a-z][a-z0-9_]{0,5}(\.[a-z0-9_]{1,5}){0,3}", fullmatch=True)


def _values(shape, dtype, seed, scale_exp, neg_zero):
    g = torch.Generator().manual_seed(seed)
    t = (torch.randn(shape, generator=g, dtype=torch.float64) * 10.0 ** scale_exp).to(dtype)
    if neg_zero and t.numel():
        t.view(-1)[0] = -0.0
    return t


@st.composite
def lora_module(draw):
    rank, n_in, n_out = draw(st.integers(1, 6)), draw(st.integers(1, 9)), draw(st.integers(1, 9))
    rslora, fifo = draw(st.booleans()), draw(st.booleans())
    alpha = draw(st.one_of(st.integers(1, 64).map(float),
                           st.floats(1e-3, 1e3, allow_nan=False, allow_infinity=False)))
    dtype = draw(st.sampled_from(DTYPES))
    entry = lora_meta(n_in, n_out, rank, alpha, rslora=rslora, fifo=fifo, dtype=fmt.dtype_name(dtype))
    entry["base_tensors"]["weight"]["dtype"] = fmt.dtype_name(draw(st.sampled_from(DTYPES)))
    entry["base_tensors"]["weight"]["sha256"] = draw(st.text("0123456789abcdef", min_size=64, max_size=64))
    seed, exp, nz = draw(st.integers(0, 2**31)), draw(st.integers(-3, 2)), draw(st.booleans())
    tensors = {"lora_A": _values((rank, n_in), dtype, seed, exp, nz),
               "lora_B": _values((n_out, rank), dtype, seed + 1, exp, nz)}
    return entry, tensors


@st.composite
def full_module(draw):
    params = draw(st.lists(st.sampled_from(["weight", "bias", "scale", "norm.weight"]), min_size=1, max_size=3,
                           unique=True))
    entry, tensors = {"kind": "full", "tensors": {}}, {}
    for p in params:
        shape = draw(st.lists(st.integers(0, 5), min_size=0, max_size=3))
        dtype = draw(st.sampled_from(DTYPES))
        entry["tensors"][p] = {"shape": shape, "dtype": fmt.dtype_name(dtype)}
        tensors[p] = _values(tuple(shape), dtype, draw(st.integers(0, 2**31)), draw(st.integers(-3, 2)), draw(st.booleans()))
    return entry, tensors


def key(module: str, param: str) -> str:
    """Tensor name per the spec: <module>.<param>, or the bare <param> for the root module ""."""
    return f"{module}.{param}" if module else param


@st.composite
def adapters(draw):
    names = draw(st.lists(NAME, min_size=0, max_size=5, unique=True))
    modules, tensors = {}, {}
    if not names or draw(st.integers(0, 4)) == 0:  # the root module: whole-model full fine-tuning
        entry, parts = draw(full_module())
        modules[""] = entry
        tensors.update({key("", p): t for p, t in parts.items()})
    for name in names:
        entry, parts = draw(st.one_of(lora_module(), full_module()))
        modules[name] = entry
        for p, t in parts.items():
            tensors[key(name, p)] = t
    # names like "a" (full, param "b.weight") and "a.b" (param "weight") would collide: skip those draws
    n_parts = sum(2 if e["kind"] == "lora" else len(e["tensors"]) for e in modules.values())
    if len(tensors) != n_parts:
        from hypothesis import reject
        reject()
    base = draw(st.fixed_dictionaries(
        {"ref": st.one_of(st.none(), st.text(min_size=1, max_size=20))},
        optional={"library": st.sampled_from(["timm", "transformers"]), "num_classes": st.integers(1, 1000),
                  "init_seed": st.integers(0, 2**31), "head_reset": st.just(True),
                  "weights_sha256": st.text("0123456789abcdef", min_size=64, max_size=64)}))
    meta = {"base": base, "method": "lora",
            "config": {"method": "lora", "rank": 4, "alpha": 8.0, "rslora": False, "dropout": 0.0},
            "modules": modules,
            "provenance": {"tool": "lrsurgery 0.1.0", "note": draw(st.text(max_size=20))}}
    if draw(st.booleans()):
        meta["x_unknown"] = draw(st.dictionaries(st.text(max_size=5), st.integers(), max_size=2))
    return fmt.Adapter(tensors=tensors, meta=meta)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(adapters())
def test_random_adapters_round_trip_exactly(adapter):
    fmt.validate(adapter.tensors, adapter.meta)
    with tempfile.TemporaryDirectory() as d:
        path = fmt.write(Path(d) / "a.safetensors", adapter)
        back = fmt.read(path)
        assert ls(Path(d)) == ["a.safetensors"]
    assert back.meta == adapter.meta
    assert_bit_identical(adapter.tensors, back.tensors)
    fmt.validate(back.tensors, back.meta)
    if SCHEMA is not None:  # every adapter the writer accepts here also conforms to the JSON Schema
        assert not list(SCHEMA.iter_errors(back.meta))
    for name, entry in back.modules.items():
        expected = fmt.expected_tensors(name, entry)
        assert {k: tuple(back.tensors[k].shape) for k in expected} == expected


@settings(max_examples=50, deadline=None)
@given(adapters(), st.data())
def test_random_adapters_refuse_a_poisoned_or_reshaped_tensor(adapter, data):
    name = data.draw(st.sampled_from(sorted(k for k, t in adapter.tensors.items() if t.numel())), label="tensor") \
        if any(t.numel() for t in adapter.tensors.values()) else None
    if name is None:
        return
    bad = adapter.tensors[name].clone()
    bad.view(-1)[data.draw(st.integers(0, bad.numel() - 1))] = data.draw(st.sampled_from([math.nan, math.inf, -math.inf]))
    with pytest.raises(AdapterFormatError, match="NaN/Inf"):
        fmt.validate({**adapter.tensors, name: bad}, adapter.meta)
    grown = torch.zeros(*adapter.tensors[name].shape, 1, dtype=adapter.tensors[name].dtype)
    with pytest.raises(ShapeMismatchError, match=name.replace(".", r"\.")):
        fmt.validate({**adapter.tensors, name: grown}, adapter.meta)


# ---------------------------------------------------------------------------------------------------------------
# Refusals when reading

def test_missing_file(tmp_path):
    with pytest.raises(AdapterFormatError, match="no such file"):
        fmt.read(tmp_path / "nope.safetensors")
    with pytest.raises(AdapterFormatError, match="no such file"):
        fmt.read_header(tmp_path / "nope.safetensors")


def test_directory(tmp_path):
    with pytest.raises(AdapterFormatError, match="is a directory") as e:
        fmt.read(tmp_path)
    assert "PEFT" not in str(e.value)


def test_peft_directory_gets_a_hint(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(AdapterFormatError, match="is a directory") as e:
        fmt.read(tmp_path)
    assert "PEFT" in str(e.value) and "convert --from peft" in str(e.value)


@pytest.mark.parametrize("content", [os.urandom(256), b"", b"\x08\x00\x00\x00\x00\x00\x00\x00{not json"],
                         ids=["random", "empty", "bad-header"])
def test_not_safetensors(tmp_path, content):
    p = tmp_path / "a.safetensors"
    p.write_bytes(content)
    with pytest.raises(AdapterFormatError, match="not a readable safetensors file"):
        fmt.read(p)


def test_truncated_file(tmp_path):
    p = fmt.write(tmp_path / "a.safetensors", small_adapter())
    p.write_bytes(p.read_bytes()[:-10])
    with pytest.raises(AdapterFormatError, match="corrupt"):
        fmt.read(p)


@pytest.mark.parametrize("metadata", [None, {"format": "pt"}, {"format": "lrsurgery.model", "format_version": "1"}],
                         ids=["no-metadata", "pt", "other-format"])
def test_safetensors_without_our_metadata(tmp_path, metadata):
    p = tmp_path / "a.safetensors"
    save_file({"w": torch.ones(2)}, str(p), metadata=metadata)
    with pytest.raises(AdapterFormatError, match="not an lrsurgery adapter") as e:
        fmt.read(p)
    assert "convert --from peft" in str(e.value)


def test_newer_version(tmp_path):
    a = small_adapter()
    p = write_raw(tmp_path / "a.safetensors", a.tensors, a.meta, version="2")
    for reader in (fmt.read, fmt.read_header):
        with pytest.raises(AdapterFormatError, match="v2, newer than this lrsurgery reads") as e:
            reader(p)
        assert "upgrade" in str(e.value) and "pip install -U lrsurgery" in str(e.value)


@pytest.mark.parametrize("version", ["1.0", "one", "", "v1", None], ids=["1.0", "one", "empty", "v1", "missing"])
def test_non_integer_version(tmp_path, version):
    a = small_adapter()
    p = write_raw(tmp_path / "a.safetensors", a.tensors, a.meta, version=version)
    with pytest.raises(AdapterFormatError, match="invalid format_version"):
        fmt.read(p)


@pytest.mark.parametrize("version", ["0", "-1"])
def test_version_below_one(tmp_path, version):
    a = small_adapter()
    p = write_raw(tmp_path / "a.safetensors", a.tensors, a.meta, version=version)
    with pytest.raises(AdapterFormatError, match="invalid format_version"):
        fmt.read(p)


@pytest.mark.parametrize("text", ['{"base": {', "not json", "{'base': 1}"])
def test_bad_json(tmp_path, text):
    p = write_raw(tmp_path / "a.safetensors", small_adapter().tensors, adapter_text=text)
    with pytest.raises(AdapterFormatError, match="not valid JSON"):
        fmt.read(p)


def test_missing_adapter_entry(tmp_path):
    p = write_raw(tmp_path / "a.safetensors", small_adapter().tensors)
    with pytest.raises(AdapterFormatError, match="'adapter' metadata is missing"):
        fmt.read(p)


@pytest.mark.parametrize("text", ["[]", "3", '"x"', "null"])
def test_json_not_an_object(tmp_path, text):
    p = write_raw(tmp_path / "a.safetensors", small_adapter().tensors, adapter_text=text)
    with pytest.raises(AdapterFormatError, match="not a JSON object"):
        fmt.read(p)


def _edited(edit) -> fmt.Adapter:
    a = small_adapter()
    edit(a.tensors, a.meta)
    return a


# name -> (edit of a valid adapter, exception class, regex the message must contain)
REFUSALS = {
    "unknown kind": (lambda t, m: m["modules"]["head"].update(kind="dora"), AdapterFormatError,
                     r"module 'head' has unknown kind 'dora'.*newer lrsurgery"),
    "no kind": (lambda t, m: m["modules"]["head"].pop("kind"), AdapterFormatError, r"module 'head' has no 'kind'"),
    "entry not an object": (lambda t, m: m["modules"].update(head=[1]), AdapterFormatError, r"'head' has no 'kind'"),
    "missing tensor": (lambda t, m: t.pop("enc.fc.lora_B"), AdapterFormatError, r"missing tensors \['enc\.fc\.lora_B'\]"),
    "unexpected tensor": (lambda t, m: t.update({"enc.fc.extra": torch.ones(1)}), AdapterFormatError,
                          r"tensors not described by the metadata: \['enc\.fc\.extra'\]"),
    "shape mismatch lora": (lambda t, m: t.update({"enc.fc.lora_A": torch.zeros(4, 9)}), ShapeMismatchError,
                            r"'enc\.fc\.lora_A' has shape \[4, 9\] but the metadata says \[4, 8\]"),
    "shape mismatch rank": (lambda t, m: m["modules"]["enc.fc"].update(rank=5), ShapeMismatchError,
                            r"'enc\.fc\.lora_(A|B)' has shape"),
    "shape mismatch full": (lambda t, m: t.update({"head.bias": torch.zeros(4)}), ShapeMismatchError,
                            r"'head\.bias' has shape \[4\] but the metadata says \[3\]"),
    "nan": (lambda t, m: t["enc.fc.lora_B"].view(-1).__setitem__(3, math.nan), AdapterFormatError,
            r"'enc\.fc\.lora_B' has 1 NaN/Inf values.*lower the learning rate"),
    "inf": (lambda t, m: t["head.weight"].view(-1)[:2].fill_(-math.inf), AdapterFormatError,
            r"'head\.weight' has 2 NaN/Inf values"),
    "no base": (lambda t, m: m.pop("base"), AdapterFormatError, r"no 'base' entry"),
    "no modules": (lambda t, m: m.pop("modules"), AdapterFormatError, r"no 'modules' entry"),
    "empty modules": (lambda t, m: (m.update(modules={}), t.clear()), AdapterFormatError, r"lists no modules"),
    "lora lacks scaling": (lambda t, m: m["modules"]["enc.fc"].pop("scaling"), AdapterFormatError,
                           r"LoRA module 'enc\.fc' lacks 'scaling'"),
    "lora lacks base_tensors": (lambda t, m: m["modules"]["enc.fc"].pop("base_tensors"), AdapterFormatError,
                                r"lacks 'base_tensors'"),
    "rank zero": (lambda t, m: m["modules"]["enc.fc"].update(rank=0), AdapterFormatError, r"invalid rank 0"),
    "rank float": (lambda t, m: m["modules"]["enc.fc"].update(rank=4.0), AdapterFormatError, r"invalid rank 4\.0"),
    "rank string": (lambda t, m: m["modules"]["enc.fc"].update(rank="4"), AdapterFormatError, r"invalid rank '4'"),
    "full no tensors": (lambda t, m: m["modules"]["head"].update(tensors={}), AdapterFormatError,
                        r"full module 'head' lists no tensors"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_read_refuses(tmp_path, case):
    edit, exc, pattern = REFUSALS[case]
    a = _edited(edit)
    p = write_raw(tmp_path / "a.safetensors", a.tensors or {"x": torch.ones(1)}, a.meta)
    with pytest.raises(exc, match=pattern) as e:
        fmt.read(p)
    assert isinstance(e.value, LrsurgeryError)


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_write_refuses_the_same_and_writes_nothing(tmp_path, case):
    edit, exc, pattern = REFUSALS[case]
    a = _edited(edit)
    with pytest.raises(exc, match=pattern):
        fmt.write(tmp_path / "a.safetensors", a)
    assert ls(tmp_path) == []


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_nan_detected_in_every_float_dtype(dtype):
    a = small_adapter()
    a.tensors = {k: v.to(dtype) for k, v in a.tensors.items()}
    fmt.validate(a.tensors, a.meta)
    a.tensors["head.bias"][1] = math.nan
    with pytest.raises(AdapterFormatError, match="'head.bias' has 1 NaN/Inf"):
        fmt.validate(a.tensors, a.meta)


def test_error_messages_name_the_file(tmp_path):
    a = _edited(REFUSALS["missing tensor"][0])
    p = write_raw(tmp_path / "named.safetensors", a.tensors, a.meta)
    with pytest.raises(AdapterFormatError, match="named.safetensors"):
        fmt.read(p)


# ---------------------------------------------------------------------------------------------------------------
# Writing: overwrite protection and atomicity

def test_overwrite_without_force(tmp_path):
    p = fmt.write(tmp_path / "a.safetensors", small_adapter())
    before = p.read_bytes()
    other = small_adapter()
    other.tensors["head.bias"] = torch.zeros(3)
    with pytest.raises(OutputExistsError, match="exists; pass --force"):
        fmt.write(p, other)
    assert p.read_bytes() == before
    fmt.write(p, other, force=True)
    assert torch.equal(fmt.read(p).tensors["head.bias"], torch.zeros(3))
    assert ls(tmp_path) == ["a.safetensors"]


def test_invalid_adapter_with_force_leaves_the_old_file_untouched(tmp_path):
    p = fmt.write(tmp_path / "a.safetensors", small_adapter())
    before = p.read_bytes()
    bad = small_adapter()
    bad.tensors["enc.fc.lora_A"][0, 0] = math.nan
    with pytest.raises(AdapterFormatError, match="NaN/Inf"):
        fmt.write(p, bad, force=True)
    assert p.read_bytes() == before
    assert ls(tmp_path) == ["a.safetensors"]


def test_failure_while_writing_leaves_no_temp_file_and_the_old_file_intact(tmp_path, monkeypatch):
    p = fmt.write(tmp_path / "a.safetensors", small_adapter())
    before = p.read_bytes()

    def half_written(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial garbage")
        raise OSError("disk full")

    monkeypatch.setattr(fmt, "save_file", half_written)
    with pytest.raises(OSError, match="disk full"):
        fmt.write(p, small_adapter(), force=True)
    assert p.read_bytes() == before
    assert ls(tmp_path) == ["a.safetensors"]
    with pytest.raises(OSError, match="disk full"):
        fmt.write(tmp_path / "new.safetensors", small_adapter())
    assert ls(tmp_path) == ["a.safetensors"]


def test_atomic_write_replaces_in_one_step(tmp_path):
    target = tmp_path / "f.bin"
    target.write_bytes(b"old")
    seen = []

    def writer(tmp):
        assert tmp.parent == tmp_path and tmp != target
        seen.append(target.read_bytes())  # the destination is untouched while writing
        tmp.write_bytes(b"new")

    fmt.atomic_write(target, writer)
    assert seen == [b"old"] and target.read_bytes() == b"new"
    assert ls(tmp_path) == ["f.bin"]


def test_written_file_respects_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        p = fmt.write(tmp_path / "a.safetensors", small_adapter())
    finally:
        os.umask(old)
    assert (p.stat().st_mode & 0o777) == 0o644


# ---------------------------------------------------------------------------------------------------------------
# Hashing

def test_sha256_float32_is_the_numpy_bytes():
    t = torch.randn(5, 7, generator=torch.Generator().manual_seed(1))
    assert fmt.tensor_sha256(t) == hashlib.sha256(t.numpy().tobytes()).hexdigest()


def test_sha256_bfloat16_is_the_uint8_view():
    t = torch.randn(5, 7, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    assert fmt.tensor_sha256(t) == hashlib.sha256(t.view(torch.uint8).numpy().tobytes()).hexdigest()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_sha256_changes_when_one_element_changes(dtype):
    t = torch.randn(4, 6, generator=torch.Generator().manual_seed(3)).to(dtype)
    h = fmt.tensor_sha256(t)
    u = t.clone()
    u[2, 3] = u[2, 3] * 2 + 1
    assert fmt.tensor_sha256(u) != h
    z = torch.zeros(3, dtype=dtype)
    nz = z.clone()
    nz[0] = -0.0  # equal as numbers, different bytes
    assert fmt.tensor_sha256(nz) != fmt.tensor_sha256(z)


def test_sha256_is_of_the_row_major_bytes_and_ignores_layout():
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    assert fmt.tensor_sha256(t.T) == fmt.tensor_sha256(t.T.contiguous())
    assert fmt.tensor_sha256(t.T) != fmt.tensor_sha256(t)  # same numbers, different shape → different bytes
    assert fmt.tensor_sha256(t.requires_grad_()) == hashlib.sha256(t.detach().numpy().tobytes()).hexdigest()
    assert fmt.tensor_sha256(torch.empty(0)) == hashlib.sha256(b"").hexdigest()


def test_sha256_is_what_safetensors_stores(tmp_path):
    a = small_adapter()
    a.tensors["head.weight"] = a.tensors["head.weight"].to(torch.bfloat16)
    a.meta["modules"]["head"]["tensors"]["weight"]["dtype"] = "bfloat16"
    p = fmt.write(tmp_path / "a.safetensors", a)
    data = p.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    for name, t in a.tensors.items():
        begin, end = header[name]["data_offsets"]
        assert hashlib.sha256(data[8 + n + begin:8 + n + end]).hexdigest() == fmt.tensor_sha256(t), name


def test_tensor_record_and_dtype_names():
    t = torch.ones(2, 3, dtype=torch.bfloat16)
    assert fmt.tensor_record(t) == {"sha256": fmt.tensor_sha256(t), "shape": [2, 3], "dtype": "bfloat16"}
    for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.uint8, torch.bool):
        assert fmt.dtype_from_name(fmt.dtype_name(d)) is d
    with pytest.raises(AdapterFormatError, match="unknown dtype 'float8'"):
        fmt.dtype_from_name("float8")


def test_file_sha256(tmp_path):
    p = tmp_path / "blob"
    p.write_bytes(os.urandom(1000))
    assert fmt.file_sha256(p, chunk=7) == hashlib.sha256(p.read_bytes()).hexdigest()


def test_expected_tensors():
    a = small_adapter()
    assert fmt.expected_tensors("enc.attn", a.modules["enc.attn"]) == {"enc.attn.lora_A": (2, 6),
                                                                       "enc.attn.lora_B": (9, 2)}
    assert fmt.expected_tensors("head", a.modules["head"]) == {"head.weight": (3, 12), "head.bias": (3,)}
    with pytest.raises(AdapterFormatError, match="unknown kind"):
        fmt.expected_tensors("x", {"kind": "dora"})


def test_meta_is_not_shared_with_the_caller(tmp_path):
    a = small_adapter()
    snapshot = copy.deepcopy(a.meta)
    b = fmt.read(fmt.write(tmp_path / "a.safetensors", a))
    b.meta["modules"]["enc.fc"]["rank"] = 99
    assert a.meta == snapshot
