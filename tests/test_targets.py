"""Target resolution: PEFT's matching rules, family presets on real module trees, all-linear, --train, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lrsurgery
from lrsurgery.errors import TargetError
from lrsurgery.layers.lora import LoRALinear
from lrsurgery.targets import PRESETS, entry_matches, family, head_names, resolve_targets, resolve_train, split_spec


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)  # LoRA A and random heads come from the global RNG: same values on every run


def vit_names(*suffixes: str) -> list[str]:
    return [f"blocks.{i}.{s}" for i in range(2) for s in suffixes]


VIT_PRESET = vit_names("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
GPT2_PRESET = [f"transformer.h.{i}.{s}" for i in range(2)
               for s in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
LLAMA_PRESET = [f"model.layers.{i}.{s}" for i in range(2)
                for s in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                          "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
BERT_PRESET = [f"encoder.layer.{i}.{s}" for i in range(6)
               for s in ("attention.self.query", "attention.self.key", "attention.self.value",
                         "attention.output.dense", "intermediate.dense", "output.dense")] + ["pooler.dense"]


# --- PEFT's list rule ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name, entry, hit", [
    ("model.layers.0.self_attn.q_proj", "q_proj", True),
    ("q_proj", "q_proj", True),                                  # exact name
    ("model.layers.0.self_attn.q_proj", "self_attn.q_proj", True),
    ("model.layers.0.self_attn.q_proj", "layers.0.self_attn.q_proj", True),
    ("blocks.0.attn.proj", "proj", True),
    ("transformer.h.0.attn.c_proj", "proj", False),             # endswith "proj" but not ".proj"
    ("transformer.h.0.attn.c_proj", "c_proj", True),
    ("blocks.0.attn.qkv", "attn.qkv", True),
    ("blocks.0.xattn.qkv", "attn.qkv", False),                   # only whole dotted components
    ("model.layers.0.self_attn.q_proj", "q_pro", False),         # no prefix matching
    ("model.layers.0.self_attn.q_proj", "self_attn", False),     # not an infix either
])
def test_entry_matches(name: str, entry: str, hit: bool) -> None:
    assert entry_matches(name, entry) is hit


def test_proj_does_not_match_c_proj_and_error_names_c_proj(cases) -> None:
    model = cases["gpt2"].load()
    with pytest.raises(TargetError) as err:
        resolve_targets(model, ["proj"])
    msg = str(err.value)
    assert "matched no Linear/Conv1D module" in msg
    assert "c_proj" in msg  # the closest real name is offered


@pytest.mark.parametrize("spec, expected", [
    (r".*\.attn\.c_attn", ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]),
    (r"transformer\.h\.1\.(attn|mlp)\.c_proj", ["transformer.h.1.attn.c_proj", "transformer.h.1.mlp.c_proj"]),
    (r"transformer\.h\.0\..*", GPT2_PRESET[:4]),   # non-linear modules in h.0 are not adapted
])
def test_regex_fullmatches_the_full_name(cases, spec: str, expected: list[str]) -> None:
    report = resolve_targets(cases["gpt2"].load(), spec)
    assert report.matched == expected
    assert report.spec == spec


def test_regex_is_fullmatch_not_search(cases) -> None:
    model = cases["gpt2"].load()
    # re.search would find these inside the full names; fullmatch must not
    for spec in (r"attn\.c_attn", r"h\.1\.mlp\.c_fc", r"transformer\.h\.0"):
        with pytest.raises(TargetError):
            resolve_targets(model, spec)


def test_invalid_regex_is_a_target_error(cases) -> None:
    with pytest.raises(TargetError, match="invalid"):
        resolve_targets(cases["gpt2"].load(), r"transformer\.h\.(0")


def test_comma_separated_string_is_a_list(cases) -> None:
    model = cases["vit"].load()
    assert split_spec(["attn.qkv, mlp.fc2", "", "head"]) == ["attn.qkv", "mlp.fc2", "head"]
    report = resolve_targets(model, "attn.qkv,mlp.fc2")
    assert report.matched == vit_names("attn.qkv", "mlp.fc2")
    assert report.per_entry == {"attn.qkv": 2, "mlp.fc2": 2}
    # a single plain string is a one-entry list, not a regex (PEFT would fullmatch "c_attn" and find nothing)
    assert resolve_targets(cases["gpt2"].load(), "c_attn").matched == [GPT2_PRESET[0], GPT2_PRESET[4]]


def test_regex_with_a_counted_quantifier(cases) -> None:
    report = resolve_targets(cases["vit"].load(), r"blocks\.[0-9]{1,2}\.attn\.qkv")
    assert report.matched == vit_names("attn.qkv")


def test_an_unmatched_entry_among_matching_ones_is_refused(cases) -> None:
    """A typo in one of several --targets entries must not silently adapt fewer layers."""
    model = cases["llama"].load()
    report = resolve_targets(model, ["q_proj", "v_proj"])
    assert report.matched == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
                              "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    assert report.unmatched_entries == [] and report.per_entry == {"q_proj": 2, "v_proj": 2}
    with pytest.raises(TargetError, match=r"\['v_prj'\] matched no module \(the other entries did\); closest names: .*v_proj"):
        resolve_targets(model, ["q_proj", "v_prj"])


# --- presets and families -----------------------------------------------------------------------------

@pytest.mark.parametrize("name, fam, expected", [
    ("vit", "vit", VIT_PRESET),
    ("gpt2", "gpt2", GPT2_PRESET),
    ("llama", "llama", LLAMA_PRESET),
    ("minilm", "bert", BERT_PRESET),
])
def test_family_presets_on_real_module_trees(cases, name: str, fam: str, expected: list[str]) -> None:
    model = cases[name].load()
    assert family(model) == fam
    assert PRESETS[fam] == cases[name].preset
    for spec in (None, "preset", ["preset"], fam, PRESETS[fam]):
        report = resolve_targets(model, spec)
        assert report.matched == expected, spec
        assert report.unmatched_entries == []
        assert report.not_linear == []


def test_family_detection_without_config() -> None:
    assert family(nn.Sequential(nn.Linear(2, 2))) is None
    with pytest.raises(TargetError, match="all-linear"):
        resolve_targets(nn.Sequential(nn.Linear(2, 2)))  # no family: no preset


def test_transformers_vit_preset_adapts_attention() -> None:
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    model = ViTForImageClassification(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                intermediate_size=64, image_size=16, patch_size=4, num_labels=3))
    attention = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".attention." in n]
    assert attention
    report = resolve_targets(model)
    assert report.unmatched_entries == []
    assert set(attention) <= set(report.matched)


# --- all-linear ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, head, expected", [
    ("vit", "head", VIT_PRESET),
    ("gpt2", "lm_head", GPT2_PRESET),
    ("llama", "lm_head", LLAMA_PRESET),
])
def test_all_linear_excludes_the_head(cases, name: str, head: str, expected: list[str]) -> None:
    model = cases[name].load()
    assert isinstance(model.get_submodule(head), nn.Linear)
    assert head in head_names(model)
    report = resolve_targets(model, "all-linear")
    assert report.matched == expected
    assert head not in report.matched
    assert report.excluded == [head]


def test_all_linear_on_bert(cases) -> None:
    bare = cases["minilm"].load()
    assert head_names(bare) == set()
    assert resolve_targets(bare, "all-linear").matched == BERT_PRESET
    classifier = cases["minilm"].load(num_classes=3)  # BertForSequenceClassification
    report = resolve_targets(classifier, "all-linear")
    assert report.matched == ["bert." + n for n in BERT_PRESET]
    assert report.excluded == ["classifier"]


# --- nothing matched ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name, spec, close", [
    ("vit", ["attn.qvk"], "attn.qkv"),
    ("llama", ["q_prj"], "q_proj"),
    ("gpt2", ["c_atn"], "c_attn"),
    ("minilm", ["querry"], "query"),
])
def test_nothing_matched_names_a_close_module(cases, name: str, spec: list[str], close: str) -> None:
    with pytest.raises(TargetError) as err:
        resolve_targets(cases[name].load(), spec)
    msg = str(err.value)
    assert repr(spec) in msg and "closest names: " in msg and close in msg
    assert "lrsurgery inspect" in msg


def test_matching_only_non_linear_modules_is_an_error(cases) -> None:
    with pytest.raises(TargetError) as err:
        resolve_targets(cases["vit"].load(), ["attn", "norm1"])
    assert "non-linear modules" in str(err.value)
    assert "blocks.0.attn" in str(err.value)


# --- --train and exclusions ---------------------------------------------------------------------------

def test_resolve_train_patterns(cases) -> None:
    model = cases["vit"].load()
    assert resolve_train(model, None) == []
    assert resolve_train(model, "head") == ["head"]
    assert resolve_train(model, ["head", "fc_norm"]) == ["fc_norm", "head"]  # in model order
    # "norm" is the exact name or any ".norm" suffix, like every list entry
    assert resolve_train(model, "norm") == ["patch_embed.norm", "blocks.0.attn.norm", "blocks.0.mlp.norm",
                                            "blocks.1.attn.norm", "blocks.1.mlp.norm", "norm"]
    # outermost matches only: a block and something inside it -> the block
    assert resolve_train(model, "blocks.1,blocks.1.mlp,mlp.fc2") == ["blocks.0.mlp.fc2", "blocks.1"]
    assert resolve_train(model, r"blocks\.\d\.norm1") == ["blocks.0.norm1", "blocks.1.norm1"]
    with pytest.raises(TargetError) as err:
        resolve_train(model, ["head", "hed"])
    assert "'hed'" in str(err.value) and "head" in str(err.value).split("closest names:")[1]


def test_inject_with_train_head(cases) -> None:
    model = cases["vit"].load()
    report = lrsurgery.inject(model, rank=4, targets="all-linear", train="head")
    assert report.config.train == ["head"]
    assert report.config.targets == VIT_PRESET
    assert isinstance(model.head, nn.Linear) and not isinstance(model.head, LoRALinear)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == sorted(["head.weight", "head.bias"] + [f"{n}.lora_{p}" for n in VIT_PRESET for p in "AB"])
    assert report.trainable_params == 32 * 5 + 5 + sum(4 * (i + o) for i, o in [(32, 96), (32, 32), (32, 128),
                                                                                   (128, 32)]) * 2


def test_modules_trained_in_full_are_never_targeted(cases) -> None:
    model = cases["vit"].load()
    report = resolve_targets(model, ["mlp.fc2"], exclude=["blocks.0.mlp.fc2"])
    assert report.matched == ["blocks.1.mlp.fc2"] and report.excluded == ["blocks.0.mlp.fc2"]
    inj = lrsurgery.inject(model, rank=4, targets="all-linear", train="blocks.1.mlp.fc2")
    assert "blocks.1.mlp.fc2" not in inj.config.targets
    assert type(model.get_submodule("blocks.1.mlp.fc2")) is nn.Linear
    assert model.get_submodule("blocks.1.mlp.fc2").weight.requires_grad
    assert isinstance(model.get_submodule("blocks.0.mlp.fc2"), LoRALinear)
    # excluding every match is "nothing matched"
    with pytest.raises(TargetError):
        resolve_targets(cases["vit"].load(), ["head"], exclude=["head"])


def test_submodules_of_a_module_trained_in_full_are_not_targeted(cases) -> None:
    model = cases["vit"].load()
    report = lrsurgery.inject(model, rank=4, targets="preset", train="blocks.1")
    assert report.config.targets == [f"blocks.0.{s}" for s in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]
    assert not any(isinstance(m, LoRALinear) for m in model.blocks[1].modules())
