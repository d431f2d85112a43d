"""PEFT interop through the real PEFT: our adapters load in PEFT with equal outputs, PEFT's adapters apply here
with equal outputs, file → PEFT → file is identical, and what either side cannot represent is refused.

Models: tiny timm ViT, tiny GPT-2 (Conv1D, fan_in_fan_out), tiny LLaMA and the real MiniLM BERT. Measured
differences are printed (``pytest -s``) and recorded as properties.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import lrsurgery
from lrsurgery import format as fmt
from lrsurgery.cli import main
from lrsurgery.errors import (AdapterFormatError, BaseMismatchError, LrsurgeryError, OutputExistsError,
                              ShapeMismatchError)
from lrsurgery.ops.peft import from_peft, pattern_value, to_peft
from lrsurgery.surgery import wrap_module

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict  # noqa: E402

MODELS = ["vit", "gpt2", "llama", "minilm"]
# lrsurgery adapters to export, one per model, together covering every mapped feature
VARIANTS: dict[str, dict[str, Any]] = {
    # heterogeneous ranks and alphas, one rsLoRA module among plain ones, a full head, a bias change (s = 2)
    "vit": dict(targets=["attn.qkv", "attn.proj", "mlp.fc1"], train=["head"],
                extra=[("blocks.0.mlp.fc2", 2, 6.0, False), ("blocks.1.mlp.fc2", 8, 4.0, True)],
                bias=["blocks.0.attn.qkv"]),
    # Conv1D layers (fan_in_fan_out), rsLoRA everywhere, a bias change (s = 8/√4 = 4)
    "gpt2": dict(rslora=True, bias=["transformer.h.0.attn.c_attn"]),
    # rank_pattern: two modules at other ranks
    "llama": dict(targets=["self_attn.q_proj", "self_attn.v_proj"],
                  extra=[("model.layers.1.mlp.down_proj", 8, 16.0, False), ("model.layers.0.mlp.down_proj", 2, 8.0,
                                                                              False)]),
    "minilm": dict(),
}


@pytest.fixture(autouse=True)
def _seed_and_quiet():
    torch.manual_seed(0)  # LoRA A comes from the global RNG: same values on every run
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns about its 1-D lora_B.bias, README cards, ...
        yield


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def run(*args: Any) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


@torch.no_grad()
def make_adapter(case, randomize_b, *, rank: int = 4, alpha: float = 8.0, rslora: bool = False, targets=None,
                 train=None, extra=(), bias=(), relora: bool = False, seed: int = 0) -> fmt.Adapter:
    """Inject, wrap ``extra`` (name, rank, alpha, rslora) modules, randomize B, add Δb and head changes."""
    model = case.load()
    torch.manual_seed(seed)
    lrsurgery.inject(model, rank=rank, alpha=alpha, rslora=rslora, targets=targets or case.preset, train=train)
    for name, r, a, rs in extra:
        wrap_module(model, name, r, a, rs)
    randomize_b(model, seed=seed + 1)
    if relora:  # a ReLoRA restart: fold, new A, then train B again
        for layer in lrsurgery.lora_modules(model).values():
            layer.base_weight_record = fmt.tensor_record(layer.weight)  # as the ReLoRA trainer does
            layer.fold()
        randomize_b(model, seed=seed + 2)
    g = torch.Generator().manual_seed(seed + 3)
    layers = lrsurgery.lora_modules(model)
    for name in bias:
        layers[name].add_bias_delta(torch.randn(layers[name].out_features, generator=g) * 0.1)
    for name in train or []:
        for p in model.get_submodule(name).parameters():
            p.add_(torch.randn(p.shape, generator=g))
    return lrsurgery.adapter_from_model(model)


def peft_config(path: Path) -> dict[str, Any]:
    return json.loads((path / "adapter_config.json").read_text())


# --- lrsurgery → PEFT -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", MODELS)
def test_exported_adapter_loads_in_peft_with_identical_outputs(cases, randomize_b, record_property, tmp_path: Path,
                                                                 name: str) -> None:
    case = cases[name]
    adapter = make_adapter(case, randomize_b, **VARIANTS[name])
    ours = case.load()
    lrsurgery.apply_adapter(ours, adapter)
    y_ours = case.run(ours)
    effect = max_diff(y_ours, case.run(case.load()))
    assert effect > 1e-3

    out = to_peft(adapter, tmp_path / "peft")
    peft_model = PeftModel.from_pretrained(case.load(), str(out)).eval()
    diff = max_diff(case.run(peft_model), y_ours)
    record_property("peft_output_max_abs_diff", diff)
    print(f"\n[to_peft] {name}: max|peft - lrsurgery| = {diff:.3e} (adapter effect {effect:.3e})")
    assert diff <= 1e-6

    # PEFT holds exactly our tensors: nothing missing, nothing extra, values equal
    with safe_open(str(out / "adapter_model.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        saved = {k: f.get_tensor(k) for k in f.keys()}
    theirs = get_peft_model_state_dict(peft_model)
    assert set(theirs) == set(saved)
    assert all(torch.equal(theirs[k], saved[k]) for k in saved)
    # every module gets exactly its own rank and scaling in PEFT
    from peft.tuners.lora import LoraLayer
    layers = {n.removeprefix("base_model.model."): m for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)}
    lora = {n: e for n, e in adapter.modules.items() if e["kind"] == "lora"}
    assert set(layers) == set(lora)
    for n, e in lora.items():
        assert layers[n].r["default"] == e["rank"]
        assert layers[n].scaling["default"] == pytest.approx(e["scaling"], rel=1e-15)
        assert layers[n].fan_in_fan_out == e["fan_in_fan_out"] == (name == "gpt2")

    config = peft_config(out)
    assert config["peft_type"] == "LORA" and config["target_modules"] == list(lora)
    assert config["base_model_name_or_path"] == case.ref  # a local model directory
    if name == "vit":
        assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (4, 8, False)
        assert config["rank_pattern"] == {"blocks.0.mlp.fc2": 2, "blocks.1.mlp.fc2": 8}
        # the rsLoRA module keeps s = 4/√8 under PEFT's global use_rslora=false: alpha = s·r
        assert config["alpha_pattern"] == {"blocks.0.mlp.fc2": 6, "blocks.1.mlp.fc2": pytest.approx(4 * math.sqrt(8))}
        assert config["modules_to_save"] == ["head"] and config["lora_bias"] is True
        assert torch.count_nonzero(saved["base_model.model.blocks.1.attn.qkv.lora_B.bias"]) == 0  # no Δb there
        assert torch.equal(saved["base_model.model.blocks.0.attn.qkv.lora_B.bias"],
                           adapter.tensors["blocks.0.attn.qkv.lora_bias"] / 2)  # PEFT scales it by s = 2
    elif name == "gpt2":
        assert config["use_rslora"] is True and config["fan_in_fan_out"] is True and config["rank_pattern"] == {}
    elif name == "llama":
        assert config["rank_pattern"] == {"model.layers.1.mlp.down_proj": 8, "model.layers.0.mlp.down_proj": 2}
        assert config["alpha_pattern"] == {"model.layers.1.mlp.down_proj": 16}
        assert config["lora_bias"] is False and config["modules_to_save"] is None


def test_relora_adapter_exports_as_plain_lora(cases, randomize_b, tmp_path: Path) -> None:
    case = cases["llama"]
    adapter = make_adapter(case, randomize_b, relora=True)
    entry = next(iter(adapter.modules.values()))
    assert (entry["folded_rank"], entry["rank"], entry["alpha"], entry["scaling"]) == (4, 8, 8.0, 1.0)
    ours = case.load()
    lrsurgery.apply_adapter(ours, adapter)
    out = to_peft(adapter, tmp_path / "peft")
    config = peft_config(out)
    assert (config["r"], config["lora_alpha"], config["use_rslora"], config["rank_pattern"]) == (8, 8, False, {})
    peft_model = PeftModel.from_pretrained(case.load(), str(out)).eval()
    diff = max_diff(case.run(peft_model), case.run(ours))
    print(f"\n[to_peft] relora: max|peft - lrsurgery| = {diff:.3e}")
    assert diff <= 1e-6


class Nested(nn.Module):
    """Modules ``a.b`` and ``x.a.b``: a plain rank_pattern key ``a.b`` would also catch ``x.a.b``."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.ModuleDict({"b": nn.Linear(8, 8)})
        self.x = nn.ModuleDict({"a": nn.ModuleDict({"b": nn.Linear(8, 8)})})
        self.c = nn.Linear(8, 4)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.c(self.x["a"]["b"](self.a["b"](h)))


