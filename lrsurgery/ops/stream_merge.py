"""Merge an adapter into a safetensors checkpoint tensor by tensor, without building the model.

Inputs: one ``FILE.safetensors``; a model directory with ``model.safetensors``; or a directory with
``model.safetensors.index.json`` and its shards (transformers' layout; a hub snapshot is one). The
output has the input's layout: the same shard names, tensor → shard map, tensor order and per-shard
``__metadata__``, a fresh index (``total_size`` recomputed), and the directory's other files
(config.json, tokenizer files) copied as they are.

Memory. A tensor the adapter leaves alone is never materialized: its bytes go from the input file to
the output file (``copy_file_range``, or 16 MiB reads). A tensor the adapter changes is read alone
(``pread``, no memory map), merged by ``ops.merge.merged_tensor`` (the arithmetic the in-memory
merge uses, so the bytes are the same) and written before the next one is read. Peak ≈ W + ΔW in
fp32 + the result: 2× the largest changed tensor in fp32, 4× in bf16/fp16.

The safetensors layout (https://huggingface.co/docs/safetensors), which ``ShardWriter`` writes::

    [u64 little-endian N][N bytes of JSON, space-padded to a multiple of 8][tensor bytes, back to back]
    {"__metadata__": {"format": "pt"}, "<name>": {"dtype": "F32", "shape": [4, 2], "data_offsets": [0, 32]}, ...}

``data_offsets`` count from the first tensor byte; the header lists tensors in data order. Because
every tensor keeps its dtype and shape, the output header equals the input's, and a file written by
``safetensors.save_file`` is reproduced byte for byte by ``save_file`` of the merged tensors.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Iterator, NamedTuple

import torch

from lrsurgery import format as fmt
from lrsurgery import lineage
from lrsurgery.errors import BaseMismatchError, LrsurgeryError, ModelNotFoundError
from lrsurgery.ops.merge import (Target, base_matches, check_target_shape, merge_targets, merged_tensor,
                                 missing_target_error)

INDEX_SUFFIX = ".safetensors.index.json"
_MAX_HEADER = 100_000_000  # safetensors refuses larger headers too
_CHUNK = 1 << 24
# bytes per element of the dtype codes torch can hold (others are copied through unchecked)
_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
             "BOOL": 1, "U16": 2, "U32": 4, "U64": 8, "C64": 8, "F8_E4M3": 1, "F8_E5M2": 1}
_CODES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
          torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
          torch.bool: "BOOL", torch.complex64: "C64"}
_CODES.update({getattr(torch, n): c for n, c in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2"),
                                                 ("uint16", "U16"), ("uint32", "U32"), ("uint64", "U64"))
               if hasattr(torch, n)})
# files of other weight formats are not copied: they would hold the unmerged base
_OTHER_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".safetensors", ".gguf", ".onnx", ".index.json")


class Entry(NamedTuple):
    """One tensor of a safetensors header: name, dtype code, shape, byte range in the data section."""

    name: str
    dtype: str
    shape: list[int]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @staticmethod
    def of(name: str, t: torch.Tensor, begin: int) -> Entry:
        """The entry ``t`` gets when written at ``begin``."""
        if t.dtype not in _CODES:
            raise LrsurgeryError(f"tensor {name!r}: safetensors has no code for dtype {t.dtype}")
        return Entry(name, _CODES[t.dtype], list(t.shape), begin, begin + t.numel() * t.element_size())


@dataclass
class Header:
    """A safetensors file's header: its ``__metadata__`` and its tensors in data order."""

    entries: list[Entry]
    metadata: dict[str, str] | None = None
    data_start: int = 0  # file offset of the first tensor byte

    def encode(self) -> bytes:
        """The header as safetensors writes it: length, compact JSON, spaces up to a multiple of 8."""
        obj: dict[str, Any] = {} if self.metadata is None else {"__metadata__": self.metadata}
        obj.update({e.name: {"dtype": e.dtype, "shape": e.shape, "data_offsets": [e.begin, e.end]}
                    for e in self.entries})
        text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()
        text += b" " * (-len(text) % 8)
        return struct.pack("<Q", len(text)) + text

    @property
    def data_bytes(self) -> int:
        return self.entries[-1].end if self.entries else 0


