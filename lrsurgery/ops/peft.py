"""Convert between lrsurgery adapter files and PEFT LoRA adapter directories, both ways, exactly.

    lrsurgery adapter file                        PEFT directory (adapter_model.safetensors)
    <m>.lora_A     [r, in]                  ⇄     base_model.model.<m>.lora_A.weight   [r, in]
    <m>.lora_B     [out, r]                 ⇄     base_model.model.<m>.lora_B.weight   [out, r]
    <m>.lora_bias  [out]   Δb               ⇄     base_model.model.<m>.lora_B.bias     [out]   Δb / s
    kind "full": <m>.<param>                ⇄     base_model.model.<m>.<param>,  <m> in modules_to_save
    per-module scaling s (+ rank, alpha)    ⇄     r, lora_alpha, use_rslora, rank_pattern, alpha_pattern

PEFT computes y = W0 x + b + s·(B A x + b_B): its ``lora_B.bias`` is scaled by s, ours (Δb) is not.
PEFT's adapter_config.json holds hyper-parameters only; the base weights' hashes that the lrsurgery
format requires are recomputed from the base model on import. PEFT itself is never imported here.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from lrsurgery import __version__
from lrsurgery import format as fmt
from lrsurgery.errors import (AdapterFormatError, BaseMismatchError, LrsurgeryError, ModelNotFoundError,
                              OutputExistsError, ShapeMismatchError, TargetError)
from lrsurgery.layers.lora import is_linear, linear_shape, lora_scaling
from lrsurgery.models import base_info, load_model

PREFIX = "base_model.model."  # PeftModel → LoraModel → the wrapped model
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# PEFT LoRA options whose tensors or semantics have no lrsurgery equivalent (config key → what it is)
_UNSUPPORTED = {"use_dora": "DoRA", "use_qalora": "QA-LoRA", "use_bdlora": "BD-LoRA", "velora_config": "PEFT's VeLoRA",
                "kasa_config": "KaSA", "arrow_config": "Arrow routing", "monteclora_config": "MonteCLoRA",
                "alora_invocation_tokens": "activated LoRA (aLoRA)", "target_parameters": "LoRA on raw parameters",
                "layer_replication": "layer replication", "trainable_token_indices": "trainable tokens"}
# init methods that also rewrite the base weights: the adapter is only valid on that residual base
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "lora_ga", "loftq")
_LORA_KEY = re.compile(r"(?P<module>.+)\.(?P<part>lora_A|lora_B)(?:\.(?P<adapter>[^.]+))?\.(?P<param>weight|bias)")
_SAVED_KEY = re.compile(r"(?P<module>.+)\.modules_to_save\.(?P<adapter>[^.]+)\.(?P<param>.+)")


# --- lrsurgery → PEFT ------------------------------------------------------------------------------------

def to_peft(adapter: fmt.Adapter | str | os.PathLike, out_dir: str | os.PathLike, *, force: bool = False) -> Path:
    """Write ``adapter`` as a PEFT LoRA directory that ``PeftModel.from_pretrained(base, out_dir)`` loads."""
    if not isinstance(adapter, fmt.Adapter):
        from lrsurgery.adapter import load_adapter
        adapter = load_adapter(adapter)  # a path or an hf: reference
    config, tensors = peft_layout(adapter)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out} is a file; -o names the directory to write the PEFT adapter into")
    existing = [f.name for f in (out / CONFIG_FILE, out / WEIGHTS_FILE) if f.exists()]
    if existing and not force:
        raise OutputExistsError(f"{out} already holds {' and '.join(existing)}; pass --force (force=True) to overwrite")
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}  # no shared storage
    fmt.atomic_write(out / WEIGHTS_FILE, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    fmt.atomic_write(out / CONFIG_FILE, lambda tmp: tmp.write_text(text))
    return out


def peft_layout(adapter: fmt.Adapter) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The adapter_config.json object and the tensors (PEFT's names) of ``adapter``; refuses what PEFT lacks."""
    lora = {n: e for n, e in adapter.modules.items() if e["kind"] == "lora"}
    full = {n: e for n, e in adapter.modules.items() if e["kind"] == "full"}
    if adapter.meta.get("parents"):  # its ΔW is relative to the base with the parents folded in
        names = ", ".join(p.get("name") or p["id"][:12] for p in adapter.meta["parents"])
        raise LrsurgeryError(f"this adapter was trained on top of {names}; PEFT has no lineage, so it would be "
                             "applied without them. Export the whole stack instead: lrsurgery stack MODEL PARENTS… "
                             "ADAPTER -o S.safetensors, then lrsurgery convert --to peft S.safetensors")
    _check_exportable(adapter, lora, full)
    flags = {e.get("rslora", False) for e in lora.values()}
    rslora = flags == {True}  # mixed flags: plain scaling everywhere, alphas chosen to give each module its s
    ranks = {n: e["rank"] for n, e in lora.items()}
    alphas = {n: _peft_alpha(e, rslora) for n, e in lora.items()}
    r, alpha = _most_common(ranks), _most_common(alphas)
    use_bias = any(e.get("bias") for e in lora.values())
    tensors: dict[str, torch.Tensor] = {}
    for n, e in lora.items():
        b = adapter.tensors[f"{n}.lora_B"]
        tensors[f"{PREFIX}{n}.lora_A.weight"] = adapter.tensors[f"{n}.lora_A"]
        tensors[f"{PREFIX}{n}.lora_B.weight"] = b
        if use_bias:  # PEFT's lora_bias is one switch for all modules: a zero bias is an exact no-op
            delta = adapter.tensors[f"{n}.lora_bias"] if e.get("bias") else torch.zeros(e["out_features"])
            tensors[f"{PREFIX}{n}.lora_B.bias"] = (delta.double() / e["scaling"]).to(b.dtype)
    for n, e in full.items():
        tensors.update({f"{PREFIX}{n}.{p}": adapter.tensors[fmt.tensor_key(n, p)] for p in e["tensors"]})
    name, revision = _peft_base_name(adapter.meta.get("base", {}))
    config = {"peft_type": "LORA", "task_type": None, "base_model_name_or_path": name, "revision": revision,
              "r": r, "lora_alpha": _number(alpha), "use_rslora": rslora,
              "target_modules": list(lora), "rank_pattern": _patterns(ranks, r),
              "alpha_pattern": {k: _number(v) for k, v in _patterns(alphas, alpha).items()},
              "fan_in_fan_out": all(e["fan_in_fan_out"] for e in lora.values()),
              "lora_bias": use_bias, "bias": "none", "modules_to_save": list(full) or None,
              "lora_dropout": float((adapter.meta.get("config") or {}).get("dropout") or 0.0),
              "init_lora_weights": True, "inference_mode": True, "use_dora": False}
    return config, tensors