def test_pattern_keys_are_anchored_when_a_name_is_a_suffix_of_another(randomize_b, tmp_path: Path) -> None:
    torch.manual_seed(0)
    base = Nested()
    model = Nested()
    model.load_state_dict(base.state_dict())
    lrsurgery.inject(model, rank=4, alpha=4, targets=["x.a.b", "c"])
    wrap_module(model, "a.b", 2, 4.0)
    randomize_b(model, seed=3)
    adapter = lrsurgery.adapter_from_model(model)
    out = to_peft(adapter, tmp_path / "peft")
    config = peft_config(out)
    assert config["rank_pattern"] == {r"^a\.b": 2} and config["alpha_pattern"] == {}
    assert pattern_value({"a.b": 2}, "x.a.b", 4) == 2  # why the plain key would be wrong
    assert pattern_value(config["rank_pattern"], "x.a.b", 4) == 4
    x = torch.randn(3, 8)
    with torch.no_grad():
        y_base, y_ours = base(x), model(x)
        y_peft = PeftModel.from_pretrained(base, str(out)).eval()(x)
    assert max_diff(y_ours, y_base) > 1e-3
    assert max_diff(y_peft, y_ours) <= 1e-6


# --- PEFT → lrsurgery -----------------------------------------------------------------------------------