def read_header(path: Path) -> Header:
    """Parse and check the header of safetensors file ``path`` (no tensor data is read)."""
    def bad(why: str) -> ModelNotFoundError:
        return ModelNotFoundError(f"{path}: not a readable safetensors file ({why}); re-download or re-save it")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise bad("shorter than 8 bytes")
        n = struct.unpack("<Q", head)[0]
        if n > min(_MAX_HEADER, size - 8):
            raise bad(f"header length {n} does not fit the file")
        try:
            obj = json.loads(f.read(n))
        except (UnicodeDecodeError, ValueError) as e:
            raise bad(f"header is not JSON: {e}")
    if not isinstance(obj, dict):
        raise bad("header is not a JSON object")
    metadata = obj.pop("__metadata__", None)
    try:
        entries = [Entry(k, v["dtype"], list(v["shape"]), *v["data_offsets"]) for k, v in obj.items()]
    except (TypeError, KeyError, ValueError) as e:
        raise bad(f"malformed tensor entry ({e})")
    if not all(isinstance(d, int) and d >= 0 for e in entries for d in e.shape):
        raise bad("a tensor shape is not a list of sizes")
    entries.sort(key=lambda e: e.begin)  # stable: equal offsets (empty tensors) keep their header order
    pos = 0
    for e in entries:
        numel = 1
        for d in e.shape:
            numel *= d
        if e.begin != pos or e.end < e.begin or (e.dtype in _ITEMSIZE and e.nbytes != numel * _ITEMSIZE[e.dtype]):
            raise bad(f"tensor {e.name!r} has data_offsets {[e.begin, e.end]} for {e.dtype} {e.shape} at byte {pos}")
        pos = e.end
    if 8 + n + pos != size:
        raise bad(f"the tensors take {pos} bytes but the file holds {size - 8 - n}")
    return Header(entries, metadata, 8 + n)


class ShardWriter:
    """Write a safetensors file tensor by tensor: the header first (every shape is known), then each
    tensor's bytes in header order, from a tensor (``write``) or from another file (``copy``)."""

    def __init__(self, f: BinaryIO, header: Header):
        self.f, self.entries, self.done = f, header.entries, 0
        _write_all(f, memoryview(header.encode()))

    def _next(self, name: str) -> Entry:
        if self.done >= len(self.entries) or self.entries[self.done].name != name:
            want = self.entries[self.done].name if self.done < len(self.entries) else "nothing"
            raise LrsurgeryError(f"internal error: wrote {name!r} where the header expects {want!r}")
        self.done += 1
        return self.entries[self.done - 1]

    def write(self, name: str, t: torch.Tensor) -> None:
        e = self._next(name)
        got = Entry.of(name, t, e.begin)
        if got != e:
            raise LrsurgeryError(f"internal error: {name!r} is {got.dtype} {got.shape}, "
                                 f"the header says {e.dtype} {e.shape}")
        if sys.byteorder != "little" and t.element_size() > 1:
            raise LrsurgeryError("safetensors is little-endian; streaming merge runs on little-endian machines only")
        if t.numel():
            _write_all(self.f, memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy()))

    def copy(self, name: str, src: BinaryIO, offset: int) -> None:
        """The next tensor's bytes, verbatim from ``src`` at ``offset``."""
        _copy_range(src, self.f, offset, self._next(name).nbytes)

    def close(self) -> None:
        if self.done != len(self.entries):
            raise LrsurgeryError(f"internal error: {len(self.entries) - self.done} tensors were not written")


def _write_all(f: BinaryIO, data: memoryview) -> None:
    data = data.cast("B")
    while data:
        data = data[f.write(data):]


def _copy_range(src: BinaryIO, dst: BinaryIO, offset: int, length: int) -> None:
    """Copy ``length`` bytes of ``src`` from ``offset`` to ``dst``'s position, in the kernel when possible."""
    fin, fout = src.fileno(), dst.fileno()
    while length > 0:
        try:
            n = os.copy_file_range(fin, fout, min(length, 1 << 30), offset)
        except (AttributeError, OSError):  # older kernels, other file systems: read and write
            n = len(block := os.pread(fin, min(length, _CHUNK), offset))
            _write_all(dst, memoryview(block))
        if n == 0:
            raise LrsurgeryError(f"{getattr(src, 'name', 'input')} ended early: the file was truncated while merging")
        offset, length = offset + n, length - n


@dataclass
class Checkpoint:
    """A safetensors checkpoint on disk: its files, and the index when it is sharded."""

    shards: list[Path]
    root: Path | None = None                 # the model directory (None: a bare .safetensors file)
    index: dict[str, Any] | None = None      # *.safetensors.index.json as read
    index_name: str | None = None
    headers: dict[Path, Header] = field(default_factory=dict)

    def describe(self) -> str:
        if self.index_name:
            return f"{self.root / self.index_name} ({len(self.shards)} shards)"
        return str(self.shards[0])


