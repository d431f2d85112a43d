"""Loading models offline (local dirs, a fake hub cache, weights files), refusing what is unsafe or wrong, saving."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import lrsurgery
from lrsurgery.errors import LrsurgeryError, ModelNotFoundError, OutputExistsError, ShapeMismatchError
from lrsurgery.models import read_state_dict


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)  # LoRA A and random heads come from the global RNG: same values on every run


TIMM_REF = "timm:vit_tiny_patch16_224"
TIMM_HUB_REPO = "timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k"
# timm's own tiny registered ViT (0.37 M parameters): the timm:NAME path at a fraction of the init cost
SMALL_REF = "timm:test_vit"
SMALL_HUB_REPO = "timm/test_vit.r160_in1k"

# set by _Payload.__reduce__ if unpickling ever runs it
PAYLOAD_RAN: list[str] = []


def _payload(tag: str) -> str:
    PAYLOAD_RAN.append(tag)
    return tag


class _Payload:
    def __reduce__(self):
        return (_payload, ("unpickled",))


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def small_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A safetensors state dict for timm's registered ``test_vit`` (seeded init)."""
    import timm

    torch.manual_seed(11)
    model = timm.create_model("test_vit", pretrained=False)
    path = tmp_path_factory.mktemp("weights") / "test_vit.safetensors"
    save_file(model.state_dict(), str(path))
    return path


# --- local directories --------------------------------------------------------------------------------

def test_load_timm_local_dir(vit_dir: Path, builders, cases) -> None:
    model = lrsurgery.load_model(str(vit_dir))
    reference = builders["vit"](0)
    assert type(model) is type(reference) and not model.training
    assert same_state(model, reference)
    assert torch.equal(cases["vit"].run(model), cases["vit"].run(reference))
    info = lrsurgery.base_info(model)
    assert (info.library, info.source, info.ref, info.revision) == ("timm", "local-dir", str(vit_dir), None)
    assert info.as_dict() == {"ref": str(vit_dir), "library": "timm", "source": "local-dir"}
    # the explicit timm form
    assert same_state(lrsurgery.load_model(f"timm:local-dir:{vit_dir}"), reference)


@pytest.mark.parametrize("name, cls", [("gpt2", "GPT2LMHeadModel"), ("llama", "LlamaForCausalLM")])
def test_load_transformers_local_dir(cases, builders, name: str, cls: str) -> None:
    model = cases[name].load()
    assert type(model).__name__ == cls and not model.training
    assert same_state(model, builders[name](0))
    info = lrsurgery.base_info(model)
    assert (info.library, info.source, info.revision) == ("transformers", "local-dir", None)


def test_load_real_minilm(cases) -> None:
    model = cases["minilm"].load()
    assert type(model).__name__ == "BertModel"
    assert sum(p.numel() for p in model.parameters()) == 22_713_216
    out = cases["minilm"].run(model)
    assert out.shape == (2, 12, 384) and torch.isfinite(out).all()


def test_unresolvable_references(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="timm:NAME, hf:ORG/NAME"):
        lrsurgery.load_model(str(tmp_path / "nowhere"))
    with pytest.raises(ModelNotFoundError, match="no architecture 'vit_tinyy_patch16_224'"):
        lrsurgery.load_model("timm:vit_tinyy_patch16_224", init="random")
    with pytest.raises(LrsurgeryError, match="init must be"):
        lrsurgery.load_model(TIMM_REF, init="zeros")


# --- the hub cache, offline ---------------------------------------------------------------------------

def test_load_from_fake_hub_cache(hub_cache, gpt2_dir: Path) -> None:
    model = lrsurgery.load_model(f"hf:{hub_cache['repo']}")
    info = lrsurgery.base_info(model)
    assert (info.library, info.source, info.revision) == ("transformers", "hub-cache", hub_cache["commit"])
    assert info.ref == "hf:tiny-org/tiny-gpt2"
    assert type(model).__name__ == "GPT2LMHeadModel"
    assert same_state(model, lrsurgery.load_model(str(gpt2_dir)))


