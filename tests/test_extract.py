"""SVD extraction: Eckart–Young error, rank/energy choice, Conv1D orientation, full modules, files, runs.

Every expected number is computed independently of ``lrsurgery.ops.extract``: singular values with
``torch.linalg.svdvals`` in float64, residuals as explicit Frobenius norms. Measured values are
printed (``pytest -s``) and recorded as junit properties.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

import lrsurgery
from lrsurgery import format as fmt
from lrsurgery.errors import LrsurgeryError, OutputExistsError
from lrsurgery.ops.extract import choose_rank, extract_from_run, extract_models, extract_svd, svd_factors

VIT_PRESET = [f"blocks.{i}.{m}" for i in range(2) for m in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]


# --- tiny models, built once for this module -------------------------------------------------------------


@pytest.fixture(scope="module")
def ex_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("extract")


# --- helpers ---------------------------------------------------------------------------------------------

def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def low_rank(out_f: int, in_f: int, k: int, g: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    """A float64 matrix of rank exactly k (almost surely), entries of order ``scale``."""
    return (torch.randn(out_f, k, generator=g, dtype=torch.float64)
            @ torch.randn(k, in_f, generator=g, dtype=torch.float64)) * (scale / math.sqrt(k))


def fro(x: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(x.detach().double(), ord="fro"))


def discarded(delta: torch.Tensor, k: int) -> float:
    """sqrt(Σ_{i>k} σ_i²) of ``delta``, independently of lrsurgery."""
    s = torch.linalg.svdvals(delta.detach().double())
    return math.sqrt(float((s[k:] ** 2).sum()))


def manual_rank(s: torch.Tensor, energy: float) -> int:
    """Smallest k with Σ_{i≤k} σ_i² / Σ σ_i² ≥ energy, by an explicit cumulative sum."""
    e = s.double() ** 2
    cum = torch.cumsum(e, 0) / e.sum()
    for k in range(1, len(cum) + 1):
        if float(cum[k - 1]) >= energy:
            return k
    raise AssertionError("energy never reached")


def adapter_delta(adapter: fmt.Adapter, name: str) -> torch.Tensor:
    """scaling · B A in float64, in (out, in) orientation."""
    entry = adapter.modules[name]
    a, b = adapter.tensors[f"{name}.lora_A"].double(), adapter.tensors[f"{name}.lora_B"].double()
    return entry["scaling"] * (b @ a)


@torch.no_grad()
def perturb(model: nn.Module, names: list[str], k: int, seed: int, scale: float, noise: float,
            transpose: bool = False) -> None:
    """W += rank-k change (+ dense noise), in (out, in) orientation (transposed for Conv1D)."""
    g = gen(seed)
    for name in names:
        w = model.get_submodule(name).weight
        out_f, in_f = (w.shape[1], w.shape[0]) if transpose else tuple(w.shape)
        delta = low_rank(out_f, in_f, k, g, scale) + noise * torch.randn(out_f, in_f, generator=g, dtype=torch.float64)
        w.copy_((w.double() + (delta.T if transpose else delta)).float())


def vit_input(n: int = 4, seed: int = 5) -> torch.Tensor:
    return torch.randn(n, 1, 16, 16, generator=gen(seed))


def record(record_property, key: str, value: float) -> None:
    record_property(key, value)
    print(f"\n[extract] {key} = {value:.3e}")


# --- svd_factors on plain matrices -----------------------------------------------------------------------

@pytest.mark.parametrize("k", [1, 3, 8, 20])
def test_svd_factors_error_is_the_discarded_energy(record_property, k: int) -> None:
    g = gen(k)
    delta = low_rank(48, 32, 6, g) + 0.05 * torch.randn(48, 32, generator=g, dtype=torch.float64)
    a, b, kk, kept, err = svd_factors(delta, k, None)
    assert kk == k
    assert a.shape == (k, 32) and b.shape == (48, k)
    assert a.dtype == b.dtype == torch.float32

    s = torch.linalg.svdvals(delta)
    expected = math.sqrt(float((s[k:] ** 2).sum()))
    residual = fro(delta - b.double() @ a.double())
    assert expected > 0.1  # the noise makes the discarded part non-trivial
    assert abs(err - expected) <= 1e-5 * expected
    assert abs(residual - expected) <= 1e-5 * expected
    assert kept == pytest.approx(float((s[:k] ** 2).sum() / (s ** 2).sum()), rel=1e-12)
    record(record_property, f"svd_rel_err_k{k}", abs(residual - expected) / expected)


def test_svd_factors_is_exact_for_a_rank_k_change(record_property) -> None:
    delta = low_rank(40, 24, 4, gen(11))
    assert int(torch.linalg.matrix_rank(delta)) == 4
    a, b, k, kept, err = svd_factors(delta, 4, None)
    rel = fro(delta - b.double() @ a.double()) / fro(delta)
    record(record_property, "rank4_exact_rel_residual", rel)
    assert k == 4
    assert rel <= 1e-6           # float32 factors: only rounding remains
    assert err <= 1e-10 * fro(delta)
    assert kept == pytest.approx(1.0, abs=1e-12)
    # energy 1.0 keeps exactly the 4 non-zero directions, not the numerically-zero tail
    assert svd_factors(delta, None, 1.0)[2] == 4


# --- choose_rank -----------------------------------------------------------------------------------------

def test_energy_rank_matches_manual_cumsum_on_exact_boundaries() -> None:
    # σ² = 9, 4, 1, 1, 1 of 16: cumulative fractions .5625 .8125 .875 .9375 1 are exact binary fractions
    s = torch.tensor([3.0, 2.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    assert choose_rank(s, None, 0.5625) == 1       # boundary: retained == E counts as enough
    assert choose_rank(s, None, 0.8125) == 2
    assert choose_rank(s, None, 0.8125 + 1e-9) == 3
    assert choose_rank(s, None, 0.8125 - 1e-9) == 2
    assert choose_rank(s, None, 0.875) == 3
    assert choose_rank(s, None, 0.9375) == 4
    assert choose_rank(s, None, 1.0) == 5
    assert choose_rank(s, None, 1e-6) == 1
    for i in range(1, 65):  # every multiple of 1/64, which includes every boundary above
        e = i / 64
        assert choose_rank(s, None, e) == manual_rank(s, e), e
        assert choose_rank(s.float(), None, e) == manual_rank(s, e), e


def test_energy_rank_matches_manual_cumsum_on_a_random_spectrum() -> None:
    g = gen(3)
    delta = torch.randn(30, 20, generator=g, dtype=torch.float64) @ torch.diag(
        torch.logspace(0, -2, 20, dtype=torch.float64))
    s = torch.linalg.svdvals(delta)
    cum = (torch.cumsum(s ** 2, 0) / (s ** 2).sum()).tolist()
    # midpoints between consecutive cumulative fractions: far from any rounding-sensitive boundary
    energies = [cum[0] / 2] + [(lo + hi) / 2 for lo, hi in zip(cum, cum[1:])]
    seen = set()
    for e in energies:
        k = manual_rank(s, e)
        seen.add(k)
        assert choose_rank(s, None, e) == k
        a, b, kk, kept, err = svd_factors(delta, None, e)
        assert kk == k and a.shape[0] == k
        assert kept >= e and (k == 1 or float(cum[k - 2]) < e)
    assert seen == set(range(1, 21))


def test_fixed_rank_is_capped_at_the_matrix_rank() -> None:
    s = torch.ones(5)
    assert choose_rank(s, 3, None) == 3
    assert choose_rank(s, 50, None) == 5
    assert svd_factors(torch.randn(6, 4, generator=gen(0)), 10, None)[2] == 4


@pytest.mark.parametrize("rank,energy", [(2, 0.5), (None, None), (0, None), (-1, None),
                                         (None, 0.0), (None, 1.5), (None, -0.2)])
def test_choose_rank_rejects_bad_arguments(rank, energy) -> None:
    with pytest.raises(LrsurgeryError):
        choose_rank(torch.ones(4), rank, energy)
    with pytest.raises(LrsurgeryError):
        svd_factors(torch.ones(4, 3), rank, energy)


def test_extract_models_validates_rank_before_loading_anything(tmp_path: Path) -> None:
    # the refs do not exist: the argument error must come first, not ModelNotFoundError
    with pytest.raises(LrsurgeryError, match="--rank"):
        extract_models("/nonexistent/base", "/nonexistent/tuned", tmp_path / "a.safetensors", rank=0)
    with pytest.raises(LrsurgeryError, match="exactly one"):
        extract_models("/nonexistent/base", "/nonexistent/tuned", tmp_path / "a.safetensors")
    assert not (tmp_path / "a.safetensors").exists()


# --- extract_svd on a ViT --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def vit_pair(digits_vit_dir: Path):
    """(base, tuned): tuned = base + rank-3 change + dense noise on the 8 preset layers, and a new head."""
    base = lrsurgery.load_model(str(digits_vit_dir))
    tuned = lrsurgery.load_model(str(digits_vit_dir))
    perturb(tuned, VIT_PRESET, k=3, seed=21, scale=0.05, noise=0.01)
    with torch.no_grad():
        g = gen(22)
        tuned.head.weight.add_(0.1 * torch.randn(tuned.head.weight.shape, generator=g))
        tuned.head.bias.add_(0.1 * torch.randn(tuned.head.bias.shape, generator=g))
    return base, tuned


def test_extract_svd_error_per_module_is_the_discarded_energy(vit_pair, record_property) -> None:
    base, tuned = vit_pair
    adapter, stats = extract_svd(base, tuned, rank=3)
    fmt.validate(adapter.tensors, adapter.meta)
    assert [s.name for s in stats] == VIT_PRESET
    worst = 0.0
    for st in stats:
        b_w = base.get_submodule(st.name).weight.double()
        delta = tuned.get_submodule(st.name).weight.double() - b_w
        expected = discarded(delta, 3)
        residual = fro(delta - adapter_delta(adapter, st.name))
        assert expected > 0.05 * fro(delta)  # the noise is a real part of the change
        assert abs(residual - expected) <= 1e-5 * expected, st.name
        assert abs(st.error - expected) <= 1e-5 * expected, st.name
        assert st.rank == 3 and st.full_rank == min(delta.shape)
        entry = adapter.modules[st.name]
        assert entry["kind"] == "lora" and entry["rank"] == 3 and entry["scaling"] == 1.0
        assert entry["fan_in_fan_out"] is False
        assert (entry["out_features"], entry["in_features"]) == tuple(delta.shape)
        assert entry["base_tensors"]["weight"]["sha256"] == fmt.tensor_sha256(base.get_submodule(st.name).weight)
        worst = max(worst, abs(residual - expected) / expected)
    record(record_property, "vit_extract_worst_rel_err", worst)


def test_extract_svd_is_exact_for_a_rank_k_change(digits_vit_dir: Path, record_property) -> None:
    base = lrsurgery.load_model(str(digits_vit_dir))
    tuned = lrsurgery.load_model(str(digits_vit_dir))
    perturb(tuned, VIT_PRESET, k=2, seed=31, scale=0.05, noise=0.0)
    adapter, stats = extract_svd(base, tuned, rank=2)
    worst = 0.0
    for st in stats:
        delta = tuned.get_submodule(st.name).weight.double() - base.get_submodule(st.name).weight.double()
        rel = fro(delta - adapter_delta(adapter, st.name)) / fro(delta)
        worst = max(worst, rel)
        assert st.rank == 2 and st.energy > 1 - 1e-9
    record(record_property, "vit_rank2_exact_worst_rel_residual", worst)
    assert worst <= 1e-5  # what is left is float32 rounding of the tuned weights and the factors
    # only the targets changed: no full modules
    assert all(e["kind"] == "lora" for e in adapter.modules.values())


def test_extract_svd_keeps_changed_non_targets_in_full(vit_pair) -> None:
    base, tuned = vit_pair
    adapter, _ = extract_svd(base, tuned, rank=3)
    full = {n for n, e in adapter.modules.items() if e["kind"] == "full"}
    assert full == {"head"}
    assert set(adapter.modules["head"]["tensors"]) == {"weight", "bias"}
    assert torch.equal(adapter.tensors["head.weight"], tuned.head.weight)
    assert torch.equal(adapter.tensors["head.bias"], tuned.head.bias)
    for unchanged in ("norm", "patch_embed.proj", "blocks.0.norm1", ""):
        assert unchanged not in adapter.modules
    assert extract_svd(base, tuned, rank=3, include_changed=False)[0].modules.keys() == set(VIT_PRESET)


def test_extract_svd_with_energy(vit_pair) -> None:
    base, tuned = vit_pair
    adapter, stats = extract_svd(base, tuned, energy=0.9)
    for st in stats:
        delta = tuned.get_submodule(st.name).weight.double() - base.get_submodule(st.name).weight.double()
        s = torch.linalg.svdvals(delta.detach())
        assert st.rank == manual_rank(s, 0.9)
        assert st.energy >= 0.9
        assert adapter.tensors[f"{st.name}.lora_A"].shape[0] == st.rank
        assert abs(st.error - discarded(delta, st.rank)) <= 1e-5 * st.error
    assert adapter.meta["config"] == {"extracted": "svd", "rank": None, "energy": 0.9}


# --- GPT-2 Conv1D: weights stored [in, out] --------------------------------------------------------------

def test_conv1d_full_rank_extraction_reproduces_tuned_weights(lm_dir: Path, record_property) -> None:
    base = lrsurgery.load_model(str(lm_dir))
    tuned = lrsurgery.load_model(str(lm_dir))
    names = [n for n, _ in base.named_modules() if n.endswith(("attn.c_attn", "attn.c_proj", "mlp.c_proj"))]
    assert len(names) == 6
    # a dense (full-rank) change; attn.c_proj is square, where a missing transpose gives wrong numbers
    perturb(tuned, names, k=32, seed=41, scale=0.05, noise=0.01, transpose=True)
    with torch.no_grad():
        tuned.transformer.ln_f.weight.add_(0.1)

    adapter, stats = extract_svd(base, tuned, targets=["c_attn", "c_proj"], rank=1000)
    assert {s.name for s in stats} == set(names)
    for st in stats:
        entry = adapter.modules[st.name]
        w = base.get_submodule(st.name).weight  # [in, out]
        assert entry["fan_in_fan_out"] is True
        assert (entry["in_features"], entry["out_features"]) == tuple(w.shape)
        assert st.rank == entry["rank"] == min(w.shape) == st.full_rank
        assert st.error <= 1e-6 * fro(tuned.get_submodule(st.name).weight - w)
        # the adapter's (out, in) ΔW is the transpose of the stored-weight difference
        delta_stored = tuned.get_submodule(st.name).weight.double() - w.double()
        assert torch.allclose(adapter_delta(adapter, st.name), delta_stored.T, rtol=0, atol=1e-6)
    # the non-target change is kept in full; unchanged modules are not stored
    assert adapter.modules["transformer.ln_f"]["kind"] == "full"
    assert torch.equal(adapter.tensors["transformer.ln_f.weight"], tuned.transformer.ln_f.weight)
    for unchanged in ("transformer.h.0.mlp.c_fc", "transformer.h.0.ln_1", "transformer.wte", "lm_head"):
        assert unchanged not in adapter.modules

    model = lrsurgery.load_model(str(lm_dir))
    lrsurgery.apply_adapter(model, adapter)
    ids = torch.randint(0, 30000, (2, 12), generator=gen(42))
    with torch.no_grad():
        out_diff = (model(input_ids=ids).logits - tuned(input_ids=ids).logits).abs().max().item()
    lrsurgery.merge(model)
    w_diff = max((model.get_submodule(n).weight - tuned.get_submodule(n).weight).abs().max().item() for n in names)
    record(record_property, "conv1d_full_rank_weight_max_diff", w_diff)
    record(record_property, "conv1d_full_rank_logits_max_diff", out_diff)
    assert w_diff <= 1e-5
    assert out_diff <= 1e-4


# --- through files ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def vit_tuned_dir(ex_root: Path, digits_vit_dir: Path) -> Path:
    tuned = lrsurgery.load_model(str(digits_vit_dir))
    perturb(tuned, VIT_PRESET, k=3, seed=51, scale=0.05, noise=0.0)
    with torch.no_grad():
        tuned.head.weight.mul_(-1.5)
    return lrsurgery.save_model(tuned, ex_root / "vit-tuned")


def test_extract_models_round_trip_through_files(tmp_path: Path, digits_vit_dir: Path, vit_tuned_dir: Path,
                                                 record_property) -> None:
    out = tmp_path / "x.safetensors"
    path, stats = extract_models(str(digits_vit_dir), str(vit_tuned_dir), out, rank=3)
    assert path == out and out.is_file()
    adapter = lrsurgery.load_adapter(out)  # re-validated by the reader
    assert set(adapter.modules) == set(VIT_PRESET) | {"head"}
    assert adapter.meta["provenance"]["method"] == "svd-extract"
    assert adapter.meta["base"]["ref"] == str(digits_vit_dir.resolve())

    # the file holds exactly what the in-memory extraction computes
    base, tuned = lrsurgery.load_model(str(digits_vit_dir)), lrsurgery.load_model(str(vit_tuned_dir))
    mem, mem_stats = extract_svd(base, tuned, rank=3)
    assert set(mem.tensors) == set(adapter.tensors)
    for k in mem.tensors:
        assert torch.equal(mem.tensors[k], adapter.tensors[k]), k
    assert [(s.name, s.rank, s.error) for s in stats] == [(s.name, s.rank, s.error) for s in mem_stats]

    # applied to the base, it reproduces the tuned model (the change was exactly rank 3)
    model = lrsurgery.load_model(str(digits_vit_dir))
    lrsurgery.apply_adapter(model, out)
    x = vit_input()
    with torch.no_grad():
        diff = (model(x) - tuned(x)).abs().max().item()
    record(record_property, "extract_models_output_max_diff", diff)
    assert diff <= 1e-5

    with pytest.raises(OutputExistsError):
        extract_models(str(digits_vit_dir), str(vit_tuned_dir), out, rank=3)
    extract_models(str(digits_vit_dir), str(vit_tuned_dir), out, rank=1, force=True)
    assert lrsurgery.load_adapter(out).modules[VIT_PRESET[0]]["rank"] == 1


def test_extract_models_with_a_new_head_size(tmp_path: Path, digits_vit_dir: Path, record_property) -> None:
    tuned = lrsurgery.load_model(str(digits_vit_dir), num_classes=7, seed=5)  # a head the base reload lacks
    perturb(tuned, VIT_PRESET[:2], k=2, seed=61, scale=0.05, noise=0.0)
    tuned_dir = lrsurgery.save_model(tuned, tmp_path / "tuned7")
    out = tmp_path / "a.safetensors"
    extract_models(str(digits_vit_dir), str(tuned_dir), out, rank=2)
    adapter = lrsurgery.load_adapter(out)
    assert adapter.meta["base"]["num_classes"] == 7
    assert list(adapter.tensors["head.weight"].shape) == [7, 32]
    model = lrsurgery.load_model(str(digits_vit_dir), num_classes=7)
    lrsurgery.apply_adapter(model, adapter)
    x = vit_input()
    with torch.no_grad():
        diff = (model(x) - tuned(x)).abs().max().item()
    record(record_property, "extract_new_head_output_max_diff", diff)
    assert diff <= 1e-5


def test_extract_from_run_copies_the_adapter(tmp_path: Path, digits_vit_dir: Path) -> None:
    from lrsurgery.run import ADAPTER, create_run

    run, _ = create_run(str(digits_vit_dir), tmp_path / "run", rank=4)
    with torch.no_grad():  # make B non-zero so the copy is checked on real values
        g = gen(71)
        for layer in lrsurgery.lora_modules(run.model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g))
    lrsurgery.save_adapter(run.model, run.path / ADAPTER, force=True, provenance={"steps": 3})

    out = tmp_path / "copy.safetensors"
    assert extract_from_run(run.path, out) == (out, [])
    src, copy = lrsurgery.load_adapter(run.path / ADAPTER), lrsurgery.load_adapter(out)
    assert set(src.tensors) == set(copy.tensors)
    for k in src.tensors:
        assert torch.equal(src.tensors[k], copy.tensors[k]), k
    assert copy.meta == src.meta
    assert any(bool(copy.tensors[k].abs().sum() > 0) for k in copy.tensors if k.endswith("lora_B"))

    before = out.read_bytes()
    with pytest.raises(OutputExistsError):
        extract_from_run(run.path, out)
    assert out.read_bytes() == before
    extract_from_run(run.path, out, force=True)
    assert lrsurgery.load_adapter(out).meta == src.meta

    (tmp_path / "empty").mkdir()
    with pytest.raises(LrsurgeryError, match="no adapter.safetensors"):
        extract_from_run(tmp_path / "empty", tmp_path / "x.safetensors")


def test_full_run_extracts_to_lora_by_svd(tmp_path: Path, digits_vit_dir: Path) -> None:
    """After a full-parameter run, `extract RUN --rank R` gives a LoRA adapter of the change."""
    from lrsurgery.run import create_run, open_run, train_run
    from lrsurgery.train.loop import TrainConfig
    create_run(str(digits_vit_dir), tmp_path / "full", method="full")
    train_run(tmp_path / "full", "digits:5-9", TrainConfig(steps=3, batch_size=16, progress=False))
    path, stats = extract_from_run(tmp_path / "full", tmp_path / "svd.safetensors", rank=32)
    adapter = lrsurgery.load_adapter(path)
    lora = {n: e for n, e in adapter.modules.items() if e["kind"] == "lora"}
    assert set(lora) == {s.name for s in stats} and all(s.energy == pytest.approx(1.0) for s in stats)
    # full rank kept (min dim 32): base + adapter reproduces the fully trained model
    base = lrsurgery.load_model(str(digits_vit_dir))
    lrsurgery.apply_adapter(base, adapter)
    tuned = open_run(tmp_path / "full").model.eval()
    x = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        assert (base.eval()(x) - tuned(x)).abs().max() <= 1e-4
    low, _ = extract_from_run(tmp_path / "full", tmp_path / "svd4.safetensors", rank=4)
    assert all(e["rank"] == 4 for e in lrsurgery.load_adapter(low).modules.values() if e["kind"] == "lora")
    # the bias changes travel as lora_bias; the state-dict merge gives the in-memory merge's bytes
    from lrsurgery.ops.merge import merge_state_dict
    assert any(e.get("bias") for e in lora.values())
    merged = lrsurgery.merge(base)
    plain = lrsurgery.load_model(str(digits_vit_dir))
    streamed = merge_state_dict(plain.state_dict(), adapter)
    for k, v in merged.state_dict().items():
        assert torch.equal(v, streamed[k]), k