PEFT_CONFIGS: dict[str, dict[str, Any]] = {
    # rank_pattern by suffix and by full name, alpha_pattern by regex, modules_to_save, lora_bias
    "vit": dict(target_modules=["qkv", "fc1", "fc2"], rank_pattern={"blocks.1.mlp.fc2": 2, "fc1": 8},
                alpha_pattern={r"blocks\.0\..*": 16}, modules_to_save=["head"], lora_bias=True),
    "gpt2": dict(target_modules=["c_attn", "c_fc"], use_rslora=True, fan_in_fan_out=True, rank_pattern={"c_fc": 2}),
    "llama": dict(target_modules=["q_proj", "v_proj", "down_proj"], rank_pattern={r"layers\.1\.self_attn\.q_proj": 8},
                  alpha_pattern={"down_proj": 2}),
    "minilm": dict(target_modules=["query", "value"], use_rslora=True, rank_pattern={"value": 16},
                   modules_to_save=["layer.5.output.LayerNorm"]),
}


@torch.no_grad()
def make_peft(model: nn.Module, seed: int = 0, **config: Any) -> nn.Module:
    """get_peft_model with r=4, alpha=8 and ``config``, then random lora_B (and bias) and changed saved modules."""
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, **config))
    g = torch.Generator().manual_seed(seed)
    for n, p in peft_model.named_parameters():
        if "lora_B" in n:
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        elif "modules_to_save" in n:
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return peft_model.eval()


