"""Adapter file format v1: one safetensors file, tensors plus JSON metadata (spec: formats/adapter-v1.md).

This module knows tensors and metadata only, never torch modules: it writes atomically, reads,
and validates everything that can be checked without a model (structure, version, names,
shapes, finite values). Checks against a model's base weights live in ``lrsurgery.adapter``.

    __metadata__ = {"format": "lrsurgery.adapter", "format_version": "1", "adapter": "<JSON>"}
    tensors      = {"<module>.lora_A": [r, in], "<module>.lora_B": [out, r],   # kind "lora"
                    "<module>.lora_bias": [out]                                 # optional Δb
                    "<module>.<param>": full tensor,                          # kind "full"
                    "<module>.delta": ΔW as stored ([out, in]; [in, out] Conv1D)  # kind "delta" (LTE)
                    "<module>.lte_A": [H, r, in], "<module>.lte_B": [H, out, r]  # optional LTE heads
                    "<module>.velora_v": [D/G]}                                # optional VeLoRA vector
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lrsurgery.errors import AdapterFormatError, OutputExistsError, ShapeMismatchError

FORMAT = "lrsurgery.adapter"
FORMAT_VERSION = 1
KINDS = ("lora", "full", "delta")

_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float64, torch.float32, torch.float16, torch.bfloat16,
    torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool)}


@dataclass(eq=False)  # tensors have no truth value: compare adapters with torch.equal per tensor
class Adapter:
    """An adapter in memory: tensors by name and the decoded ``adapter`` metadata object."""

    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]
    path: Path | None = field(default=None, compare=False)
    version: int = field(default=FORMAT_VERSION, compare=False)  # the format version of the file it was read from

    @property
    def modules(self) -> dict[str, dict[str, Any]]:
        return self.meta["modules"]

    def num_parameters(self) -> int:
        return sum(t.numel() for t in self.tensors.values())


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"``: the spelling used in metadata."""
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise AdapterFormatError(f"unknown dtype {name!r} in adapter metadata; known: {sorted(_DTYPES)}")
    return _DTYPES[name]


def tensor_sha256(t: torch.Tensor) -> str:
    """SHA-256 of a tensor's raw row-major bytes in its own dtype (what safetensors stores)."""
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    h = hashlib.sha256()
    if flat.numel():
        data = flat.view(torch.uint8).numpy()
        if sys.byteorder == "big" and flat.element_size() > 1:  # the hash is defined on little-endian bytes
            data = flat.numpy().byteswap().view("uint8") if flat.dtype != torch.bfloat16 else \
                flat.view(torch.int16).numpy().byteswap().view("uint8")
        h.update(data)
    return h.hexdigest()


def tensor_record(t: torch.Tensor) -> dict[str, Any]:
    """The metadata that pins a base tensor: hash, shape, dtype."""
    return {"sha256": tensor_sha256(t), "shape": list(t.shape), "dtype": dtype_name(t.dtype)}


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def tensor_key(module: str, param: str) -> str:
    """File name of a module's tensor; the root module is ``""`` (a whole-model entry)."""
    return f"{module}.{param}" if module else param