def _check_exportable(adapter: fmt.Adapter, lora: dict[str, Any], full: dict[str, Any]) -> None:
    where = adapter.path or "adapter"
    other = {n: e["kind"] for n, e in adapter.modules.items() if e["kind"] not in ("lora", "full")}
    if other:
        n, kind = next(iter(other.items()))
        raise LrsurgeryError(f"{where}: module {n!r} is of kind {kind!r} (a full-rank ΔW), which PEFT's LoRA format "
                             "cannot hold; merge the adapter into the base (lrsurgery merge) or extract a LoRA of "
                             "it (lrsurgery extract --base --tuned --rank R) first")
    if "" in full:
        raise LrsurgeryError(f"{where}: a whole-model (method full) adapter has no PEFT LoRA equivalent; "
                             "save the fine-tuned model itself instead (lrsurgery merge)")
    if not lora:
        raise LrsurgeryError(f"{where}: the adapter has no LoRA modules, and a PEFT LoRA adapter needs at least one")
    for f in full:
        # PEFT never adapts a module inside, or matched by, a modules_to_save entry (its own regex rule)
        clash = [n for n in lora if re.match(rf"(^|.*\.){f}($|\..*)", n) or f.startswith(n + ".")]
        if clash:
            raise LrsurgeryError(f"{where}: LoRA module {clash[0]!r} and full module {f!r} overlap; PEFT would "
                                 f"not adapt a module matched by modules_to_save={f!r}")
    for n, e in lora.items():
        if e.get("bias") and e["scaling"] == 0:
            raise LrsurgeryError(f"{where}: {n} has a bias change but scaling 0; PEFT scales its bias by s")


