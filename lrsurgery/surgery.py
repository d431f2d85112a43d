"""Replace target modules with low-rank layers in place, list them, and put plain modules back.

Injection freezes every base parameter; only adapter factors and the modules named by ``train``
(trained in full, e.g. a new classification head) stay trainable.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

import torch
from torch import nn

from lrsurgery.errors import LrsurgeryError, TargetError
from lrsurgery.layers.lora import LoRALinear
from lrsurgery.layers.lte import HeadReplicas, LTELinear, canonical_mode, lte_layers
from lrsurgery.targets import TargetReport, TargetSpec, resolve_targets, resolve_train

METHODS = ("lora", "full", "velora", "lte")


@dataclass
class AdapterConfig:
    """How a model was injected: recorded on the model and in the run directory's recipe."""

    method: str = "lora"
    rank: int = 8
    alpha: float = 16.0
    rslora: bool = False
    dropout: float = 0.0
    targets: list[str] = field(default_factory=list)   # resolved module names
    train: list[str] = field(default_factory=list)     # modules trained in full
    groups: int | None = None          # VeLoRA sub-token groups (method "velora")
    velora_groups: int | None = None   # VeLoRA on LoRA's A branch (method "lora")
    heads: int | None = None           # LTE: LoRA heads per layer (method "lte")
    merge_every: int | None = None     # LTE: optimizer steps between merges
    lte_mode: str | None = None        # LTE: "parallel" (batch split over heads) or "multihead"
    reset_optimizer: bool = False      # LTE: zero the heads' optimizer state at each merge

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class InjectReport:
    config: AdapterConfig
    targets: TargetReport | None
    trainable_params: int
    total_params: int


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at dotted path ``name``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """Every LoRA layer in the model, by full module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def adapter_config(model: nn.Module) -> AdapterConfig | None:
    return getattr(model, "lrsurgery_adapter", None)


def inject(model: nn.Module, method: str = "lora", rank: int = 8, alpha: float | None = None,
           targets: TargetSpec = None, train: TargetSpec = None, dropout: float = 0.0, rslora: bool = False,
           adapter_dtype: torch.dtype | None = None, groups: int | None = None,
           velora_groups: int | None = None, heads: int | None = None, merge_every: int | None = None,
           lte_mode: str = "parallel", reset_optimizer: bool = False) -> InjectReport:
    """Freeze ``model`` and wrap its target Linear/Conv1D layers with LoRA, in place.

    ``alpha`` defaults to ``rank`` (scaling 1). ``targets`` follows PEFT's rules (see
    ``lrsurgery.targets``); ``train`` names modules to train in full (never adapted).
    ``method="full"`` adds no adapter: it trains the ``train`` modules, by default the whole model.
    ``method="velora"`` trains the target layers in full with VeLoRA-compressed saved inputs
    (``groups`` sub-tokens per token); ``velora_groups`` applies VeLoRA to LoRA's A branch.
    ``method="lte"`` wraps the targets with ``heads`` LoRA heads of ``rank`` each, merged into W every
    ``merge_every`` optimizer steps by the trainer; the ``train`` modules become per-head replicas.
    """
    if method not in METHODS:
        raise LrsurgeryError(f"unknown method {method!r}; this version knows: {', '.join(METHODS)}")
    if lora_modules(model):
        raise LrsurgeryError("the model already has LoRA layers; merge or eject them before injecting again")
    if rank < 1:
        raise TargetError(f"rank must be ≥ 1, got {rank}")
    if not 0.0 <= dropout < 1.0:
        raise LrsurgeryError(f"dropout must be in [0, 1), got {dropout}")
    alpha = float(rank if alpha is None else alpha)
    _check_method_options(method, groups=groups, velora_groups=velora_groups, heads=heads, merge_every=merge_every,
                          lte_mode=lte_mode, reset_optimizer=reset_optimizer, dropout=dropout, rslora=rslora)
    if method == "velora" and not groups:
        raise LrsurgeryError("--method velora needs --groups G (sub-tokens per token; G must divide the width)")
    if method == "lte":
        if not heads or heads < 1 or not merge_every or merge_every < 1:
            raise LrsurgeryError("--method lte needs --heads H ≥ 1 and --merge-every T ≥ 1 (steps between merges)")
        lte_mode = canonical_mode(lte_mode)
    if method == "full":
        train_names = resolve_train(model, train) if train else [""]  # "" = the whole model
        report = None
    else:
        train_names = resolve_train(model, train)
        report = resolve_targets(model, targets, exclude=train_names)
    for p in model.parameters():
        p.requires_grad_(False)
    for name in (report.matched if report else []):
        set_submodule(model, name, _wrap(model.get_submodule(name), method, rank, alpha, dropout, rslora,
                                         adapter_dtype, groups, velora_groups, heads, lte_mode))
    for name in train_names:
        for p in model.get_submodule(name).parameters():
            p.requires_grad_(True)
        if method == "lte":  # each head trains its own copy; merges average them
            set_submodule(model, name, HeadReplicas(model.get_submodule(name), heads))
    lora, lte = method == "lora", method == "lte"
    config = AdapterConfig(method, rank if lora or lte else 0, alpha if lora or lte else 0.0, rslora, dropout,
                           list(report.matched) if report else [], train_names, groups if method == "velora" else None,
                           velora_groups if lora else None, heads if lte else None, merge_every if lte else None,
                           lte_mode if lte else None, reset_optimizer if lte else False)
    model.lrsurgery_adapter = config
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return InjectReport(config, report, trainable, sum(p.numel() for p in model.parameters()))


def _check_method_options(method: str, **given: Any) -> None:
    """Refuse options the chosen method would silently ignore (a wrong --method is the likely mistake)."""
    owner = {"groups": "velora", "velora_groups": "lora", "heads": "lte", "merge_every": "lte", "lte_mode": "lte",
             "reset_optimizer": "lte"}
    defaults = {"lte_mode": "parallel", "reset_optimizer": False}
    for key, value in given.items():
        if key in owner and value not in (None, defaults.get(key)) and owner[key] != method:
            flag = "--" + key.replace("_", "-")
            raise LrsurgeryError(f"{flag} applies to --method {owner[key]}, not {method}; drop it or change the method")
    if method == "lte" and (given["dropout"] or given["rslora"]):
        raise LrsurgeryError("LTE heads have no dropout or rsLoRA scaling (s = alpha/r); drop --dropout/--rslora")


def _wrap(base: nn.Module, method: str, rank: int, alpha: float, dropout: float, rslora: bool,
          adapter_dtype: torch.dtype | None, groups: int | None, velora_groups: int | None,
          heads: int | None = None, lte_mode: str = "parallel") -> nn.Module:
    """The low-rank layer that replaces one target module."""
    if method == "lte":
        layer = LTELinear(base, rank, alpha, heads, lte_mode, adapter_dtype)
        layer.initial_weight = base.weight.detach().clone()  # the merged change is measured from it
        return layer
    if method == "velora":
        from lrsurgery.layers.velora import VeLoRALinear
        layer = VeLoRALinear(base, groups)
        for p in (layer.weight, layer.bias):
            if p is not None:
                p.requires_grad_(True)  # VeLoRA trains the full-rank weight; only its saved input shrinks
        return layer
    if velora_groups:
        from lrsurgery.layers.velora import VeLoRALoRALinear
        return VeLoRALoRALinear(base, rank, alpha, dropout, rslora, adapter_dtype, groups=velora_groups)
    return LoRALinear(base, rank, alpha, dropout, rslora, adapter_dtype)


def velora_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every full-rank VeLoRA layer in the model, by full module name."""
    from lrsurgery.layers.velora import VeLoRALinear
    return {n: m for n, m in model.named_modules() if isinstance(m, VeLoRALinear)}


