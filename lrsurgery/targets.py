r"""Which modules to rewrite, with PEFT's matching rules, per-family presets, and a report.

Rules (identical to PEFT's ``target_modules``):
  * a list entry matches a module whose full name equals it or ends with ``"." + entry``
    (``q_proj`` matches ``model.layers.0.self_attn.q_proj``; ``proj`` does not);
  * a single string with regex characters (``*+?[]()|^$\``) is a regex that must ``fullmatch`` the
    full name; a plain string such as ``"attn.qkv,mlp.fc2"`` is read as a comma-separated list;
  * ``all-linear`` is every Linear/Conv1D except the output head; ``preset`` is the family preset.
Only Linear and Conv1D layers can take LoRA; ``--train`` patterns select any module to train in full.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from typing import Iterable, Sequence, Union

from torch import nn

from lrsurgery.errors import TargetError
from lrsurgery.layers.lora import is_linear

PRESETS: dict[str, list[str]] = {
    "vit": ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "bert": ["query", "key", "value", "dense"],
    # transformers' ViT in v5 (v4 named them like BERT: query/key/value/dense)
    "hf-vit": ["q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"],
}
_MODEL_TYPE_FAMILY = {"gpt2": "gpt2", "llama": "llama", "mistral": "llama", "qwen2": "llama", "qwen3": "llama",
                      "gemma": "llama", "bert": "bert", "roberta": "bert", "distilbert": "bert", "vit": "hf-vit"}

TargetSpec = Union[str, Sequence[str], None]


@dataclass
class TargetReport:
    """What a target spec matched in a model: adapted modules, heads left alone, misses."""

    spec: list[str] | str
    matched: list[str] = field(default_factory=list)
    per_entry: dict[str, int] = field(default_factory=dict)
    not_linear: list[str] = field(default_factory=list)
    excluded: list[str] = field(default_factory=list)

    @property
    def unmatched_entries(self) -> list[str]:
        return [e for e, n in self.per_entry.items() if n == 0]


def family(model: nn.Module) -> str | None:
    """The model family whose preset applies: vit (timm), hf-vit, gpt2, llama, bert — or None."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    names = {n for n, _ in model.named_modules()}
    if model_type == "vit" and not any(n.endswith(".q_proj") for n in names):
        return "bert"  # transformers < 5 names ViT's layers like BERT's
    if model_type in _MODEL_TYPE_FAMILY:
        return _MODEL_TYPE_FAMILY[model_type]
    if any(n.endswith("attn.qkv") for n in names) and any(n.endswith("mlp.fc1") for n in names):
        return "vit"
    return None


def head_names(model: nn.Module) -> set[str]:
    """Full names of the output head(s): timm's classifier, transformers' output embeddings, score/classifier."""
    names: set[str] = set()
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    classifier = cfg.get("classifier") if isinstance(cfg, dict) else None
    for c in ([classifier] if isinstance(classifier, str) else list(classifier or [])):
        names.add(c)
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    for n, m in model.named_modules():
        if (out is not None and m is out) or n.split(".")[-1] in ("score", "classifier", "lm_head"):
            names.add(n)
    return names


def entry_matches(name: str, entry: str) -> bool:
    """PEFT's list rule: exact name, or a ``.``-suffix of the full module name."""
    return name == entry or name.endswith("." + entry)


def split_spec(values: Iterable[str] | str | None) -> list[str]:
    """Flatten CLI-style values: each may be comma-separated; blanks dropped."""
    if values is None:
        return []
    if isinstance(values, str):
        values = [values]
    return [p.strip() for v in values for p in v.split(",") if p.strip()]


def match_modules(model: nn.Module, spec: list[str] | str) -> tuple[list[str], dict[str, int]]:
    """Names of all modules (any type) matched by ``spec``, and how many each list entry matched."""
    names = [n for n, _ in model.named_modules() if n]
    if isinstance(spec, str):
        try:
            rx = re.compile(spec)
        except re.error as e:
            raise TargetError(f"target regex {spec!r} is invalid: {e}")
        hits = [n for n in names if rx.fullmatch(n)]
        return hits, {spec: len(hits)}
    per_entry = {e: 0 for e in spec}
    hits = []
    for n in names:
        matched = [e for e in spec if entry_matches(n, e)]
        for e in matched:
            per_entry[e] += 1
        if matched:
            hits.append(n)
    return hits, per_entry