def expected_tensors(name: str, entry: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes that module entry ``entry`` requires in the file."""
    kind = entry.get("kind")
    shapes: dict[str, tuple[int, ...]]
    if kind == "lora":
        r, n_in, n_out = entry["rank"], entry["in_features"], entry["out_features"]
        shapes = {f"{name}.lora_A": (r, n_in), f"{name}.lora_B": (n_out, r)}
        if entry.get("bias"):  # optional Δb, added to the base bias (PEFT's lora_bias)
            shapes[f"{name}.lora_bias"] = (n_out,)
    elif kind == "full":
        shapes = {tensor_key(name, p): tuple(rec["shape"]) for p, rec in entry["tensors"].items()}
    elif kind == "delta":
        n_in, n_out = entry["in_features"], entry["out_features"]
        shapes = {f"{name}.delta": (n_in, n_out) if entry["fan_in_fan_out"] else (n_out, n_in)}
        if entry.get("lte"):  # the heads, kept so that training can resume
            h, r = entry["lte"]["heads"], entry["lte"]["rank"]
            shapes.update({f"{name}.lte_A": (h, r, n_in), f"{name}.lte_B": (h, n_out, r)})
    else:
        raise AdapterFormatError(
            f"module {name!r} has unknown kind {kind!r} (this lrsurgery knows {', '.join(KINDS)}); "
            "the file may come from a newer lrsurgery: pip install -U lrsurgery")
    if entry.get("velora"):  # VeLoRA's projection vector v (needed to continue training, not to infer)
        shapes[tensor_key(name, "velora_v")] = (entry["velora"]["group_dim"],)
    return shapes


def validate(tensors: dict[str, torch.Tensor], meta: dict[str, Any], where: str = "adapter") -> None:
    """Raise a user-facing error unless ``tensors`` and ``meta`` form a valid v1 adapter."""
    for key in ("base", "modules"):
        if key not in meta:
            raise AdapterFormatError(f"{where}: metadata has no {key!r} entry; the file is incomplete or corrupt")
    if not isinstance(meta["modules"], dict) or not meta["modules"]:
        raise AdapterFormatError(f"{where}: the adapter lists no modules")
    expected: dict[str, tuple[int, ...]] = {}
    for name, entry in meta["modules"].items():
        _check_entry(name, entry, where)
        own = expected_tensors(name, entry)
        clash = sorted(set(own) & set(expected))
        if clash:
            raise AdapterFormatError(f"{where}: tensor {clash[0]!r} is claimed by two module entries "
                                     "(nested modules?); list each parameter once")
        expected.update(own)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing:
        raise AdapterFormatError(f"{where}: missing tensors {missing[:5]}{' …' if len(missing) > 5 else ''}; "
                                 "the file is truncated or was edited")
    if unexpected:
        raise AdapterFormatError(f"{where}: tensors not described by the metadata: {unexpected[:5]}"
                                 f"{' …' if len(unexpected) > 5 else ''}")
    for tname, shape in expected.items():
        t = tensors[tname]
        if tuple(t.shape) != shape:
            raise ShapeMismatchError(f"{where}: tensor {tname!r} has shape {list(t.shape)} but the metadata "
                                     f"says {list(shape)}; the file is inconsistent")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise AdapterFormatError(f"{where}: tensor {tname!r} has {bad} NaN/Inf values; "
                                     "the training run diverged — lower the learning rate and retrain")


def _check_entry(name: str, entry: Any, where: str) -> None:
    if not isinstance(entry, dict) or "kind" not in entry:
        raise AdapterFormatError(f"{where}: module {name!r} has no 'kind'")
    _check_velora(name, entry, where)
    if entry["kind"] == "lora":
        if not name:
            raise AdapterFormatError(f"{where}: a LoRA entry must name a module (the root '' holds full entries only)")
        for key in ("rank", "alpha", "scaling", "in_features", "out_features", "fan_in_fan_out", "base_tensors"):
            if key not in entry:
                raise AdapterFormatError(f"{where}: LoRA module {name!r} lacks {key!r}")
        for key in ("rank", "in_features", "out_features"):
            if not _is_int(entry[key]) or entry[key] < 1:
                raise AdapterFormatError(f"{where}: LoRA module {name!r} has invalid {key} {entry[key]!r}")
        for key in ("alpha", "scaling"):
            if not isinstance(entry[key], (int, float)) or isinstance(entry[key], bool) or not math.isfinite(entry[key]):
                raise AdapterFormatError(f"{where}: LoRA module {name!r} has invalid {key} {entry[key]!r}")
        if not isinstance(entry["fan_in_fan_out"], bool):
            raise AdapterFormatError(f"{where}: LoRA module {name!r}: fan_in_fan_out must be true or false")
        rec = entry["base_tensors"].get("weight") if isinstance(entry["base_tensors"], dict) else None
        if not isinstance(rec, dict) or not {"sha256", "shape", "dtype"} <= set(rec):
            raise AdapterFormatError(f"{where}: LoRA module {name!r} lacks the base weight record (sha256, shape, dtype)")
    elif entry["kind"] == "delta":
        for key in ("in_features", "out_features", "fan_in_fan_out", "base_tensors"):
            if key not in entry:
                raise AdapterFormatError(f"{where}: delta module {name!r} lacks {key!r}")
        for key in ("in_features", "out_features"):
            if not _is_int(entry[key]) or entry[key] < 1:
                raise AdapterFormatError(f"{where}: delta module {name!r} has invalid {key} {entry[key]!r}")
        rec = entry["base_tensors"].get("weight") if isinstance(entry["base_tensors"], dict) else None
        if not isinstance(rec, dict) or not {"sha256", "shape", "dtype"} <= set(rec):
            raise AdapterFormatError(f"{where}: delta module {name!r} lacks the base weight record (sha256, shape, dtype)")
        lte = entry.get("lte")
        if lte is not None and (not isinstance(lte, dict) or not all(_is_int(lte.get(k)) and lte[k] >= 1
                                                                    for k in ("heads", "rank"))):
            raise AdapterFormatError(f"{where}: delta module {name!r}: 'lte' needs integer heads and rank ≥ 1")
    elif entry["kind"] == "full":
        if not isinstance(entry.get("tensors"), dict) or not entry["tensors"]:
            raise AdapterFormatError(f"{where}: full module {name!r} lists no tensors")
        for p, rec in entry["tensors"].items():
            if not isinstance(rec, dict) or not isinstance(rec.get("shape"), list) or \
                    not all(_is_int(d) and d >= 0 for d in rec["shape"]):
                raise AdapterFormatError(f"{where}: full module {name!r}: tensor {p!r} has no valid shape")


def _check_velora(name: str, entry: dict[str, Any], where: str) -> None:
    velora = entry.get("velora")
    if velora is not None and (not isinstance(velora, dict) or not all(
            _is_int(velora.get(k)) and velora[k] >= 1 for k in ("groups", "group_dim"))):
        raise AdapterFormatError(f"{where}: module {name!r}: 'velora' needs integer groups and group_dim ≥ 1")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def write(path: str | os.PathLike, adapter: Adapter, *, force: bool = False) -> Path:
    """Validate, then write ``adapter`` to ``path`` atomically (temp file + rename)."""
    path = Path(path)
    if path.is_dir():
        raise OutputExistsError(f"{path} is a directory; give a file name such as {path / 'adapter.safetensors'}")
    if path.exists() and not force:
        raise OutputExistsError(f"{path} exists; pass --force (force=True) to overwrite it")
    validate(adapter.tensors, adapter.meta, where=str(path))
    metadata = {"format": FORMAT, "format_version": str(FORMAT_VERSION),
                "adapter": _dumps(adapter.meta, path)}
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in adapter.tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    return path


def _dumps(meta: dict[str, Any], path: Path) -> str:
    try:  # NaN is not JSON: readers in other languages would reject the file
        return json.dumps(meta, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except ValueError as e:
        raise AdapterFormatError(f"{path}: metadata holds a NaN/Inf number ({e}); fix the value before saving")


def atomic_write(path: Path, writer) -> None:
    """Call ``writer(tmp_path)`` then rename the temp file over ``path``; never leaves a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        writer(Path(tmp))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a shared file should follow the umask
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def check_output_spares(out: str | os.PathLike, *inputs: str | os.PathLike) -> None:
    """Refuse an output that is, or contains, one of the inputs: replacing it would delete the input."""
    o = Path(out).resolve()
    for i in inputs:
        p = Path(i)
        if p.exists() and (p.resolve() == o or p.resolve().is_relative_to(o)):
            raise OutputExistsError(f"-o {out} is or contains the input {i}; writing there would delete it. "
                                    "Write the result elsewhere")


def atomic_dir(path: Path, fill) -> None:
    """Call ``fill(tmp_dir)`` then rename the temp directory over ``path`` (replacing it); never half-written."""
    import shutil
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        fill(tmp)
        umask = os.umask(0)
        os.umask(umask)
        for f in [tmp, *tmp.rglob("*")]:  # mkdtemp makes 0700: a shared directory follows the umask
            os.chmod(f, (0o777 if f.is_dir() else 0o666) & ~umask)
        if path.exists():
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def read_header(path: str | os.PathLike) -> dict[str, Any]:
    """Read and validate only the metadata of an adapter file (cheap: no tensor data)."""
    path = Path(path)
    raw = _raw_metadata(path)
    return _decode_metadata(raw, path)


def read(path: str | os.PathLike) -> Adapter:
    """Read an adapter file and validate it; raise a user-facing error for anything wrong."""
    path = Path(path)
    raw = _raw_metadata(path)
    meta = _decode_metadata(raw, path)
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for corrupt data
        raise AdapterFormatError(f"{path}: tensor data is corrupt ({e}); re-download or re-export the adapter")
    validate(tensors, meta, where=str(path))
    return Adapter(tensors=tensors, meta=meta, path=path, version=int(raw["format_version"]))


def _raw_metadata(path: Path) -> dict[str, str]:
    if not path.exists():
        raise AdapterFormatError(f"{path}: no such file; check the path")
    if path.is_dir():
        hint = (" (it looks like a PEFT adapter directory; import it with "
                f"`lrsurgery convert --from peft {path} -o ADAPTER`)") \
            if (path / "adapter_config.json").exists() else ""
        raise AdapterFormatError(f"{path} is a directory, not an adapter file{hint}")
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except Exception as e:
        raise AdapterFormatError(f"{path}: not a readable safetensors file ({e}); "
                                 "the file is corrupt or of another format")


def _decode_metadata(raw: dict[str, str], path: Path) -> dict[str, Any]:
    if raw.get("format") != FORMAT:
        raise AdapterFormatError(
            f"{path}: not an lrsurgery adapter (metadata 'format' is {raw.get('format')!r}, expected {FORMAT!r}); "
            "a PEFT adapter directory is imported with `lrsurgery convert --from peft DIR -o ADAPTER`")
    version = raw.get("format_version")
    if not isinstance(version, str) or not re.fullmatch(r"[1-9][0-9]*", version):
        raise AdapterFormatError(f"{path}: invalid format_version {version!r}; the file is corrupt")
    v = int(version)
    if v > FORMAT_VERSION:
        raise AdapterFormatError(f"{path}: written in adapter format v{v}, newer than this lrsurgery reads "
                                 f"(v{FORMAT_VERSION}); upgrade: pip install -U lrsurgery")
    try:
        meta = json.loads(raw["adapter"])
    except (KeyError, json.JSONDecodeError) as e:
        raise AdapterFormatError(f"{path}: the 'adapter' metadata is missing or not valid JSON ({e})")
    if not isinstance(meta, dict):
        raise AdapterFormatError(f"{path}: the 'adapter' metadata is not a JSON object")
    return meta