@pytest.mark.parametrize("name", MODELS)
def test_peft_adapter_imports_with_identical_outputs(cases, record_property, tmp_path: Path, name: str) -> None:
    case = cases[name]
    peft_model = make_peft(case.load(), **PEFT_CONFIGS[name])
    y_peft = case.run(peft_model)
    peft_model.save_pretrained(str(tmp_path / "peft"))

    adapter = from_peft(tmp_path / "peft", case.load())
    path = fmt.write(tmp_path / "a.safetensors", adapter)  # a valid file
    ours = case.load()
    lrsurgery.apply_adapter(ours, path)
    y_ours = case.run(ours)
    effect, diff = max_diff(y_ours, case.run(case.load())), max_diff(y_ours, y_peft)
    record_property("from_peft_output_max_abs_diff", diff)
    print(f"\n[from_peft] {name}: max|lrsurgery - peft| = {diff:.3e} (adapter effect {effect:.3e})")
    assert effect > 1e-3
    assert diff <= 1e-6

    from peft.tuners.lora import LoraLayer
    layers = {n.removeprefix("base_model.model."): m for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)}
    lora = {n: e for n, e in adapter.modules.items() if e["kind"] == "lora"}
    assert set(lora) == set(layers)
    for n, e in lora.items():  # PEFT's own resolution of r / alpha / rsLoRA per module
        assert (e["rank"], e["alpha"], e["scaling"]) == (layers[n].r["default"], layers[n].lora_alpha["default"],
                                                         layers[n].scaling["default"]), n
        assert e["rslora"] is PEFT_CONFIGS[name].get("use_rslora", False)
        assert e["fan_in_fan_out"] is (name == "gpt2")
        assert e["base_tensors"]["weight"] == fmt.tensor_record(case.load().get_submodule(n).weight)
        assert torch.equal(adapter.tensors[f"{n}.lora_A"], layers[n].lora_A["default"].weight)
    full = {n for n, e in adapter.modules.items() if e["kind"] == "full"}
    assert full == {"vit": {"head"}, "minilm": {"encoder.layer.5.output.LayerNorm"}}.get(name, set())
    if name == "vit":
        assert {n for n, e in lora.items() if e.get("bias")} == set(lora)
        assert {lora[n]["rank"] for n in lora} == {2, 4, 8} and lora["blocks.0.attn.qkv"]["alpha"] == 16
    assert adapter.meta["base"]["ref"] == case.ref
    assert adapter.meta["provenance"]["converted_from"] == "peft"


def test_peft_on_the_backbone_maps_onto_the_task_model_and_back(cases, gpt2_dir: Path, tmp_path: Path) -> None:
    from transformers import GPT2Model
    case = cases["gpt2"]
    # PEFT wrapped GPT2Model (h.0.attn.c_attn); lrsurgery loads GPT2LMHeadModel (transformer.h.0.attn.c_attn)
    peft_model = make_peft(GPT2Model.from_pretrained(gpt2_dir), target_modules=["c_attn"])
    peft_model.save_pretrained(str(tmp_path / "backbone"))
    adapter = from_peft(tmp_path / "backbone", case.load())
    assert list(adapter.modules) == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    ours = case.load()
    lrsurgery.apply_adapter(ours, adapter)
    with torch.no_grad():
        diff = max_diff(ours.transformer(**case.inputs).last_hidden_state, peft_model(**case.inputs).last_hidden_state)
    assert diff <= 1e-6
    # the reverse: PEFT on the task model, imported onto a backbone
    make_peft(case.load(), target_modules=["c_attn"]).save_pretrained(str(tmp_path / "task"))
    adapter = from_peft(tmp_path / "task", GPT2Model.from_pretrained(gpt2_dir))
    assert list(adapter.modules) == ["h.0.attn.c_attn", "h.1.attn.c_attn"]


def test_adapter_name_infix_in_keys_is_accepted(cases, tmp_path: Path) -> None:
    case = cases["vit"]
    make_peft(case.load(), **PEFT_CONFIGS["vit"]).save_pretrained(str(tmp_path / "peft"))
    reference = from_peft(tmp_path / "peft", case.load())
    tensors = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    infixed = {}
    for k, v in tensors.items():  # the in-memory layout: lora_A.default.weight, head.modules_to_save.default.weight
        for part in ("lora_A.", "lora_B."):
            k = k.replace(part, part + "default.")
        infixed[k.replace("model.head.", "model.head.modules_to_save.default.")] = v
    assert "base_model.model.head.modules_to_save.default.weight" in infixed
    save_file(infixed, str(tmp_path / "peft" / "adapter_model.safetensors"))
    adapter = from_peft(tmp_path / "peft", case.load())
    assert adapter.meta["modules"] == reference.meta["modules"]
    assert all(torch.equal(adapter.tensors[k], reference.tensors[k]) for k in reference.tensors)