def resolve_targets(model: nn.Module, targets: TargetSpec = None, exclude: Iterable[str] = ()) -> TargetReport:
    """Resolve a target spec to Linear/Conv1D module names; raise with the closest names if none match.

    ``targets`` is a list (PEFT list rule), a regex string, ``"all-linear"``, ``"preset"`` or None
    (= the family preset). Modules in ``exclude`` (those trained in full) are never targeted.
    """
    modules = dict(model.named_modules())
    heads = head_names(model)
    exclude = set(exclude)
    spec = _expand(model, targets)

    def excluded(n: str) -> bool:  # a module trained in full, or inside one
        return any(n == e or n.startswith(e + ".") or e == "" for e in exclude)
    if spec == "all-linear":
        matched = [n for n, m in modules.items() if n and is_linear(m) and n not in heads and not excluded(n)]
        report = TargetReport(spec="all-linear", matched=matched, per_entry={"all-linear": len(matched)},
                              excluded=sorted(heads & set(modules)))
    else:
        hits, per_entry = match_modules(model, spec)
        report = TargetReport(spec=spec, per_entry=per_entry)
        for n in hits:
            if excluded(n):
                report.excluded.append(n)
            elif is_linear(modules[n]):
                report.matched.append(n)
            else:
                report.not_linear.append(n)
    if not report.matched:
        raise TargetError(_nothing_matched(model, spec, report))
    explicit = isinstance(spec, list) and spec not in PRESETS.values()  # a preset may name absent modules
    missing = [e for e, n in report.per_entry.items() if n == 0] if explicit else []
    if missing:  # a typo in one of several entries would otherwise silently adapt fewer layers
        msg = _nothing_matched(model, missing, TargetReport(spec=missing))
        raise TargetError(msg.replace("matched no Linear/Conv1D module", "matched no module (the other entries did)", 1))
    return report


def _expand(model: nn.Module, targets: TargetSpec) -> list[str] | str:
    if targets is None or (isinstance(targets, str) and targets == "preset") or (
            not isinstance(targets, str) and list(targets) == ["preset"]):
        fam = family(model)
        if fam is None:
            raise TargetError("no target preset for this model's family; name targets explicitly, e.g. "
                              "--targets all-linear or --targets attn.qkv,mlp.fc2 (see `lrsurgery inspect MODEL`)")
        return PRESETS[fam]
    if isinstance(targets, str) and _is_regex(targets):
        return targets
    entries = split_spec(targets)
    if entries == ["all-linear"]:
        return "all-linear"
    if len(entries) == 1 and entries[0] in PRESETS:
        return PRESETS[entries[0]]
    return entries


def _nothing_matched(model: nn.Module, spec: list[str] | str, report: TargetReport) -> str:
    linear = [n for n, m in model.named_modules() if n and is_linear(m)]
    suffixes = sorted({".".join(n.split(".")[-k:]) for n in linear for k in (1, 2)})
    queries = [spec] if isinstance(spec, str) else list(spec)
    close = sorted({c for q in queries for c in difflib.get_close_matches(q, suffixes, n=3, cutoff=0.4)})
    msg = f"targets {spec!r} matched no Linear/Conv1D module"
    if report.not_linear:
        msg += f" (they matched non-linear modules: {report.not_linear[:4]})"
    if close:
        msg += f"; closest names: {', '.join(close[:6])}"
    elif suffixes:
        msg += f"; linear modules look like: {', '.join(suffixes[:6])}"
    return msg + ". Run `lrsurgery inspect MODEL` to list every module."


def resolve_train(model: nn.Module, patterns: TargetSpec) -> list[str]:
    """Modules trained in full (e.g. a new head): PEFT matching, outermost matches only, none → error."""
    entries = split_spec(patterns) if not (isinstance(patterns, str) and _is_regex(patterns)) else patterns
    if not entries:
        return []
    hits, per_entry = match_modules(model, entries)
    missing = [e for e, n in per_entry.items() if n == 0]
    if missing:
        names = [n for n, _ in model.named_modules() if n]
        close = difflib.get_close_matches(missing[0], names, n=4, cutoff=0.4)
        raise TargetError(f"--train {missing[0]!r} matched no module"
                          + (f"; closest names: {', '.join(close)}" if close else "")
                          + ". Run `lrsurgery inspect MODEL` to list every module.")
    outer = [n for n in hits if not any(n.startswith(o + ".") for o in hits if o != n)]
    return outer


def _is_regex(s: str) -> bool:
    """A value with regex characters is a regex (a plain comma-separated value is a list)."""
    return any(c in s for c in "*+?[]()|^${}\\")
