"""Combining adapters: cat is the exact weighted sum, SVD modes report what they drop, bases must match.

Every expected value is computed here independently of ``lrsurgery.ops.combine``: dense updates
s·B·A in float64 (s derived from alpha and rank, not read back), singular values with
``torch.linalg.svdvals``, and model outputs of a base whose weights were changed by hand.
Measured values are printed (``pytest -s``) and recorded as junit properties.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import lrsurgery
from lrsurgery import format as fmt
from lrsurgery.cli import main
from lrsurgery.errors import BaseMismatchError, LrsurgeryError, OutputExistsError
from lrsurgery.ops.combine import combine, combine_files
from lrsurgery.ops.merge import merge_into_model

QKV = [f"blocks.{i}.attn.qkv" for i in range(2)]
FC2 = [f"blocks.{i}.mlp.fc2" for i in range(2)]
_BASES: dict[str, nn.Module] = {}


# --- helpers ---------------------------------------------------------------------------------------------

def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def base(ref: str | Path) -> nn.Module:
    """A fresh copy of the model at ``ref`` (loaded once per session of this module)."""
    ref = str(ref)
    if ref not in _BASES:
        _BASES[ref] = lrsurgery.load_model(ref)
    return copy.deepcopy(_BASES[ref])


@torch.no_grad()
def make_adapter(ref: str | Path, targets, rank: int, alpha: float, seed: int, *, rslora: bool = False,
                 dtype: torch.dtype | None = None, train: list[str] | None = None, bias: bool = False) -> fmt.Adapter:
    """LoRA on ``targets`` with random A and B (and Δb with ``bias``), plus perturbed ``train`` modules."""
    model = base(ref)
    lrsurgery.inject(model, rank=rank, alpha=alpha, targets=targets, rslora=rslora, adapter_dtype=dtype,
                     train=train)
    g = gen(seed)
    for _, layer in sorted(lrsurgery.lora_modules(model).items()):
        layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g) * 0.2)
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.2)
        if bias:
            layer.add_bias_delta(torch.randn(layer.out_features, generator=g) * 0.1)
    for name in train or []:
        for p in model.get_submodule(name).parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return lrsurgery.adapter_from_model(model)


def scaling(alpha: float, rank: int, rslora: bool) -> float:
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def dense(adapter: fmt.Adapter, name: str, s: float | None = None) -> torch.Tensor:
    """s·B·A in float64, (out, in); zero where the adapter lacks the module."""
    entry = adapter.modules.get(name)
    if entry is None:
        return torch.zeros(0)
    a, b = adapter.tensors[f"{name}.lora_A"].double(), adapter.tensors[f"{name}.lora_B"].double()
    return (entry["scaling"] if s is None else s) * (b @ a)


def weighted_sum(adapters: list[fmt.Adapter], weights: list[float], name: str) -> torch.Tensor:
    parts = [w * dense(a, name) for a, w in zip(adapters, weights) if name in a.modules]
    return torch.stack(parts).sum(0)


def fro(x: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(x.double(), ord="fro"))


def lora_names(adapter: fmt.Adapter) -> list[str]:
    return [n for n, e in adapter.modules.items() if e["kind"] == "lora"]


def record(record_property, key: str, value: float) -> None:
    record_property(key, value)
    print(f"\n[combine] {key} = {value:.3e}")


# --- one adapter, weight 1: every mode gives it back -------------------------------------------------------

@pytest.mark.parametrize("mode,rank", [("cat", None), ("mean", None), ("linear", None), ("svd", 4)])
def test_one_adapter_with_weight_one_is_reproduced(record_property, vit_dir: Path, mode: str, rank) -> None:
    src = make_adapter(vit_dir, QKV + FC2, rank=4, alpha=8, seed=1, rslora=True, bias=True)
    out, result = combine([src], [1.0], mode, rank)
    worst = 0.0
    for name in lora_names(src):
        e = out.modules[name]
        assert e["rank"] == 4 and e["scaling"] == 1.0 and e["alpha"] == 4.0 and e["rslora"] is False
        assert e["base_tensors"] == src.modules[name]["base_tensors"]
        expected = dense(src, name, scaling(8, 4, True))  # rsLoRA: s = 8/√4 = 4, not 8/4
        rel = fro(dense(out, name) - expected) / fro(expected)
        worst = max(worst, rel)
        assert torch.equal(out.tensors[f"{name}.lora_bias"], src.tensors[f"{name}.lora_bias"])
    record(record_property, f"one_adapter_{mode}_max_rel_err", worst)
    assert worst <= (1e-7 if result.exact else 1e-6)
    assert result.exact == (mode in ("cat", "mean"))
    assert all(m.energy == pytest.approx(1.0, abs=1e-12) for m in result.modules)


# --- cat is the dense weighted sum -----------------------------------------------------------------------

def test_cat_equals_the_dense_weighted_sum_exactly(record_property, vit_dir: Path) -> None:
    f64 = torch.float64
    inputs = [make_adapter(vit_dir, QKV + FC2, rank=2, alpha=4, seed=1, dtype=f64),
              make_adapter(vit_dir, QKV + FC2, rank=4, alpha=16, seed=2, dtype=f64, rslora=True),
              make_adapter(vit_dir, QKV, rank=3, alpha=3, seed=3, dtype=f64)]    # no fc2: ΔW_3 = 0 there
    weights = [0.7, -1.3, 2.0]
    out, result = combine(inputs, weights, "cat")
    assert out.meta["method"] == "lora" and out.meta["base"] == inputs[0].meta["base"]
    assert [m.name for m in result.modules] == sorted(QKV + FC2)   # the model's order
    worst = 0.0
    for name in QKV + FC2:
        present = [(a, w, r, al, rs) for a, w, r, al, rs in
                   zip(inputs, weights, (2, 4, 3), (4, 16, 3), (False, True, False)) if name in a.modules]
        expected = sum(w * dense(a, name, scaling(al, r, rs)) for a, w, r, al, rs in present)
        assert out.modules[name]["rank"] == sum(p[2] for p in present)   # 9 on qkv, 6 on fc2
        assert out.tensors[f"{name}.lora_A"].dtype == f64
        diff = float((dense(out, name) - expected).abs().max())
        worst = max(worst, diff / float(expected.abs().max()))
    record(record_property, "cat_fp64_max_rel_err", worst)
    assert worst <= 1e-14
    assert {m.name: m.input_ranks for m in result.modules} == {**dict.fromkeys(QKV, [2, 4, 3]),
                                                               **dict.fromkeys(FC2, [2, 4, None])}


@pytest.mark.parametrize("fam", ["vit", "gpt2"])
def test_merged_combination_matches_the_model_changed_by_the_dense_sum(record_property, vit_dir: Path,
                                                                        gpt2_dir: Path, fam: str) -> None:
    """Different ranks, rsLoRA, Conv1D (GPT-2 stores W as [in, out]): merge the combination into the base."""
    ref, inputs_ = (vit_dir, torch.randn(3, 3, 16, 16, generator=gen(7))) if fam == "vit" else \
        (gpt2_dir, {"input_ids": torch.randint(0, 128, (2, 10), generator=gen(7))})
    targets = (QKV + FC2, QKV) if fam == "vit" else (["c_attn", "c_fc"], ["c_attn", "c_proj"])
    inputs = [make_adapter(ref, targets[0], rank=2, alpha=4, seed=4),
              make_adapter(ref, targets[1], rank=8, alpha=8, seed=5, rslora=True)]
    weights = [0.6, 1.5]
    out, _ = combine(inputs, weights, "cat")
    if fam == "gpt2":
        assert all(e["fan_in_fan_out"] for e in out.modules.values())

    def run(model: nn.Module) -> torch.Tensor:
        with torch.no_grad():
            y = model(**inputs_) if isinstance(inputs_, dict) else model(inputs_)
        return y if isinstance(y, torch.Tensor) else y.logits

    reference = base(ref)
    with torch.no_grad():
        for name in out.modules:
            w = reference.get_submodule(name).weight
            delta = sum(wt * dense(a, name, scaling(al, r, rs)) for a, wt, r, al, rs in
                        zip(inputs, weights, (2, 8), (4, 8), (False, True)) if name in a.modules)
            w.copy_((w.double() + (delta.T if fam == "gpt2" else delta)).float())   # Conv1D: W is [in, out]
    expected, before = run(reference), run(base(ref))
    got = run(merge_into_model(base(ref), out))
    diff = float((got - expected).abs().max())
    record(record_property, f"merged_{fam}_max_abs_diff", diff)
    assert float((expected - before).abs().max()) > 1e-2   # the combination does change the outputs
    assert diff <= 1e-5


# --- SVD modes --------------------------------------------------------------------------------------------

def test_linear_is_exact_when_the_sum_is_rank_deficient(record_property, vit_dir: Path) -> None:
    a1 = make_adapter(vit_dir, QKV, rank=4, alpha=8, seed=1)
    a2 = fmt.Adapter(dict(a1.tensors), copy.deepcopy(a1.meta))   # same A, another B: Σ ΔW has rank ≤ 4
    for name in QKV:
        a2.tensors[f"{name}.lora_B"] = torch.randn(a1.tensors[f"{name}.lora_B"].shape, generator=gen(9))
    out, result = combine([a1, a2], [0.5, 2.0], "linear")
    worst = 0.0
    for name, m in zip(QKV, result.modules):
        expected = weighted_sum([a1, a2], [0.5, 2.0], name)
        assert int(torch.linalg.matrix_rank(expected)) == 4
        assert m.rank == 4 and m.energy == pytest.approx(1.0, abs=1e-12)
        worst = max(worst, fro(dense(out, name) - expected) / fro(expected))
    record(record_property, "linear_rank_deficient_rel_err", worst)
    assert worst <= 1e-6
    # independent A's: the sum has rank 8, linear keeps 4 and says it lost something
    other = make_adapter(vit_dir, QKV, rank=4, alpha=8, seed=2)
    _, lossy = combine([a1, other], None, "linear")
    assert all(m.rank == 4 and 0.5 < m.energy < 0.99 for m in lossy.modules)


def test_retained_energy_is_one_minus_discarded_sigma_squared(record_property, vit_dir: Path) -> None:
    inputs = [make_adapter(vit_dir, QKV + FC2, rank=4, alpha=8, seed=s) for s in (1, 2)]
    weights = [1.0, 0.5]
    out, result = combine(inputs, weights, "svd", 3)
    assert out.meta["provenance"]["retained_energy"] == {m.name: round(m.energy, 6) for m in result.modules}
    for m in result.modules:
        expected = weighted_sum(inputs, weights, m.name)
        s2 = torch.linalg.svdvals(expected) ** 2
        assert int((s2 > 1e-20 * s2[0]).sum()) == 8
        energy = 1.0 - float(s2[3:].sum()) / float(s2.sum())
        assert m.rank == 3
        assert m.energy == pytest.approx(energy, abs=1e-9)
        assert m.error == pytest.approx(math.sqrt(float(s2[3:].sum())), rel=1e-9)
        residual = fro(expected - dense(out, m.name))              # Eckart–Young: the best rank-3 error
        assert residual == pytest.approx(m.error, rel=1e-5)
    record(record_property, "svd_r3_min_energy", min(m.energy for m in result.modules))
    # an energy threshold keeps the fewest σ whose σ² reach it
    _, by_energy = combine(inputs, weights, "svd", energy=0.9)
    for m in by_energy.modules:
        s2 = torch.linalg.svdvals(weighted_sum(inputs, weights, m.name)) ** 2
        cum = (torch.cumsum(s2, 0) / s2.sum()).tolist()
        k = next(i + 1 for i, c in enumerate(cum) if c >= 0.9)
        assert m.rank == k and m.energy >= 0.9 and (k == 1 or cum[k - 2] < 0.9)


def test_averaging_a_and_b_separately_is_not_the_average_update(record_property, vit_dir: Path) -> None:
    """The known pitfall: s·mean(B)·mean(A) = ¼ s (B₁A₁ + B₂A₂ + B₁A₂ + B₂A₁) ≠ ½ (ΔW₁ + ΔW₂)."""
    a1, a2 = (make_adapter(vit_dir, QKV, rank=4, alpha=8, seed=s) for s in (1, 2))
    out, _ = combine([a1, a2], None, "mean")
    name = QKV[0]
    A1, B1 = a1.tensors[f"{name}.lora_A"].double(), a1.tensors[f"{name}.lora_B"].double()
    A2, B2 = a2.tensors[f"{name}.lora_A"].double(), a2.tensors[f"{name}.lora_B"].double()
    s = scaling(8, 4, False)
    naive = s * ((B1 + B2) / 2) @ ((A1 + A2) / 2)
    correct = (s * B1 @ A1 + s * B2 @ A2) / 2
    assert torch.allclose(naive, s * (B1 @ A1 + B2 @ A2 + B1 @ A2 + B2 @ A1) / 4, atol=1e-12)  # cross terms
    naive_err = fro(naive - correct) / fro(correct)
    ours_err = fro(dense(out, name) - correct) / fro(correct)
    record(record_property, "naive_factor_average_rel_err", naive_err)
    record(record_property, "mean_rel_err", ours_err)
    assert naive_err > 0.5 and ours_err <= 1e-7


# --- mean, full modules, Δb, ReLoRA ------------------------------------------------------------------------

def test_mean_is_a_federated_average_with_heterogeneous_ranks(vit_dir: Path) -> None:
    clients = [make_adapter(vit_dir, QKV, rank=r, alpha=2 * r, seed=r, train=["head"]) for r in (2, 4, 8)]
    out, result = combine(clients, None, "mean")
    assert result.weights == pytest.approx([1 / 3] * 3)
    for name in QKV:
        assert out.modules[name]["rank"] == 14
        expected = weighted_sum(clients, [1 / 3] * 3, name)
        assert fro(dense(out, name) - expected) <= 1e-7 * fro(expected)
    for p in ("weight", "bias"):   # the head is trained in full: its tensors are averaged
        expected = sum(c.tensors[f"head.{p}"].double() for c in clients) / 3
        assert torch.allclose(out.tensors[f"head.{p}"].double(), expected, atol=1e-7)
    # sample counts as weights: scaled to sum to 1; --rank compresses by SVD
    out, result = combine(clients, [100, 300, 0], "mean", 4)
    assert result.weights == [0.25, 0.75, 0.0] and not result.exact
    for m in result.modules:
        if m.kind == "lora":
            s2 = torch.linalg.svdvals(weighted_sum(clients, [0.25, 0.75, 0.0], m.name)) ** 2
            assert m.rank == 4 and m.energy == pytest.approx(float(s2[:4].sum() / s2.sum()), abs=1e-9)
    assert torch.allclose(out.tensors["head.weight"].double(), 0.25 * clients[0].tensors["head.weight"].double()
                          + 0.75 * clients[1].tensors["head.weight"].double(), atol=1e-7)


def test_full_modules_need_weights_summing_to_one_and_every_input(vit_dir: Path) -> None:
    a1 = make_adapter(vit_dir, QKV, rank=2, alpha=2, seed=1, train=["head"])
    a2 = make_adapter(vit_dir, QKV, rank=2, alpha=2, seed=2, train=["head"])
    a3 = make_adapter(vit_dir, QKV, rank=2, alpha=2, seed=3)
    with pytest.raises(LrsurgeryError, match=r"full module 'head' .* summing to 1 \(they sum to 2\)"):
        combine([a1, a2], None, "cat")
    out, _ = combine([a1, a2], [0.25, 0.75], "cat")
    assert torch.allclose(out.tensors["head.bias"], 0.25 * a1.tensors["head.bias"] + 0.75 * a2.tensors["head.bias"])
    with pytest.raises(LrsurgeryError, match="'head' is in adapter #1 but not in adapter #2.*--drop-full"):
        combine([a1, a3], None, "mean")
    out, result = combine([a1, a3], None, "cat", drop_full=True)
    assert "head" not in out.modules and "head.weight" not in out.tensors
    assert [m.name for m in result.modules] == QKV
    # a replacement of a tensor another input adds a LoRA update to has no combined meaning
    lora_head = make_adapter(vit_dir, ["head"], rank=2, alpha=2, seed=4)
    with pytest.raises(LrsurgeryError, match="replaces .head.weight.*adds an update"):
        combine([a1, lora_head], [0.5, 0.5], "cat")
    # --drop-full keeps the other input's update on that module, whatever the input order
    for order in ([a1, lora_head], [lora_head, a1]):
        out, _ = combine(order, [0.5, 0.5], "cat", drop_full=True)
        assert out.modules["head"]["kind"] == "lora" and "head.weight" not in out.tensors
        assert torch.allclose(dense(out, "head"), 0.5 * dense(lora_head, "head"), atol=1e-7)


def test_lora_bias_combines_as_the_weighted_sum(vit_dir: Path) -> None:
    with_bias = make_adapter(vit_dir, QKV, rank=2, alpha=4, seed=1, bias=True)
    without = make_adapter(vit_dir, QKV + FC2, rank=2, alpha=4, seed=2)
    out, _ = combine([with_bias, without], [1.5, 0.5], "svd", 2)
    for name in QKV:
        assert out.modules[name]["bias"] is True
        assert torch.allclose(out.tensors[f"{name}.lora_bias"], 1.5 * with_bias.tensors[f"{name}.lora_bias"],
                              atol=1e-7)
    assert all("bias" not in out.modules[n] for n in FC2)


def test_relora_adapter_loses_folded_rank_but_keeps_its_update(vit_dir: Path) -> None:
    model = base(vit_dir)
    lrsurgery.inject(model, rank=2, alpha=4, targets=QKV)
    with torch.no_grad():
        for i, (_, layer) in enumerate(sorted(lrsurgery.lora_modules(model).items())):
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen(i)))
            layer.fold()                                      # a ReLoRA restart: ΔW goes into W
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen(10 + i)))
    src = lrsurgery.adapter_from_model(model)
    assert all(src.modules[n]["folded_rank"] == 2 and src.modules[n]["rank"] == 4 for n in QKV)
    out, _ = combine([src], None, "cat")
    for name in QKV:
        assert "folded_rank" not in out.modules[name] and out.modules[name]["rank"] == 4
        expected = dense(src, name)
        assert fro(dense(out, name) - expected) <= 1e-7 * fro(expected)


def dense_twin(adapter: fmt.Adapter, names: list[str]) -> fmt.Adapter:
    """The same updates as dense ``delta`` entries (what an LTE run writes), ΔW stored as the base stores W."""
    tensors, modules = {}, {}
    for name in names:
        e = adapter.modules[name]
        delta = dense(adapter, name).float()
        tensors[f"{name}.delta"] = delta.T.contiguous() if e["fan_in_fan_out"] else delta
        modules[name] = {"kind": "delta", **{k: e[k] for k in ("in_features", "out_features", "fan_in_fan_out",
                                                                "dtype", "base_tensors")}}
    twin = fmt.Adapter(tensors, {**copy.deepcopy(adapter.meta), "modules": modules, "method": "lte"})
    fmt.validate(twin.tensors, twin.meta)
    return twin


@pytest.mark.skipif("delta" not in fmt.KINDS, reason="this format has no dense delta entries")
def test_dense_delta_entries_add_to_the_sum(gpt2_dir: Path) -> None:
    names = [f"transformer.h.{i}.attn.c_attn" for i in range(2)]
    lora = make_adapter(gpt2_dir, ["c_attn"], rank=2, alpha=4, seed=1)
    dense_in = dense_twin(make_adapter(gpt2_dir, ["c_attn"], rank=3, alpha=3, seed=2), names)
    out, result = combine([lora, dense_in], [2.0, -0.5], "cat")     # exact: the sum is kept dense
    for name, m in zip(names, result.modules):
        assert m.kind == "delta" and m.input_ranks == [2, "dense"] and out.modules[name]["fan_in_fan_out"]
        expected = 2.0 * dense(lora, name) - 0.5 * dense_in.tensors[f"{name}.delta"].double().T
        got = out.tensors[f"{name}.delta"].double()
        assert got.shape == (32, 96)                                   # Conv1D: stored [in, out]
        assert fro(got.T - expected) <= 1e-6 * fro(expected)
    out, result = combine([lora, dense_in], [2.0, -0.5], "linear")     # SVD: back to LoRA, rank max(2) = 2
    for name, m in zip(names, result.modules):
        expected = 2.0 * dense(lora, name) - 0.5 * dense_in.tensors[f"{name}.delta"].double().T
        s2 = torch.linalg.svdvals(expected) ** 2
        assert m.kind == "lora" and m.rank == 2
        assert m.energy == pytest.approx(float(s2[:2].sum() / s2.sum()), abs=1e-6)
        assert fro(dense(out, name) - expected) == pytest.approx(math.sqrt(float(s2[2:].sum())), rel=1e-4)
    with pytest.raises(LrsurgeryError, match="only dense .* give --rank R"):
        combine([dense_in], None, "linear")


def test_parents_must_agree_and_are_kept(vit_dir: Path) -> None:
    a1, a2 = (make_adapter(vit_dir, QKV, rank=2, alpha=2, seed=s) for s in (1, 2))
    parent = {"id": "ab" * 32, "name": "p.safetensors", "method": "lora"}
    a1.meta["parents"] = [parent]
    with pytest.raises(BaseMismatchError, match=r"on top of \[abababababab\] vs no parent adapters"):
        combine([a1, a2])
    a2.meta["parents"] = [dict(parent)]
    out, _ = combine([a1, a2])
    assert out.meta["parents"] == [parent]


def test_inputs_without_a_shared_module_and_other_refs_warn(vit_dir: Path, vit_other_dir: Path) -> None:
    a1 = make_adapter(vit_dir, QKV, rank=2, alpha=2, seed=1)
    a2 = make_adapter(vit_other_dir, FC2, rank=2, alpha=2, seed=2)
    with pytest.warns(UserWarning, match="share no module whose base hash could be compared"):
        out, _ = combine([a1, a2])
    assert set(out.modules) == set(QKV + FC2)


# --- errors -----------------------------------------------------------------------------------------------

def test_different_bases_are_refused_naming_both_files_and_a_module(tmp_path: Path, vit_dir: Path,
                                                                    vit_other_dir: Path) -> None:
    p1 = fmt.write(tmp_path / "a.safetensors", make_adapter(vit_dir, QKV, rank=2, alpha=2, seed=1))
    p2 = fmt.write(tmp_path / "b.safetensors", make_adapter(vit_other_dir, QKV, rank=2, alpha=2, seed=1))
    with pytest.raises(BaseMismatchError, match=rf"{p1} and {p2} were made on different base weights: "
                                                rf"module 'blocks.0.attn.qkv'"):
        combine([p1, p2])
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("kwargs,message", [
    (dict(mode="svd"), "mode svd needs exactly one of --rank R or --energy E"),
    (dict(mode="svd", rank=2, energy=0.9), "mode svd needs exactly one"),
    (dict(weights=[1.0]), "1 weights for 2 adapters; give exactly one weight per adapter"),
    (dict(weights=[1.0, 2.0, 3.0]), "3 weights for 2 adapters"),
    (dict(weights=[float("nan"), 1.0]), "weight nan is not a finite number"),
    (dict(weights=[1.0, float("inf")]), "weight inf is not a finite number"),
    (dict(mode="cat", rank=2), "mode cat is exact"),
    (dict(mode="linear", energy=0.9), "for an energy threshold use --mode svd"),
    (dict(mode="mean", weights=[-1.0, 2.0]), "mode mean averages"),
    (dict(mode="svd", rank=0), "--rank must be ≥ 1"),
    (dict(mode="svd", energy=1.5), r"--energy must be in \(0, 1\]"),
    (dict(mode="ties"), "unknown combine mode 'ties'"),
])
def test_bad_arguments_are_refused(vit_dir: Path, kwargs: dict, message: str) -> None:
    a = make_adapter(vit_dir, QKV, rank=2, alpha=2, seed=1)
    mode, rank = kwargs.pop("mode", "cat"), kwargs.pop("rank", None)
    with pytest.raises(LrsurgeryError, match=message):
        combine([a, a], kwargs.pop("weights", None), mode, rank, **kwargs)


def test_arguments_are_checked_before_any_file_is_read(tmp_path: Path) -> None:
    missing = [tmp_path / "nope1.safetensors", tmp_path / "nope2.safetensors"]
    with pytest.raises(LrsurgeryError, match="mode svd needs exactly one"):
        combine(missing, None, "svd")
    with pytest.raises(LrsurgeryError, match="3 weights for 2 adapters"):
        combine(missing, [1, 2, 3])
    with pytest.raises(LrsurgeryError, match="give at least one adapter"):
        combine([])


def test_combine_files_writes_provenance_and_never_overwrites(tmp_path: Path, vit_dir: Path) -> None:
    p1 = fmt.write(tmp_path / "a.safetensors", make_adapter(vit_dir, QKV, rank=2, alpha=2, seed=1))
    p2 = fmt.write(tmp_path / "b.safetensors", make_adapter(vit_dir, FC2, rank=4, alpha=4, seed=2))
    out = tmp_path / "ab.safetensors"
    result = combine_files([p1, p2], out, weights=[1.0, 0.5], mode="linear")
    assert result.path == out
    written = fmt.read(out)
    prov = written.meta["provenance"]
    assert prov["mode"] == "linear" and prov["weights"] == [1.0, 0.5] and prov["method"] == "combine"
    assert prov["inputs"] == [{"path": str(p1), "sha256": fmt.file_sha256(p1)},
                              {"path": str(p2), "sha256": fmt.file_sha256(p2)}]
    assert set(prov["retained_energy"]) == set(QKV + FC2)
    assert {n: e["rank"] for n, e in written.modules.items()} == {**dict.fromkeys(QKV, 2), **dict.fromkeys(FC2, 4)}
    with pytest.raises(OutputExistsError, match="--force"):
        combine_files([p1, p2], out)
    combine_files([p1, p2], out, force=True)
    assert fmt.read(out).meta["provenance"]["mode"] == "cat"


# --- CLI --------------------------------------------------------------------------------------------------

def cli(*args) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def test_cli_combine_json_table_and_errors(tmp_path: Path, vit_dir: Path, vit_other_dir: Path) -> None:
    inputs = [make_adapter(vit_dir, QKV, rank=4, alpha=8, seed=s) for s in (1, 2)]
    p1, p2 = (fmt.write(tmp_path / f"{k}.safetensors", a) for k, a in zip("ab", inputs))
    out = tmp_path / "svd.safetensors"
    code, stdout, err = cli("combine", p1, p2, "--mode", "svd", "--rank", "3", "--weights=-1,2", "-o", out, "--json")
    assert code == 0, err
    info = json.loads(stdout)
    assert info["adapter"] == str(out) and info["weights"] == [-1.0, 2.0] and info["exact"] is False
    _, api = combine(inputs, [-1.0, 2.0], "svd", 3)
    for row, m in zip(info["modules"], api.modules):
        assert row["name"] == m.name and row["rank"] == 3 and row["input_ranks"] == [4, 4]
        assert row["energy"] == pytest.approx(m.energy, abs=1e-12)
    code, stdout, err = cli("combine", p1, p2, "-o", tmp_path / "cat.safetensors")
    assert code == 0, err
    assert "combine (cat, weights 1, 1)" in stdout and "4 + 4" in stdout and "exact" in stdout
    assert fmt.read(tmp_path / "cat.safetensors").modules[QKV[0]]["rank"] == 8

    code, _, err = cli("combine", p1, p2, "-o", out)                      # exists
    assert code == 1 and err.strip() == f"error: {out} exists; pass --force to overwrite it"
    code, _, err = cli("combine", p1, p2, "--mode", "svd", "-o", tmp_path / "x.safetensors")
    assert code == 1 and err.startswith("error: mode svd needs exactly one of --rank R or --energy E")
    code, _, err = cli("combine", p1, p2, "--weights", "1,nan", "-o", tmp_path / "x.safetensors")
    assert code == 1 and err.startswith("error: weight nan is not a finite number")
    code, _, err = cli("combine", p1, p2, "--weights", "1,x", "-o", tmp_path / "x.safetensors")
    assert code == 2 and "is not a comma-separated list of numbers" in err
    p3 = fmt.write(tmp_path / "c.safetensors", make_adapter(vit_other_dir, QKV, rank=4, alpha=8, seed=1))
    code, _, err = cli("combine", p1, p3, "-o", tmp_path / "x.safetensors")
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert f"{p1} and {p3} were made on different base weights: module 'blocks.0.attn.qkv'" in err
    assert not (tmp_path / "x.safetensors").exists()