def find_checkpoint(path: Path) -> Checkpoint | None:
    """The safetensors checkpoint at ``path`` (a file or a model directory), or None if it is not one."""
    if path.is_file():
        return Checkpoint([path]) if path.suffix == ".safetensors" else None
    if not path.is_dir():
        return None
    indexes = sorted(p for p in path.iterdir() if p.name.endswith(INDEX_SUFFIX))
    if len(indexes) > 1:
        raise ModelNotFoundError(f"{path} holds several safetensors indexes ({', '.join(p.name for p in indexes)}); "
                                 "give the model directory that has one")
    if indexes:
        return _sharded(path, indexes[0])
    single = [path / "model.safetensors"] if (path / "model.safetensors").is_file() else \
        sorted(p for p in path.glob("*.safetensors") if p.is_file())
    return Checkpoint(single, root=path) if len(single) == 1 else None


def _sharded(root: Path, index_path: Path) -> Checkpoint:
    try:
        index = json.loads(index_path.read_text())
        weight_map = index["weight_map"]
        assert isinstance(weight_map, dict) and all(isinstance(v, str) for v in weight_map.values())
    except (OSError, ValueError, KeyError, TypeError, AssertionError) as e:
        raise ModelNotFoundError(f"{index_path}: not a valid safetensors index (needs a 'weight_map' of tensor → "
                                 f"file; {type(e).__name__}: {e})")
    shards = []
    for name in dict.fromkeys(weight_map.values()):
        shard = root / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise ModelNotFoundError(f"{index_path} names shard {name!r} outside its directory")
        if not shard.is_file():
            raise ModelNotFoundError(f"{index_path} maps tensors to {name}, which is not in {root}; "
                                     "the download is incomplete")
        shards.append(shard)
    return Checkpoint(shards, root=root, index=index, index_name=index_path.name)


@dataclass
class StreamReport:
    """What a streaming merge did."""

    path: Path
    shards: int
    tensors: int
    changed: int
    bytes_copied: int    # tensor bytes copied verbatim
    bytes_merged: int    # tensor bytes read, merged and written
    mismatched: list[str] = field(default_factory=list)  # base weights with another hash (merged under force)


def stream_merge(ckpt: Checkpoint, adapter: fmt.Adapter, out: str | os.PathLike, *,
                 force_base: bool = False) -> StreamReport:
    """Write ``ckpt`` with ``adapter`` folded in to ``out`` (a directory, or FILE.safetensors for one file).

    Names, shapes and the tensor locations are checked from the headers before anything is written;
    a base weight whose SHA-256 differs raises ``BaseMismatchError`` at once unless ``force_base``.
    The output appears atomically (temp file or directory, then rename); ``out`` is replaced if it exists.
    """
    out = Path(out)
    fmt.check_output_spares(out, *ckpt.shards, *([ckpt.root] if ckpt.root is not None else []))
    for shard in ckpt.shards:
        ckpt.headers[shard] = read_header(shard)
    lineage.check(adapter, [], force=force_base, where="the base checkpoint")  # a plain checkpoint holds no parents
    plan = _plan(ckpt, adapter)
    report = StreamReport(out, len(ckpt.shards), sum(len(h.entries) for h in ckpt.headers.values()),
                          sum(map(len, plan.values())), 0, 0)
    if ckpt.root is None or out.suffix == ".safetensors":
        if ckpt.index is not None:
            raise LrsurgeryError(f"the base {ckpt.describe()} is sharded, so the merged model is too: "
                                 f"give -o a directory (got {out})")
        if out.suffix != ".safetensors":
            raise LrsurgeryError(f"the base {ckpt.shards[0].name} is a plain safetensors file, so the merged model "
                                 f"is one too: give -o a FILE.safetensors (got {out})")
        shard = ckpt.shards[0]
        fmt.atomic_write(out, lambda tmp: _merge_shard(shard, tmp, ckpt.headers[shard], plan[shard], adapter,
                                                       report, force_base))
    else:
        _write_dir(ckpt, out, lambda tmp: _merge_dir(ckpt, tmp, plan, adapter, report, force_base))
    if report.mismatched:
        warnings.warn(f"{len(report.mismatched)} base weights differ from the ones the adapter was made on "
                      f"(e.g. {report.mismatched[0]}) — merged anyway because of --force", stacklevel=2)
    return report