def _peft_alpha(entry: dict[str, Any], rslora: bool) -> float:
    """The lora_alpha that gives this module its own scaling under PEFT's global use_rslora."""
    if lora_scaling(entry["alpha"], entry["rank"], rslora) == entry["scaling"]:
        return entry["alpha"]
    return entry["scaling"] * (math.sqrt(entry["rank"]) if rslora else entry["rank"])


def _most_common(values: dict[str, Any]) -> Any:
    return Counter(values.values()).most_common(1)[0][0]


def _patterns(values: dict[str, Any], default: Any) -> dict[str, Any]:
    """rank_pattern/alpha_pattern entries under which PEFT's first-match rule gives every module its value."""
    pattern = {n: v for n, v in values.items() if v != default}
    if all(pattern_value(pattern, n, default) == v for n, v in values.items()):
        return pattern  # plain module names: readable, and what PEFT users write
    # a name is the suffix of another module's name: anchor each key to the whole name instead
    return {"^" + re.escape(n): v for n, v in pattern.items()}


def pattern_value(pattern: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's rule: the first key K for which ``(.*\\.)?(K)$`` matches the module name wins."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _number(x: float) -> float | int:
    return int(x) if isinstance(x, float) and x.is_integer() else x


def _peft_base_name(base: dict[str, Any]) -> tuple[str | None, str | None]:
    """(base_model_name_or_path, revision) for the adapter's base reference: a hub id or a local directory."""
    ref = base.get("ref")
    if not ref or ref.startswith("timm:"):
        return None, None  # PEFT has no name for timm architectures
    if ref.startswith("hf:"):
        name, _, revision = ref[3:].partition("@")
        return name, revision or base.get("revision")
    return ref, None


# --- PEFT → lrsurgery ------------------------------------------------------------------------------------

def from_peft(peft_dir: str | os.PathLike, base_model: nn.Module | str | None = None,
              **load_kwargs: Any) -> fmt.Adapter:
    """Read a PEFT LoRA directory into an adapter for ``base_model`` (a model, a reference, or None:
    ``base_model_name_or_path``), whose weights give the per-module hashes. ``load_kwargs`` go to load_model."""
    config, tensors = read_peft(peft_dir)
    where = Path(peft_dir)
    if not isinstance(base_model, nn.Module):
        base_model = load_model(base_model or peft_base_ref(config, where), **load_kwargs)
    lora, saved = _split_keys(tensors, config, where)
    to_ours = _module_mapper([*lora, *saved], base_model, where)
    modules_in_base = dict(base_model.named_modules())
    modules: dict[str, dict[str, Any]] = {}
    out: dict[str, torch.Tensor] = {}
    for path, parts in lora.items():
        name = to_ours(path)
        modules[name] = _lora_entry(path, name, parts, modules_in_base[name], config, where, out)
    for path, params in saved.items():
        name = to_ours(path)
        entry = _full_entry(name, params, modules_in_base[name], where, out)
        if entry:
            modules[name] = entry
    if not modules:
        raise AdapterFormatError(f"{where / WEIGHTS_FILE}: holds no LoRA or modules_to_save tensors")
    order = {n: i for i, n in enumerate(modules_in_base)}
    info = base_info(base_model)
    meta = {"base": info.as_dict() if info else {"ref": config.get("base_model_name_or_path")},
            "method": "lora",
            "config": {"method": "lora", "rank": int(config.get("r", 8)), "alpha": float(config.get("lora_alpha", 8)),
                       "rslora": bool(config.get("use_rslora")), "dropout": float(config.get("lora_dropout") or 0.0)},
            "modules": {n: modules[n] for n in sorted(modules, key=order.__getitem__)},
            "provenance": {"tool": f"lrsurgery {__version__}", "converted_from": "peft",
                           "peft_dir": str(where.resolve()), "peft_version": config.get("peft_version")}}
    fmt.validate(out, meta, where=str(where))
    return fmt.Adapter(tensors=out, meta=meta)


def read_peft(peft_dir: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """adapter_config.json and the tensors of a PEFT directory; refuses pickles and non-LoRA methods."""
    d = Path(peft_dir)
    if not d.is_dir():
        raise AdapterFormatError(f"{d}: " + ("not a directory; give the PEFT adapter directory (the one holding "
                                             "adapter_config.json)" if d.exists() else "no such directory"))
    if not (d / CONFIG_FILE).is_file():
        raise AdapterFormatError(f"{d}: no {CONFIG_FILE}, so not a PEFT adapter directory (PEFT's save_pretrained "
                                 f"writes {CONFIG_FILE} and {WEIGHTS_FILE})")
    try:
        config = json.loads((d / CONFIG_FILE).read_text())
    except (OSError, ValueError) as e:
        raise AdapterFormatError(f"{d / CONFIG_FILE}: not valid JSON ({e})")
    if not isinstance(config, dict):
        raise AdapterFormatError(f"{d / CONFIG_FILE}: not a JSON object")
    _check_config(config, d)
    weights = d / WEIGHTS_FILE
    if not weights.is_file():
        if (d / "adapter_model.bin").is_file():
            raise AdapterFormatError(
                f"{d} holds adapter_model.bin, a pickle file, which lrsurgery never loads (unpickling can run code); "
                "re-save it as safetensors with PEFT: PeftModel.from_pretrained(base, DIR).save_pretrained(NEW_DIR)")
        raise AdapterFormatError(f"{d}: no {WEIGHTS_FILE}; the PEFT adapter is incomplete")
    try:
        with safe_open(str(weights), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for corrupt data
        raise AdapterFormatError(f"{weights}: not a readable safetensors file ({e})")
    return config, tensors


def _check_types(config: dict[str, Any], where: Path) -> None:
    """Refuse config values of the wrong JSON type (a hand-edited or corrupt file) with the field's name."""
    def bad(key: str, want: str) -> AdapterFormatError:
        return AdapterFormatError(f"{where / CONFIG_FILE}: {key} is {config[key]!r}, expected {want}")
    number = (int, float)
    for key, types, want in (("r", (int,), "an integer"), ("lora_alpha", number, "a number"),
                             ("base_model_name_or_path", (str,), "a string"), ("revision", (str,), "a string"),
                             ("use_rslora", (bool,), "true or false"), ("fan_in_fan_out", (bool,), "true or false"),
                             ("rank_pattern", (dict,), "an object"), ("alpha_pattern", (dict,), "an object"),
                             ("target_modules", (list, str), "a list or a regex string"),
                             ("modules_to_save", (list,), "a list")):
        value = config.get(key)
        if value is not None and (not isinstance(value, types) or (isinstance(value, bool) and bool not in types)):
            raise bad(key, want)
    for key, want in (("rank_pattern", (int,)), ("alpha_pattern", (int, float))):
        for pattern, value in (config.get(key) or {}).items():
            if not isinstance(value, want) or isinstance(value, bool):
                raise AdapterFormatError(f"{where / CONFIG_FILE}: {key}[{pattern!r}] is {value!r}, expected a number")
            try:
                re.compile(pattern)
            except re.error as e:
                raise AdapterFormatError(f"{where / CONFIG_FILE}: {key} key {pattern!r} is not a valid pattern ({e})")


def _check_config(config: dict[str, Any], where: Path) -> None:
    _check_types(config, where)
    kind = config.get("peft_type")
    if kind != "LORA":
        raise AdapterFormatError(f"{where}: a PEFT {kind} adapter (peft_type); lrsurgery converts LoRA adapters only")
    for key, what in _UNSUPPORTED.items():
        if config.get(key):
            raise AdapterFormatError(f"{where}: uses {what} ({key}), which lrsurgery adapters cannot represent; "
                                     "merge it with PEFT (merge_and_unload) instead")
    init = str(config.get("init_lora_weights", True)).lower()
    if init.startswith(_BASE_CHANGING_INITS):
        raise AdapterFormatError(f"{where}: init_lora_weights={init!r} also rewrote the base weights, so the adapter "
                                 "only fits that residual base; re-save it with PEFT's "
                                 "save_pretrained(..., path_initial_model_for_weight_conversion=...) first")
    if config.get("bias", "none") != "none":
        raise AdapterFormatError(f"{where}: bias={config['bias']!r} trains the base biases, which lrsurgery does not "
                                 "import; retrain with bias='none' (lora_bias=True gives LoRA its own bias)")


def peft_base_ref(config: dict[str, Any], where: Path) -> str:
    """The lrsurgery model reference of ``base_model_name_or_path``: a local directory, else ``hf:NAME[@REV]``."""
    name = config.get("base_model_name_or_path")
    if not name:
        raise LrsurgeryError(f"{where / CONFIG_FILE} names no base model (base_model_name_or_path is null); "
                             "pass the base with --base MODEL")
    if name.startswith(("hf:", "timm:")) or Path(name).is_dir():
        return name
    if not re.fullmatch(r"[\w-][\w.-]*(/[\w.-]+)?", name):
        raise ModelNotFoundError(f"{where / CONFIG_FILE}: base model {name!r} is a path that does not exist here; "
                                 "pass the base with --base MODEL")
    revision = config.get("revision")
    return f"hf:{name}" + (f"@{revision}" if revision else "")


def _split_keys(tensors: dict[str, torch.Tensor], config: dict[str, Any],
                where: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, dict[str, torch.Tensor]]]:
    """PEFT keys → ({module: {"A", "B", "bias"}}, {modules_to_save module: {param: tensor}}), PEFT's paths."""
    saved_names = config.get("modules_to_save") or []
    lora: dict[str, dict[str, torch.Tensor]] = {}
    saved: dict[str, dict[str, torch.Tensor]] = {}
    adapter_names = set()
    for key in tensors:  # first what cannot be represented, so that the message names the real cause
        rel = key.removeprefix(PREFIX)
        if not _LORA_KEY.fullmatch(rel) and any(c.startswith("lora_") for c in rel.split(".")):
            what = ("DoRA's magnitude vector" if "lora_magnitude_vector" in rel else
                    "LoRA on an embedding layer" if "lora_embedding" in rel else "an unknown LoRA tensor")
            raise AdapterFormatError(f"{where}: {key!r} is {what}, which lrsurgery adapters cannot represent "
                                     "(LoRA on Linear/Conv1D layers only)")
    for key, t in tensors.items():
        rel = key.removeprefix(PREFIX)
        if m := _LORA_KEY.fullmatch(rel):
            adapter_names.add(m["adapter"])
            part = "bias" if m["param"] == "bias" else m["part"][-1]
            if part == "bias" and m["part"] == "lora_A":
                raise AdapterFormatError(f"{where}: unexpected tensor {key!r} (lora_A has no bias)")
            lora.setdefault(m["module"], {})[part] = t
        elif m := _SAVED_KEY.fullmatch(rel):  # the in-memory layout: <module>.modules_to_save.<adapter>.<param>
            adapter_names.add(m["adapter"])
            saved.setdefault(m["module"], {})[m["param"]] = t
        else:  # on disk: <module>.<param>, where PEFT matched <module> by a plain suffix test
            parts = rel.split(".")
            cut = next((i for i in range(1, len(parts)) if any(".".join(parts[:i]).endswith(s) for s in saved_names)),
                       None)
            if cut is None:
                raise AdapterFormatError(f"{where}: tensor {key!r} is neither a LoRA factor nor part of a "
                                         f"modules_to_save module (modules_to_save={saved_names})")
            saved.setdefault(".".join(parts[:cut]), {})[".".join(parts[cut:])] = t
    adapter_names.discard(None)
    if len(adapter_names) > 1:
        raise AdapterFormatError(f"{where}: holds several adapters ({', '.join(sorted(adapter_names))}); save each "
                                 "with PEFT into its own directory and convert them one by one")
    return lora, saved


def _module_mapper(paths: list[str], model: nn.Module, where: Path) -> Callable[[str], str]:
    """PEFT's module paths are relative to the model PEFT wrapped: find the prefix change to the base's names.

    E.g. PEFT on ``GPT2Model`` saves ``h.0.attn.c_attn``; the base ``GPT2LMHeadModel`` names it
    ``transformer.h.0.attn.c_attn`` (and the reverse when PEFT wrapped the task model).
    """
    names = {n for n, _ in model.named_modules()}
    missing = [p for p in paths if p not in names]
    if not missing:
        return lambda p: p
    first = missing[0]
    changes = [(n[: -len(first)], "") for n in sorted(names) if n.endswith("." + first)]  # add a prefix
    parts = first.split(".")
    changes += [("", ".".join(parts[:k]) + ".") for k in range(1, len(parts))]  # strip a prefix
    for add, strip in changes:
        if all(p.startswith(strip) and add + p.removeprefix(strip) in names for p in paths):
            return lambda p, add=add, strip=strip: add + p.removeprefix(strip)
    ref = (base_info(model).ref if base_info(model) else type(model).__name__)
    raise BaseMismatchError(f"{where}: module {first!r} of the PEFT adapter does not exist in the base {ref!r} "
                            f"(nor under another prefix); pass the model the adapter was trained on with --base")


def _lora_entry(path: str, name: str, parts: dict[str, torch.Tensor], module: nn.Module, config: dict[str, Any],
                where: Path, out: dict[str, torch.Tensor]) -> dict[str, Any]:
    """One lrsurgery LoRA entry (and its tensors, into ``out``) from PEFT's factors of module ``path``."""
    if "A" not in parts or "B" not in parts:
        raise AdapterFormatError(f"{where}: module {path!r} has lora_{'B' if 'A' in parts else 'A'} missing")
    a, b = parts["A"], parts["B"]
    if a.dim() != 2 or b.dim() != 2:
        raise AdapterFormatError(f"{where}: {path!r} has {a.dim()}-D LoRA factors (LoRA on a convolution); "
                                 "lrsurgery adapts Linear/Conv1D layers only")
    if not is_linear(module):
        raise TargetError(f"{name} is a {type(module).__name__} in the base; lrsurgery adapts Linear/Conv1D "
                          "layers only")
    out_f, in_f, fifo = linear_shape(module)
    r = a.shape[0]
    if b.shape[1] != r or (b.shape[0], a.shape[1]) != (out_f, in_f):
        raise ShapeMismatchError(f"{name}: PEFT's factors A {list(a.shape)}, B {list(b.shape)} do not fit the base "
                                 f"layer ({out_f}×{in_f}, out×in); is --base the model the adapter was trained on?")
    config_r = pattern_value(config.get("rank_pattern") or {}, path, config.get("r", 8))
    if r != config_r:
        raise AdapterFormatError(f"{where}: {path!r} has rank {r} in {WEIGHTS_FILE} but {config_r} by "
                                 f"{CONFIG_FILE} (r, rank_pattern); the two files do not belong together")
    alpha = float(pattern_value(config.get("alpha_pattern") or {}, path, config.get("lora_alpha", 8)))
    rslora = bool(config.get("use_rslora"))
    s = lora_scaling(alpha, r, rslora)
    entry = {"kind": "lora", "rank": r, "alpha": alpha, "rslora": rslora, "scaling": s, "in_features": in_f,
             "out_features": out_f, "fan_in_fan_out": fifo, "dtype": fmt.dtype_name(a.dtype),
             "base_tensors": {"weight": fmt.tensor_record(module.weight)}}
    out[f"{name}.lora_A"], out[f"{name}.lora_B"] = a, b
    bias = parts.get("bias")
    if bias is not None and bool(bias.ne(0).any()):  # a zero bias (PEFT's init) is no change: leave it out
        if module.bias is None:
            raise ShapeMismatchError(f"{name}: the adapter changes a bias the base layer does not have; wrong base?")
        entry["bias"] = True
        out[f"{name}.lora_bias"] = (bias.double() * s).to(bias.dtype)  # PEFT scales lora_B's bias by s
    return entry


def _full_entry(name: str, params: dict[str, torch.Tensor], module: nn.Module, where: Path,
                out: dict[str, torch.Tensor]) -> dict[str, Any] | None:
    """A "full" entry from a modules_to_save copy; unchanged buffers (PEFT saves them too) are dropped."""
    own, buffers = dict(module.named_parameters()), dict(module.named_buffers())
    tensors = {}
    for p, t in params.items():
        if p in own:
            if own[p].shape != t.shape:
                raise ShapeMismatchError(f"{name}.{p} has shape {list(t.shape)} in the PEFT adapter but "
                                         f"{list(own[p].shape)} in the base; load the base with the adapter's "
                                         "head size (--num-classes) or pass the right --base")
            tensors[p] = {"shape": list(t.shape), "dtype": fmt.dtype_name(t.dtype)}
            out[fmt.tensor_key(name, p)] = t
        elif p in buffers and buffers[p].shape == t.shape and torch.equal(buffers[p], t.to(buffers[p].dtype)):
            continue
        elif p in buffers:
            raise AdapterFormatError(f"{where}: modules_to_save {name!r} changes the buffer {p!r}; lrsurgery "
                                     "adapters carry parameters only")
        else:
            raise BaseMismatchError(f"{where}: the base's {name} has no parameter {p!r}; wrong --base?")
    return {"kind": "full", "tensors": tensors} if tensors else None