# --- round trip -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", [*MODELS, "relora"])
def test_file_to_peft_to_file_is_identical(cases, randomize_b, tmp_path: Path, name: str) -> None:
    case = cases["llama" if name == "relora" else name]
    adapter = make_adapter(case, randomize_b, relora=True) if name == "relora" else \
        make_adapter(case, randomize_b, **VARIANTS[name])
    path = fmt.write(tmp_path / "a.safetensors", adapter)
    to_peft(path, tmp_path / "peft")
    back = from_peft(tmp_path / "peft")  # the base from base_model_name_or_path: the local model directory
    assert set(back.tensors) == set(adapter.tensors)
    assert all(torch.equal(back.tensors[k], adapter.tensors[k]) for k in adapter.tensors)
    for n, entry in adapter.modules.items():
        expected = {k: v for k, v in entry.items() if k != "folded_rank"}  # ReLoRA → plain LoRA of the total
        if n == "blocks.1.mlp.fc2":  # the rsLoRA module among plain ones: same s, expressed without rsLoRA
            expected.update(alpha=pytest.approx(4 * math.sqrt(8)), rslora=False)
        assert back.modules[n] == expected, n
    assert list(back.modules) == list(adapter.modules)
    assert back.meta["base"]["ref"] == case.ref


def test_hub_base_name_round_trips(hub_cache, randomize_b, tmp_path: Path) -> None:
    ref = f"hf:{hub_cache['repo']}"
    model = lrsurgery.load_model(ref)
    lrsurgery.inject(model, rank=4, alpha=8)
    randomize_b(model, seed=1)
    out = to_peft(lrsurgery.adapter_from_model(model), tmp_path / "peft")
    config = peft_config(out)
    assert (config["base_model_name_or_path"], config["revision"]) == (hub_cache["repo"], hub_cache["commit"])
    back = from_peft(out)  # resolves hf:tiny-org/tiny-gpt2@<commit> from the (fake) hub cache
    assert back.meta["base"]["ref"] == f"{ref}@{hub_cache['commit']}"
    assert back.meta["base"]["revision"] == hub_cache["commit"]


# --- refusals --------------------------------------------------------------------------------------------

def test_peft_directory_errors(cases, tmp_path: Path) -> None:
    case = cases["vit"]
    with pytest.raises(AdapterFormatError, match="no such directory"):
        from_peft(tmp_path / "nope", case.load())
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterFormatError, match="no adapter_config.json"):
        from_peft(tmp_path / "empty", case.load())
    peft_model = make_peft(case.load(), **PEFT_CONFIGS["vit"])
    peft_model.save_pretrained(str(tmp_path / "bin"), safe_serialization=False)
    assert (tmp_path / "bin" / "adapter_model.bin").is_file()
    with pytest.raises(AdapterFormatError, match="adapter_model.bin, a pickle file"):
        from_peft(tmp_path / "bin", case.load())
    peft_model.save_pretrained(str(tmp_path / "ok"))
    with pytest.raises(LrsurgeryError, match="names no base model.*--base"):
        from_peft(tmp_path / "ok")  # timm: base_model_name_or_path is null


@pytest.mark.parametrize("method", ["LoHaConfig", "IA3Config"])
def test_non_lora_peft_methods_are_refused(cases, tmp_path: Path, method: str) -> None:
    config = getattr(peft, method)(target_modules=["qkv", "fc2"], **({"feedforward_modules": ["fc2"]}
                                                                     if method == "IA3Config" else {}))
    get_peft_model(cases["vit"].load(), config).save_pretrained(str(tmp_path))
    kind = peft_config(tmp_path)["peft_type"]
    with pytest.raises(AdapterFormatError, match=f"a PEFT {kind} adapter.*LoRA adapters only"):
        from_peft(tmp_path, cases["vit"].load())