@pytest.mark.parametrize("rev", ["commit", "main"])
def test_load_pinned_revision_from_fake_hub_cache(hub_cache, rev: str) -> None:
    revision = hub_cache["commit"] if rev == "commit" else "main"
    model = lrsurgery.load_model(f"hf:{hub_cache['repo']}@{revision}")
    info = lrsurgery.base_info(model)
    assert info.revision == hub_cache["commit"]
    assert info.source == "hub-cache"
    assert info.ref == f"hf:tiny-org/tiny-gpt2@{revision}"


def test_missing_hub_model_offline_names_repo_and_fix(hub_cache) -> None:
    with pytest.raises(ModelNotFoundError) as err:
        lrsurgery.load_model("hf:tiny-org/not-there")
    msg = str(err.value)
    assert "tiny-org/not-there" in msg and "HF_HUB_OFFLINE" in msg and "Fix:" in msg
    assert "hf download tiny-org/not-there" in msg
    # a known repo at a commit that is not in the cache
    with pytest.raises(ModelNotFoundError, match="tiny-org/tiny-gpt2"):
        lrsurgery.load_model(f"hf:{hub_cache['repo']}@{'f' * 40}")


def test_timm_without_weights_or_cache_explains_the_fix() -> None:
    with pytest.raises(ModelNotFoundError) as err:
        lrsurgery.load_model(TIMM_REF)
    msg = str(err.value)
    assert "timm:vit_tiny_patch16_224" in msg and "--weights FILE" in msg and "--init random" in msg
    assert TIMM_HUB_REPO in msg


def test_timm_weights_from_hub_cache(small_weights: Path, tmp_path: Path, monkeypatch) -> None:
    from huggingface_hub import constants

    commit = "89abcdef" * 5
    repo = tmp_path / ("models--" + SMALL_HUB_REPO.replace("/", "--"))
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    shutil.copy(small_weights, repo / "snapshots" / commit / "model.safetensors")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    model = lrsurgery.load_model(SMALL_REF)
    info = lrsurgery.base_info(model)
    assert (info.source, info.revision) == ("hub-cache", commit)
    state = read_state_dict(small_weights)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


# --- weights files ------------------------------------------------------------------------------------

def test_weights_file_is_loaded_and_hashed(small_weights: Path) -> None:
    model = lrsurgery.load_model(SMALL_REF, weights=small_weights)
    info = lrsurgery.base_info(model)
    assert info.source == "file"
    assert info.weights == str(small_weights.resolve())
    assert info.weights_sha256 == sha256_of(small_weights)
    state = read_state_dict(small_weights)
    own = model.state_dict()
    assert set(own) == set(state) and all(torch.equal(own[k], state[k]) for k in state)


@pytest.mark.parametrize("wrap", [None, "state_dict", "model"])
def test_torch_weights_file_with_plain_tensors(vit_dir: Path, tmp_path: Path, wrap) -> None:
    reference = lrsurgery.load_model(str(vit_dir))
    state = {k: v + 1 for k, v in reference.state_dict().items()}
    path = tmp_path / "w.pt"
    torch.save(state if wrap is None else {wrap: state, "epoch": 3}, path)
    model = lrsurgery.load_model(str(vit_dir), weights=path)
    assert all(torch.equal(model.state_dict()[k], state[k]) for k in state)
    assert lrsurgery.base_info(model).weights_sha256 == sha256_of(path)


def test_pickle_with_objects_is_refused_without_running_it(vit_dir: Path, tmp_path: Path) -> None:
    state = dict(lrsurgery.load_model(str(vit_dir)).state_dict())
    state["extra"] = _Payload()
    path = tmp_path / "evil.pt"
    torch.save(state, path)
    with pytest.raises(ModelNotFoundError) as err:
        lrsurgery.load_model(str(vit_dir), weights=path)
    assert "refused to load" in str(err.value) and "weights_only=True" in str(err.value)
    assert PAYLOAD_RAN == []