def wrap_module(model: nn.Module, name: str, rank: int, alpha: float, rslora: bool = False,
                dropout: float = 0.0) -> LoRALinear:
    """Wrap one named module with LoRA (used when applying an adapter file module by module)."""
    layer = LoRALinear(model.get_submodule(name), rank, alpha, dropout, rslora)
    set_submodule(model, name, layer)
    return layer


def eject(model: nn.Module, merge: bool = False, names: Iterable[str] | None = None) -> list[str]:
    """Put the plain modules back, folding the adapters in first when ``merge``; returns the names."""
    for name, layer in velora_modules(model).items():  # full-rank: the weights are already trained in place
        set_submodule(model, name, layer.eject())
    for name, layer in lte_layers(model).items():  # fold pending changes (merge) or drop them
        if merge:
            layer.merge()
        set_submodule(model, name, layer.replicas[0] if isinstance(layer, HeadReplicas) else layer.eject())
    layers = lora_modules(model)
    chosen = list(layers) if names is None else list(names)
    for name in chosen:
        layer = layers[name]
        if merge and not layer.merged:
            layer.merge()
        elif not merge and layer.merged:
            layer.unmerge()
        set_submodule(model, name, layer.eject())
    if not lora_modules(model) and not lte_layers(model) and hasattr(model, "lrsurgery_adapter"):
        del model.lrsurgery_adapter
    return chosen


def merge(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and return the (same) model with plain modules."""
    if not lora_modules(model) and not velora_modules(model) and not lte_layers(model):
        raise LrsurgeryError("the model has no adapters to merge (inject or apply an adapter first)")
    eject(model, merge=True)
    return model
