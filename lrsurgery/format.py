"""Adapter file format v1: one safetensors file, tensors plus JSON metadata (spec: formats/adapter-v1.md).

This module knows tensors and metadata only, never torch modules: it writes atomically, reads,
and validates everything that can be checked without a model (structure, version, names,
shapes, finite values). Checks against a model's base weights live in ``lrsurgery.adapter``.

    __metadata__ = {"format": "lrsurgery.adapter", "format_version": "1", "adapter": "<JSON>"}
    tensors      = {"<module>.lora_A": [r, in], "<module>.lora_B": [out, r],   # kind "lora"
                    "<module>.<param>": full tensor}                          # kind "full"
"""

from __future__ import annotations

import hashlib
import json
import os
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
KINDS = ("lora", "full")

_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float64, torch.float32, torch.float16, torch.bfloat16,
    torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool)}


@dataclass
class Adapter:
    """An adapter in memory: tensors by name and the decoded ``adapter`` metadata object."""

    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]
    path: Path | None = field(default=None, compare=False)

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
        h.update(flat.view(torch.uint8).numpy())
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
    if kind == "lora":
        r, n_in, n_out = entry["rank"], entry["in_features"], entry["out_features"]
        return {f"{name}.lora_A": (r, n_in), f"{name}.lora_B": (n_out, r)}
    if kind == "full":
        return {tensor_key(name, p): tuple(rec["shape"]) for p, rec in entry["tensors"].items()}
    raise AdapterFormatError(
        f"module {name!r} has unknown kind {kind!r} (this lrsurgery knows {', '.join(KINDS)}); "
        "the file may come from a newer lrsurgery: pip install -U lrsurgery")


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
        expected.update(expected_tensors(name, entry))
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
    if entry["kind"] == "lora":
        for key in ("rank", "alpha", "scaling", "in_features", "out_features", "fan_in_fan_out", "base_tensors"):
            if key not in entry:
                raise AdapterFormatError(f"{where}: LoRA module {name!r} lacks {key!r}")
        if not isinstance(entry["rank"], int) or entry["rank"] < 1:
            raise AdapterFormatError(f"{where}: LoRA module {name!r} has invalid rank {entry['rank']!r}")
    elif entry["kind"] == "full":
        if not isinstance(entry.get("tensors"), dict) or not entry["tensors"]:
            raise AdapterFormatError(f"{where}: full module {name!r} lists no tensors")


def write(path: str | os.PathLike, adapter: Adapter, *, force: bool = False) -> Path:
    """Validate, then write ``adapter`` to ``path`` atomically (temp file + rename)."""
    path = Path(path)
    if path.exists() and not force:
        raise OutputExistsError(f"{path} exists; pass --force (force=True) to overwrite it")
    validate(adapter.tensors, adapter.meta, where=str(path))
    metadata = {"format": FORMAT, "format_version": str(FORMAT_VERSION),
                "adapter": json.dumps(adapter.meta, sort_keys=True, separators=(",", ":"))}
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in adapter.tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    return path


def atomic_write(path: Path, writer) -> None:
    """Call ``writer(tmp_path)`` then rename the temp file over ``path``; never leaves a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        writer(Path(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


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
    return Adapter(tensors=tensors, meta=meta, path=path)


def _raw_metadata(path: Path) -> dict[str, str]:
    if not path.exists():
        raise AdapterFormatError(f"{path}: no such file; check the path")
    if path.is_dir():
        hint = " (it looks like a PEFT adapter: use `lrsurgery convert --from peft`)" \
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
            "a PEFT adapter can be imported with `lrsurgery convert --from peft`")
    version = raw.get("format_version")
    try:
        v = int(version)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise AdapterFormatError(f"{path}: invalid format_version {version!r}; the file is corrupt")
    if v > FORMAT_VERSION:
        raise AdapterFormatError(f"{path}: written in adapter format v{v}, newer than this lrsurgery reads "
                                 f"(v{FORMAT_VERSION}); upgrade: pip install -U lrsurgery")
    if v < 1:
        raise AdapterFormatError(f"{path}: unknown adapter format version {v}")
    try:
        meta = json.loads(raw["adapter"])
    except (KeyError, json.JSONDecodeError) as e:
        raise AdapterFormatError(f"{path}: the 'adapter' metadata is missing or not valid JSON ({e})")
    if not isinstance(meta, dict):
        raise AdapterFormatError(f"{path}: the 'adapter' metadata is not a JSON object")
    return meta