def test_torch_file_without_a_tensor_dict_is_refused(vit_dir: Path, tmp_path: Path) -> None:
    for i, obj in enumerate([torch.zeros(3), {"weight": torch.zeros(3), "step": 5}]):
        path = tmp_path / f"x{i}.pt"
        torch.save(obj, path)
        with pytest.raises(ModelNotFoundError, match="does not hold a state dict of tensors"):
            lrsurgery.load_model(str(vit_dir), weights=path)
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        lrsurgery.load_model(str(vit_dir), weights=tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not safetensors at all")
    with pytest.raises(ModelNotFoundError, match="not a readable safetensors file"):
        lrsurgery.load_model(str(vit_dir), weights=bad)


def test_shape_mismatched_weights(vit_dir: Path, small_weights: Path, tmp_path: Path) -> None:
    state = dict(lrsurgery.load_model(str(vit_dir)).state_dict())
    state["head.weight"] = torch.zeros(7, 32)
    path = tmp_path / "seven.safetensors"
    save_file(state, str(path))
    with pytest.raises(ShapeMismatchError) as err:
        lrsurgery.load_model(str(vit_dir), weights=path)
    assert "'head.weight'" in str(err.value) and "[7, 32]" in str(err.value) and "[5, 32]" in str(err.value)
    # weights of another architecture size: different key sets
    with pytest.raises(ShapeMismatchError, match="does not fit this architecture"):
        lrsurgery.load_model(str(vit_dir), weights=small_weights)


# --- random init and heads ----------------------------------------------------------------------------

def test_random_init_is_reproducible_per_seed() -> None:
    torch.manual_seed(42)
    expected_next = torch.rand(3)
    torch.manual_seed(42)
    a = lrsurgery.load_model(SMALL_REF, init="random", seed=5)
    assert torch.equal(torch.rand(3), expected_next)  # the caller's RNG stream is untouched
    info = lrsurgery.base_info(a)
    assert (info.source, info.init_seed) == ("random-init", 5)
    # load_kwargs rebuild the same base: the same seed gives identical weights
    assert info.load_kwargs() == {"weights": None, "init": "random", "num_classes": None, "seed": 5}
    b = lrsurgery.load_model(info.ref, **info.load_kwargs())
    assert same_state(a, b)
    c = lrsurgery.load_model(SMALL_REF, init="random", seed=6)
    assert not torch.equal(a.state_dict()["blocks.0.attn.qkv.weight"], c.state_dict()["blocks.0.attn.qkv.weight"])


def test_random_init_of_a_local_timm_dir(vit_dir: Path) -> None:
    model = lrsurgery.load_model(str(vit_dir), init="random", seed=123)
    assert lrsurgery.base_info(model).source == "random-init"
    assert not same_state(model, lrsurgery.load_model(str(vit_dir)))


def test_random_init_transformers(gpt2_dir: Path) -> None:
    a = lrsurgery.load_model(str(gpt2_dir), init="random", seed=1)
    b = lrsurgery.load_model(str(gpt2_dir), init="random", seed=1)
    pretrained = lrsurgery.load_model(str(gpt2_dir))
    assert same_state(a, b) and not same_state(a, pretrained)
    assert lrsurgery.base_info(a).source == "random-init"


def test_num_classes_replaces_the_timm_head(vit_dir: Path) -> None:
    saved = lrsurgery.load_model(str(vit_dir))
    model = lrsurgery.load_model(str(vit_dir), num_classes=3, seed=2)
    assert (model.head.in_features, model.head.out_features) == (32, 3)
    assert model(torch.zeros(1, 3, 16, 16)).shape == (1, 3)
    s0, s1 = saved.state_dict(), model.state_dict()
    assert all(torch.equal(s0[k], s1[k]) for k in s0 if not k.startswith("head."))
    info = lrsurgery.base_info(model)
    assert (info.num_classes, info.head_reset, info.init_seed) == (3, True, 2)
    assert same_state(model, lrsurgery.load_model(str(vit_dir), num_classes=3, seed=2))  # seeded head
    assert not torch.equal(model.head.weight, lrsurgery.load_model(str(vit_dir), num_classes=3, seed=3).head.weight)
    # asking for the size it already has keeps the trained head
    same = lrsurgery.load_model(str(vit_dir), num_classes=5)
    assert same_state(same, saved) and not lrsurgery.base_info(same).head_reset


def test_num_classes_on_transformers(gpt2_dir: Path) -> None:
    model = lrsurgery.load_model(str(gpt2_dir), num_classes=3)
    assert type(model).__name__ == "GPT2ForSequenceClassification"
    assert model.score.out_features == 3
    info = lrsurgery.base_info(model)
    assert (info.num_classes, info.head_reset) == (3, True)
    base = lrsurgery.load_model(str(gpt2_dir))
    assert torch.equal(model.transformer.h[0].attn.c_attn.weight, base.transformer.h[0].attn.c_attn.weight)


# --- saving -------------------------------------------------------------------------------------------

def test_save_timm_dir_round_trip(vit_dir: Path, tmp_path: Path, cases) -> None:
    model = lrsurgery.load_model(str(vit_dir), num_classes=3)
    out = lrsurgery.save_model(model, tmp_path / "vit3")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architecture"] == "vit_tiny_patch16_224" and cfg["num_classes"] == 3
    back = lrsurgery.load_model(str(out))
    assert same_state(back, model)
    assert torch.equal(cases["vit"].run(back), cases["vit"].run(model))


def test_save_timm_safetensors_file_round_trip(vit_dir: Path, tmp_path: Path) -> None:
    model = lrsurgery.load_model(str(vit_dir))
    with torch.no_grad():
        model.head.weight.mul_(2)
    out = lrsurgery.save_model(model, tmp_path / "vit.safetensors")
    assert out.is_file() and out.suffix == ".safetensors"
    back = lrsurgery.load_model(str(vit_dir), weights=out)
    assert same_state(back, model)
    with pytest.raises(ModelNotFoundError, match="plain weights file"):
        lrsurgery.load_model(str(out))


def test_save_transformers_dir_round_trip(gpt2_dir: Path, tmp_path: Path, cases) -> None:
    model = lrsurgery.load_model(str(gpt2_dir))
    out = lrsurgery.save_model(model, tmp_path / "gpt2")
    back = lrsurgery.load_model(str(out))
    assert type(back) is type(model) and same_state(back, model)
    assert torch.equal(cases["gpt2"].run(back), cases["gpt2"].run(model))


def test_save_copies_the_tokenizer(minilm_dir: Path, tmp_path: Path) -> None:
    out = lrsurgery.save_model(lrsurgery.load_model(str(minilm_dir)), tmp_path / "minilm")
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (out / name).read_bytes() == (minilm_dir / name).read_bytes()


def test_save_refuses_to_overwrite_without_force(vit_dir: Path, gpt2_dir: Path, tmp_path: Path) -> None:
    vit = lrsurgery.load_model(str(vit_dir))
    for out in (tmp_path / "d", tmp_path / "f.safetensors"):
        lrsurgery.save_model(vit, out)
        before = sorted(p.name for p in tmp_path.iterdir())
        with pytest.raises(OutputExistsError, match="--force"):
            lrsurgery.save_model(vit, out)
        assert sorted(p.name for p in tmp_path.iterdir()) == before  # no temp files left behind
    gpt2 = lrsurgery.load_model(str(gpt2_dir))
    with pytest.raises(OutputExistsError):
        lrsurgery.save_model(gpt2, tmp_path / "d")
    # force replaces the old content entirely
    lrsurgery.save_model(gpt2, tmp_path / "d", force=True)
    assert same_state(lrsurgery.load_model(str(tmp_path / "d")), gpt2)
    assert not (tmp_path / "d" / "model.safetensors").read_bytes() == (vit_dir / "model.safetensors").read_bytes()
    with torch.no_grad():
        vit.head.bias.fill_(1.0)
    lrsurgery.save_model(vit, tmp_path / "f.safetensors", force=True)
    assert torch.equal(read_state_dict(tmp_path / "f.safetensors")["head.bias"], torch.ones(5))


def test_save_model_with_adapters_is_refused_or_loadable(vit_dir: Path, tmp_path: Path) -> None:
    model = lrsurgery.load_model(str(vit_dir))
    lrsurgery.inject(model, rank=4)
    try:
        out = lrsurgery.save_model(model, tmp_path / "injected")
    except LrsurgeryError as e:  # refusing ("merge or eject first") is a fine answer
        assert "merge" in str(e)
        return
    back = lrsurgery.load_model(str(out))
    assert not lrsurgery.lora_modules(back)
