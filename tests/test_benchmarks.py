"""benchmarks/optimizers.py: the state-bytes part of its --quick run (the ViT-B/16 block, rank 128).

Pins that our optimizers keep exactly the state their formulas promise, no more than the references
(galore-torch counted with its projector's basis, flora-opt), and that GaLore keeps less than AdamW.
No timing is asserted (STYLE.md); the benchmark script itself only reports ratios. One thread, as
every test (conftest), so the few full SVDs stay fast on a busy machine.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "optimizers.py"


@pytest.fixture(scope="module")
def bench():
    """The benchmark script imported from its path (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location("lrsurgery_benchmark_optimizers", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their string annotations through sys.modules
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def test_quick_state_bytes_equal_formulas_and_do_not_exceed_references_or_adamw(bench):
    refs = bench.load_references()
    if refs.missing:
        pytest.skip(f"reference optimizers not installed: {'; '.join(refs.missing)}")
    shapes = bench.block_shapes({"vit_b16": bench.BLOCKS["vit_b16"]})  # what --quick measures
    rows = bench.state_bytes_table(shapes, rank=128, refs=refs)
    assert [r["weight"] for r in rows] == list(shapes)
    for r in rows:
        assert r["galore_ours"] == r["galore_formula"], r
        assert r["flora_ours"] == r["flora_formula"], r
        assert r["galore_ours"] <= r["galore_ref"], r
        assert r["flora_ours"] <= r["flora_ref"], r
        assert r["galore_ours"] < r["adamw"], r
    # both GaLore sides are exercised: fc2 (768×3072) is wide, so std projects it from the left
    assert {r["side"] for r in rows} == {"left", "right"}