def _plan(ckpt: Checkpoint, adapter: fmt.Adapter) -> dict[Path, dict[str, Target]]:
    """Shard → the tensors in it the adapter changes; checks every name and shape first."""
    where: dict[str, tuple[Path, Entry]] = {}
    for shard, header in ckpt.headers.items():
        for e in header.entries:
            where.setdefault(e.name, (shard, e))
    if ckpt.index is not None:
        for name, file in ckpt.index["weight_map"].items():
            if name not in where or where[name][0] != ckpt.root / file:
                raise ModelNotFoundError(f"{ckpt.root / ckpt.index_name} puts {name!r} in {file}, which has no such "
                                         "tensor; the index does not match its shards")
    plan: dict[Path, dict[str, Target]] = {shard: {} for shard in ckpt.shards}
    for key, target in merge_targets(adapter).items():
        if key not in where:
            err = missing_target_error(adapter, key, target, ckpt.describe())
            raise type(err)(f"{err}. If this checkpoint names the tensor otherwise than the model's modules, "
                            "merge with --in-memory (builds the model)")
        shard, entry = where[key]
        check_target_shape(adapter, key, target, entry.shape)
        plan[shard][key] = target
    return plan


def _merge_dir(ckpt: Checkpoint, tmp: Path, plan: dict[Path, dict[str, Target]], adapter: fmt.Adapter,
               report: StreamReport, force_base: bool) -> None:
    """Fill the temporary output directory: merged shards, the index, the other files as they are."""
    written = set()
    for shard in ckpt.shards:
        rel = shard.relative_to(ckpt.root)
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        _merge_shard(shard, tmp / rel, ckpt.headers[shard], plan[shard], adapter, report, force_base)
        written.add(rel.parts[0])
    if ckpt.index is not None:
        index = json.loads(json.dumps(ckpt.index))  # a copy, key order kept
        index.setdefault("metadata", {})["total_size"] = sum(h.data_bytes for h in ckpt.headers.values())
        (tmp / ckpt.index_name).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        written.add(ckpt.index_name)
    skipped = []
    for f in sorted(ckpt.root.iterdir()):
        if f.name in written or f.name.startswith("."):
            continue
        if f.is_file() and not f.name.endswith(_OTHER_WEIGHTS):
            shutil.copyfile(f, tmp / f.name)  # follows symlinks: hub snapshots link to blobs
        else:
            skipped.append(f.name + ("/" if f.is_dir() else ""))
    if skipped:
        warnings.warn(f"not copied from {ckpt.root}: {', '.join(skipped)} (subdirectories and other weight files "
                      "would still hold the unmerged base)", stacklevel=3)


def _merge_shard(src: Path, dst: Path, header: Header, todo: dict[str, Target], adapter: fmt.Adapter,
                 report: StreamReport, force_base: bool) -> None:
    """Stream one safetensors file into ``dst``: changed tensors merged one at a time, others copied."""
    with open(src, "rb", buffering=0) as fin, open(dst, "wb", buffering=0) as fout, \
            _reader(src, needed=bool(todo)) as reader:
        writer = ShardWriter(fout, header)
        for e in header.entries:
            target = todo.get(e.name)
            if target is None:
                writer.copy(e.name, fin, header.data_start + e.begin)
                report.bytes_copied += e.nbytes
                continue
            w = reader.get_tensor(e.name)
            if not base_matches(adapter, target, w):
                if not force_base:
                    raise BaseMismatchError(
                        f"base weight {e.name!r} in {src} differs from the one the adapter was made on "
                        f"(SHA-256 mismatch); the adapter expects base {adapter.meta['base'].get('ref')!r}: "
                        "use the right base or pass --force")
                report.mismatched.append(e.name)
            merged = merged_tensor(adapter, e.name, target, w)
            del w  # before the next read: at most one changed tensor (and its merge) is alive
            writer.write(e.name, merged)
            del merged
            report.bytes_merged += e.nbytes
        writer.close()
        os.fsync(fout.fileno())


@contextlib.contextmanager
def _reader(path: Path, needed: bool) -> Iterator[Any]:
    """A safetensors reader that reads each tensor with pread (0.8+), so no mapped pages pile up."""
    if not needed:
        yield None
        return
    from safetensors import safe_open
    try:
        handle = safe_open(str(path), framework="pt", backend="pread")
    except TypeError:  # safetensors < 0.8 has memory maps only
        handle = safe_open(str(path), framework="pt")
    with handle as f:
        yield f


def _write_dir(ckpt: Checkpoint, out: Path, fill: Any) -> None:
    """Build the output directory next to ``out`` and rename it into place (never a half-written model)."""
    fmt.atomic_dir(out, fill)
