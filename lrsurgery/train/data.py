"""Training data from a one-string spec: sklearn digits, an image folder, or a text file.

Everything works offline; bad input raises ``TrainingError`` naming the problem and the fix.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset, TensorDataset

from lrsurgery.errors import TrainingError

KINDS = ("digits", "imagefolder", "text")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


@dataclass
class DataBundle:
    """Train and eval datasets plus what a trainer needs to know about them."""

    train: Dataset
    eval: Dataset
    task: str  # "classification" or "causal-lm"
    num_classes: int | None
    classes: list[str] | None
    description: str


def parse_data_spec(spec: str) -> tuple[str, str | None]:
    """Split 'kind' or 'kind:arg' into (kind, arg); only the first ':' separates, so paths may hold ':'."""
    kind, sep, arg = spec.strip().partition(":")
    kind = kind.strip().lower()
    if kind not in KINDS:
        raise TrainingError(
            f"unknown data spec kind {kind!r} in {spec!r}; use 'digits', 'digits:5-9', "
            "'digits:0,2,4', 'imagefolder:DIR' or 'text:FILE'"
        )
    arg = arg.strip() if sep else ""
    if kind in ("imagefolder", "text") and not arg:
        what = "DIR" if kind == "imagefolder" else "FILE"
        raise TrainingError(f"data spec {spec!r} needs a path; write it as '{kind}:{what}'")
    return kind, (arg or None)


def parse_digit_classes(arg: str | None) -> list[int]:
    """Turn '5-9', '0,2,4' (or a mix like '0-2,7') into a list of distinct digits in listed order."""
    if arg is None:
        return list(range(10))
    digits: list[int] = []
    for part in arg.split(","):
        lo, dash, hi = part.strip().partition("-")
        try:
            items = list(range(int(lo), int(hi) + 1)) if dash else [int(lo)]
        except ValueError:
            raise TrainingError(
                f"bad digits class list {arg!r}; write a range like 'digits:5-9' or a list like 'digits:0,2,4'"
            ) from None
        if not items:
            raise TrainingError(f"empty digits range {part.strip()!r} in {arg!r}; write ranges low-high, e.g. 5-9")
        digits.extend(items)
    bad = [d for d in digits if not 0 <= d <= 9]
    if bad:
        raise TrainingError(f"digits class {bad[0]} is out of range in {arg!r}; digits classes are 0-9")
    if len(set(digits)) != len(digits):
        raise TrainingError(f"digits class list {arg!r} repeats a class; list each digit once")
    if len(digits) < 2:
        raise TrainingError(f"digits class list {arg!r} has one class; classification needs at least two")
    return digits


def _normalize_stats(values: tuple[float, ...], in_chans: int, name: str) -> torch.Tensor:
    """Return per-channel stats shaped [C,1,1]; a single value broadcasts to every channel."""
    if len(values) not in (1, in_chans):
        raise TrainingError(f"{name} has {len(values)} values but in_chans is {in_chans}; give 1 or {in_chans} values")
    if name == "std" and any(v == 0 for v in values):
        raise TrainingError("std contains 0; normalization would divide by zero, use positive std values")
    t = torch.tensor([float(v) for v in values], dtype=torch.float32)
    return t.expand(in_chans).clone().view(in_chans, 1, 1)


def _eval_size(n: int, eval_fraction: float) -> int:
    """Number of eval items: round(fraction * n), at least 1, leaving at least 1 for training."""
    if not 0.0 < eval_fraction < 1.0:
        raise TrainingError(f"eval_fraction is {eval_fraction}; it must be between 0 and 1 (exclusive)")
    if n < 2:
        raise TrainingError(f"the data has {n} item(s); at least 2 are needed to split into train and eval")
    return min(max(1, round(eval_fraction * n)), n - 1)


def _stratified_counts(sizes: list[int], n_eval: int) -> list[int]:
    """Share n_eval among classes proportionally (largest remainder), giving each class of >=2 items 1..n-1."""
    total = sum(sizes)
    quota = [n_eval * s / total for s in sizes]
    lo = [1 if s >= 2 else 0 for s in sizes]
    hi = [s - 1 if s >= 2 else 0 for s in sizes]
    counts = [min(max(math.floor(q), a), b) for q, a, b in zip(quota, lo, hi)]
    n_eval = min(max(n_eval, sum(lo)), sum(hi))
    while sum(counts) < n_eval:
        c = max((i for i in range(len(sizes)) if counts[i] < hi[i]), key=lambda i: quota[i] - counts[i])
        counts[c] += 1
    while sum(counts) > n_eval:
        c = min((i for i in range(len(sizes)) if counts[i] > lo[i]), key=lambda i: quota[i] - counts[i])
        counts[c] -= 1
    return counts


def split_indices(
    n: int, eval_fraction: float, seed: int, labels: list[int] | None = None
) -> tuple[list[int], list[int]]:
    """Deterministic (train, eval) index lists; stratified per class when labels are given."""
    n_eval = _eval_size(n, eval_fraction)
    gen = torch.Generator().manual_seed(seed)
    if labels is None:
        perm = torch.randperm(n, generator=gen).tolist()
        return sorted(perm[n_eval:]), sorted(perm[:n_eval])
    label_arr = np.asarray(labels)
    num_classes = int(label_arr.max()) + 1
    members = [np.flatnonzero(label_arr == c) for c in range(num_classes)]
    counts = _stratified_counts([len(m) for m in members], n_eval)
    train, evals = [], []
    for idx, k in zip(members, counts):
        perm = idx[torch.randperm(len(idx), generator=gen).numpy()].tolist()
        evals += perm[:k]
        train += perm[k:]
    return sorted(train), sorted(evals)


def _build_digits(arg: str | None, image_size: tuple[int, int], in_chans: int,
                  mean: torch.Tensor, std: torch.Tensor) -> tuple[TensorDataset, list[int], list[str]]:
    """Precompute the chosen sklearn digits as one normalized [N,C,H,W] tensor with remapped labels."""
    from sklearn.datasets import load_digits

    digits = parse_digit_classes(arg)
    raw = load_digits()
    keep = np.isin(raw.target, digits)
    remap = {d: i for i, d in enumerate(digits)}
    labels = [remap[int(t)] for t in raw.target[keep]]
    base = torch.from_numpy(raw.images[keep] / 16.0).float().unsqueeze(1)
    base = F.interpolate(base, size=tuple(image_size), mode="bilinear", align_corners=False)
    images = torch.empty(base.shape[0], in_chans, *base.shape[2:], dtype=torch.float32)
    for c in range(in_chans):
        images[:, c] = (base[:, 0] - mean[c]) / std[c]
    dataset = TensorDataset(images, torch.tensor(labels, dtype=torch.int64))
    return dataset, labels, [str(d) for d in digits]


class ImageFolderDataset(Dataset):
    """Images from DIR/<class>/<file>, loaded lazily with PIL, resized and normalized per item."""

    def __init__(self, files: list[Path], targets: list[int], image_size: tuple[int, int],
                 in_chans: int, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Keep file paths and labels; decoding happens in __getitem__."""
        self.files, self.targets = files, targets
        self.image_size, self.in_chans, self.mean, self.std = tuple(image_size), in_chans, mean, std

    def __len__(self) -> int:
        """Number of image files."""
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode, resize to image_size, scale to [0,1] and normalize image i."""
        from PIL import Image

        path = self.files[i]
        try:
            with Image.open(path) as img:
                img = img.convert("L" if self.in_chans == 1 else "RGB")
                img = img.resize((self.image_size[1], self.image_size[0]), Image.BILINEAR)
                arr = np.asarray(img, dtype=np.float32) / 255.0
        except OSError as exc:
            raise TrainingError(f"cannot read image {path}: {exc}; remove or replace the file") from None
        x = torch.from_numpy(arr.copy())
        x = x.unsqueeze(0) if x.ndim == 2 else x.permute(2, 0, 1)
        return (x - self.mean) / self.std, torch.tensor(self.targets[i], dtype=torch.int64)


def _build_imagefolder(arg: str, image_size: tuple[int, int], in_chans: int,
                       mean: torch.Tensor, std: torch.Tensor) -> tuple[ImageFolderDataset, list[int], list[str]]:
    """Scan DIR for class subfolders (sorted) and their image files."""
    root = Path(arg).expanduser()
    if not root.is_dir():
        raise TrainingError(f"image folder {root} does not exist; pass 'imagefolder:DIR' with one subfolder per class")
    if in_chans not in (1, 3):
        raise TrainingError(f"imagefolder loads grayscale or RGB images, but in_chans is {in_chans}; use 1 or 3")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise TrainingError(f"image folder {root} has no class subfolders; put each class's images in DIR/<class>/")
    files: list[Path] = []
    targets: list[int] = []
    for label, name in enumerate(classes):
        found = sorted(p for p in (root / name).iterdir()
                       if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        if not found:
            raise TrainingError(
                f"class folder {root / name} has no images ({', '.join(IMAGE_EXTENSIONS)}); add images or remove it"
            )
        files += found
        targets += [label] * len(found)
    return ImageFolderDataset(files, targets, image_size, in_chans, mean, std), targets, classes


def read_documents(path: Path) -> list[str]:
    """Documents of a text file: one per non-empty line, or the "text" field of each .jsonl line."""
    if not path.is_file():
        raise TrainingError(f"text file {path} does not exist; pass 'text:FILE' with an existing file")
    docs: list[str] = []
    jsonl = path.suffix.lower() == ".jsonl"
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        if not jsonl:
            docs.append(line)
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TrainingError(f"{path} line {lineno} is not valid JSON ({exc.msg}); fix or remove it") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise TrainingError(f'{path} line {lineno} has no string "text" field; each line must be {{"text": ...}}')
        if obj["text"].strip():
            docs.append(obj["text"])
    if not docs:
        raise TrainingError(f"text file {path} is empty (no non-empty documents); add text to train on")
    return docs


def tokenize_documents(docs: list[str], tokenizer: Any) -> list[int]:
    """Tokenize each document without special tokens and join them with eos_token_id when it exists."""
    ids_per_doc = tokenizer(docs, add_special_tokens=False)["input_ids"]
    eos = getattr(tokenizer, "eos_token_id", None)
    stream: list[int] = []
    for ids in ids_per_doc:
        if not ids:
            continue
        if stream and eos is not None:
            stream.append(int(eos))
        stream.extend(int(t) for t in ids)
    return stream


class BlockDataset(Dataset):
    """Fixed-length causal-LM blocks; labels equal input_ids (the model shifts them)."""

    def __init__(self, blocks: torch.Tensor) -> None:
        """Hold a [num_blocks, max_length] int64 tensor."""
        self.blocks = blocks

    def __len__(self) -> int:
        """Number of blocks."""
        return self.blocks.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        """Block i as {'input_ids', 'labels'}."""
        return {"input_ids": self.blocks[i], "labels": self.blocks[i].clone()}


def _build_text(arg: str, tokenizer: Any, max_length: int) -> tuple[BlockDataset, int]:
    """Tokenize the file into one stream and cut it into blocks of max_length tokens."""
    if tokenizer is None:
        raise TrainingError("text data needs a tokenizer; use a causal-LM model whose tokenizer can be loaded")
    if max_length < 1:
        raise TrainingError(f"max_length is {max_length}; it must be a positive number of tokens")
    path = Path(arg).expanduser()
    stream = tokenize_documents(read_documents(path), tokenizer)
    n_blocks = len(stream) // max_length
    if n_blocks < 2:
        raise TrainingError(
            f"text file {path} has {len(stream)} tokens, too short for 2 blocks of max_length={max_length}; "
            "add more text or lower --max-length"
        )
    blocks = torch.tensor(stream[: n_blocks * max_length], dtype=torch.int64).view(n_blocks, max_length)
    return BlockDataset(blocks), len(stream)


def build_data(spec: str, *, image_size: tuple[int, int] = (224, 224), in_chans: int = 3,
               mean: tuple[float, ...] = (0.5,), std: tuple[float, ...] = (0.5,),
               tokenizer: Any = None, max_length: int = 128, eval_fraction: float = 0.2,
               seed: int = 0) -> DataBundle:
    """Build the train/eval datasets a spec names, split deterministically by seed."""
    kind, arg = parse_data_spec(spec)
    if kind == "text":
        dataset, n_tokens = _build_text(arg, tokenizer, max_length)
        train_idx, eval_idx = split_indices(len(dataset), eval_fraction, seed)
        desc = (f"text {arg}: {n_tokens} tokens in {len(dataset)} blocks of {max_length} "
                f"({len(train_idx)} train / {len(eval_idx)} eval)")
        return DataBundle(Subset(dataset, train_idx), Subset(dataset, eval_idx), "causal-lm", None, None, desc)
    if in_chans < 1:
        raise TrainingError(f"in_chans is {in_chans}; it must be at least 1")
    m, s = _normalize_stats(tuple(mean), in_chans, "mean"), _normalize_stats(tuple(std), in_chans, "std")
    if kind == "digits":
        dataset, labels, classes = _build_digits(arg, image_size, in_chans, m, s)
        name = f"digits {arg or '0-9'}"
    else:
        dataset, labels, classes = _build_imagefolder(arg, image_size, in_chans, m, s)
        name = f"imagefolder {arg} ({len(classes)} classes)"
    train_idx, eval_idx = split_indices(len(labels), eval_fraction, seed, labels)
    desc = (f"{name}: {len(labels)} images ({len(train_idx)} train / {len(eval_idx)} eval), "
            f"{image_size[0]}x{image_size[1]}x{in_chans}")
    return DataBundle(Subset(dataset, train_idx), Subset(dataset, eval_idx), "classification",
                      len(classes), classes, desc)


def collate(batch: list[Any]) -> dict[str, torch.Tensor] | tuple[torch.Tensor, ...]:
    """DataLoader collate_fn: stack (image, label) tuples or dicts of tensors field by field."""
    if not batch:
        raise TrainingError("collate got an empty batch; check that the dataset is not empty")
    first = batch[0]
    if isinstance(first, dict):
        return {key: torch.stack([item[key] for item in batch]) for key in first}
    if isinstance(first, (tuple, list)):
        return tuple(torch.stack([item[i] for item in batch]) for i in range(len(first)))
    raise TrainingError(f"collate cannot batch items of type {type(first).__name__}; expected a tuple or dict")