@pytest.mark.parametrize("extra, match", [
    (dict(use_dora=True), r"DoRA \(use_dora\)"),
    (dict(init_lora_weights="pissa"), "rewrote the base weights"),
    (dict(bias="all"), "trains the base biases"),
])
def test_peft_options_without_an_equivalent_are_refused(cases, tmp_path: Path, extra, match: str) -> None:
    make_peft(cases["vit"].load(), target_modules=["qkv"]).save_pretrained(str(tmp_path))
    config = peft_config(tmp_path)
    config.update(extra)
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterFormatError, match=match):
        from_peft(tmp_path, cases["vit"].load())


def test_lora_on_embeddings_is_refused(cases, tmp_path: Path) -> None:
    make_peft(cases["llama"].load(), target_modules=["q_proj", "embed_tokens"]).save_pretrained(str(tmp_path))
    with pytest.raises(AdapterFormatError, match="embedding layer"):
        from_peft(tmp_path, cases["llama"].load())


def test_wrong_base_is_refused(cases, tmp_path: Path) -> None:
    import timm
    from conftest import VIT_KWARGS
    make_peft(cases["vit"].load(), **PEFT_CONFIGS["vit"]).save_pretrained(str(tmp_path))
    with pytest.raises(BaseMismatchError, match="'blocks.0.attn.qkv' of the PEFT adapter does not exist in the base"):
        from_peft(tmp_path, cases["gpt2"].load())
    wider = timm.create_model("vit_tiny_patch16_224", **dict(VIT_KWARGS, embed_dim=48))
    with pytest.raises(ShapeMismatchError, match=r"blocks.0.attn.qkv: PEFT's factors .* do not fit the base layer"):
        from_peft(tmp_path, wider)
    config = peft_config(tmp_path)
    config["rank_pattern"] = {}
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterFormatError,
                       match="'blocks.0.mlp.fc1' has rank 8 in adapter_model.safetensors but 4 by adapter_config.json"):
        from_peft(tmp_path, cases["vit"].load())


def test_export_refusals(cases, randomize_b, tmp_path: Path) -> None:
    case = cases["vit"]
    whole = case.load()
    lrsurgery.inject(whole, method="full")
    with pytest.raises(LrsurgeryError, match="whole-model .* no PEFT LoRA equivalent"):
        to_peft(lrsurgery.adapter_from_model(whole), tmp_path / "x")
    only_head = case.load()
    lrsurgery.inject(only_head, method="full", train=["head"])
    with pytest.raises(LrsurgeryError, match="no LoRA modules"):
        to_peft(lrsurgery.adapter_from_model(only_head), tmp_path / "x")
    adapter = make_adapter(case, randomize_b, targets=["attn.qkv"])
    adapter.meta["modules"]["blocks.0"] = {"kind": "full", "tensors": {"norm1.weight": {"shape": [32],
                                                                                        "dtype": "float32"}}}
    adapter.tensors["blocks.0.norm1.weight"] = torch.ones(32)
    with pytest.raises(LrsurgeryError, match="'blocks.0.attn.qkv' and full module 'blocks.0' overlap"):
        to_peft(adapter, tmp_path / "x")
    assert not (tmp_path / "x").exists()

    adapter = make_adapter(case, randomize_b, targets=["attn.qkv"])
    out = to_peft(adapter, tmp_path / "peft")
    before = (out / "adapter_model.safetensors").read_bytes()
    with pytest.raises(OutputExistsError, match="already holds .*--force"):
        to_peft(make_adapter(case, randomize_b, targets=["attn.qkv"], seed=5), out)
    assert (out / "adapter_model.safetensors").read_bytes() == before
    to_peft(make_adapter(case, randomize_b, targets=["attn.qkv"], seed=5), out, force=True)
    assert (out / "adapter_model.safetensors").read_bytes() != before


# --- CLI ------------------------------------------------------------------------------------------------

