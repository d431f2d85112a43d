"""`lrsurgery plot`: curves from metrics.jsonl to a PNG; clear errors for missing or corrupt logs."""

from __future__ import annotations

import json

import pytest

from lrsurgery.errors import LrsurgeryError
from lrsurgery.train.plot import plot_run, read_metrics


def write_metrics(run_dir, records):
    run_dir.mkdir(exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_plot_writes_a_png_with_all_panels(tmp_path):
    records = [{"step": s, "epoch": 1, "loss": 2.0 / s, "lr": 1e-3 * min(1, s / 3)} for s in range(1, 11)]
    records[5]["restart"] = 1
    records.append({"step": 10, "epoch": 1, "eval_loss": 0.4, "eval_accuracy": 0.9})
    write_metrics(tmp_path, records)
    out = plot_run(tmp_path)
    assert out == tmp_path / "curves.png"
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    width = int.from_bytes(data[16:20], "big")
    assert width > 1200  # three panels side by side


def test_plot_errors(tmp_path):
    with pytest.raises(LrsurgeryError, match="train the run first"):
        plot_run(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\nnot json\n')
    with pytest.raises(LrsurgeryError, match="line 2"):
        read_metrics(tmp_path / "metrics.jsonl")
    write_metrics(tmp_path, [{"step": 1, "eval_loss": 1.0}])
    with pytest.raises(LrsurgeryError, match="no training steps"):
        plot_run(tmp_path)