def test_cli_convert_both_ways(cases, randomize_b, tmp_path: Path) -> None:
    case = cases["gpt2"]
    path = fmt.write(tmp_path / "a.safetensors", make_adapter(case, randomize_b, **VARIANTS["gpt2"]))
    code, out, err = run("convert", "--to", "peft", path, "-o", tmp_path / "peft", "--json")
    assert code == 0, err
    info = json.loads(out)
    assert info["peft_dir"] == str(tmp_path / "peft") and info["lora_modules"] == 8 and info["modules_to_save"] == []
    assert info["adapter_config"]["use_rslora"] is True and info["adapter_config"]["r"] == 4

    code, out, err = run("convert", "--from", "peft", tmp_path / "peft", "-o", tmp_path / "b.safetensors",
                         "--base", case.ref)
    assert code == 0, err
    assert "b.safetensors" in out and "8 LoRA" in out
    a, b = fmt.read(path), fmt.read(tmp_path / "b.safetensors")
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors) and set(a.tensors) == set(b.tensors)

    code, out, err = run("convert", "--from", "peft", tmp_path / "peft", "-o", tmp_path / "b.safetensors")
    assert code == 1 and err.startswith("error: ") and "--force" in err and len(err.strip().splitlines()) == 1
    code, out, err = run("convert", "--from", "peft", tmp_path / "peft", "-o", tmp_path / "b.safetensors", "--force",
                         "--json")  # --base from base_model_name_or_path
    assert code == 0, err
    assert json.loads(out)["provenance"]["converted_from"] == "peft"

    code, out, err = run("convert", "--to", "peft", path, "-o", tmp_path / "peft")
    assert code == 1 and "already holds" in err
    code, out, err = run("convert", "--to", "peft", path, "-o", tmp_path / "peft", "--force")
    assert code == 0 and "PeftModel.from_pretrained" in out


def test_cli_convert_errors(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    code, out, err = run("convert", "--from", "peft", tmp_path / "d", "-o", tmp_path / "a.safetensors", "--base", "x")
    assert code == 1 and err.strip().splitlines() == [f"error: {tmp_path / 'd'}: no adapter_config.json, so not a "
                                                       "PEFT adapter directory (PEFT's save_pretrained writes "
                                                       "adapter_config.json and adapter_model.safetensors)"]
    code, out, err = run("convert", tmp_path / "d", "-o", tmp_path / "x")
    assert code == 2 and "exactly one of --to peft or --from peft" in err
    code, out, err = run("convert", "--to", "peft", "--from", "peft", tmp_path / "d", "-o", tmp_path / "x")
    assert code == 2
    code, out, err = run("convert", "--to", "peft", tmp_path / "d", "-o", tmp_path / "x", "--base", "y")
    assert code == 2 and "--base" in err


def test_child_adapter_export_is_refused(tmp_path):
    """A child's ΔW is relative to its folded parents: PEFT cannot carry that, so export asks for a stack file."""
    from conftest import tiny_child_adapter
    from lrsurgery.errors import LrsurgeryError
    from lrsurgery.ops.peft import to_peft
    child = tiny_child_adapter()
    with pytest.raises(LrsurgeryError, match="dom.safetensors.*lrsurgery stack"):
        to_peft(child, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("field, value, message", [
    ("base_model_name_or_path", 5, "base_model_name_or_path is 5, expected a string"),
    ("rank_pattern", {"(": 3}, "rank_pattern key '\\(' is not a valid pattern"),
    ("lora_alpha", "x", "lora_alpha is 'x', expected a number"),
    ("r", 4.5, "r is 4.5, expected an integer"),
    ("alpha_pattern", {"q": "big"}, "alpha_pattern\\['q'\\] is 'big', expected a number"),
])
def test_config_values_of_the_wrong_type_are_refused(tmp_path, field, value, message):
    import json
    from lrsurgery.errors import AdapterFormatError
    from lrsurgery.ops.peft import read_peft
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q"], field: value}
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterFormatError, match=message):
        read_peft(tmp_path)
