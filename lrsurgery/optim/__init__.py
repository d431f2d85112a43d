"""Optimizers by name: AdamW, GaLore (low-rank gradient projection), Flora (random-projection momentum).

``build_optimizer`` decides which parameters the low-rank optimizers compress: trainable 2-D
weights whose smaller side exceeds the optimizer rank, except embeddings and the output head
(as GaLore's and Flora's authors do); everything else gets the same optimizer uncompressed.
``--lr`` is the step size for every optimizer: the Adafactor-based ones (Flora, GaLore-Adafactor)
are built with ``scale_parameter=False`` instead of scaling the step by each weight's RMS.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from lrsurgery.errors import LrsurgeryError

OPTIMIZERS = ("adamw", "galore", "galore-adafactor", "flora")


@dataclass
class OptimConfig:
    """Optimizer choice and its hyperparameters (defaults: the references' useful ones)."""

    name: str = "adamw"
    rank: int = 128             # GaLore/Flora projection rank (--optim-rank)
    update_gap: int = 200       # GaLore: steps between SVD refreshes (--update-gap)
    scale: float = 0.25         # GaLore: α applied to the projected-back update (--scale)
    proj_type: str = "std"      # GaLore: std | reverse_std | left | right | full
    svd: str = "full"           # GaLore: full | randomized refresh
    kappa: int = 1000           # Flora: steps between projection resamples (--kappa)
    beta1: float = 0.9          # Flora: momentum (the reference's default None disables it)
    layerwise: bool = False     # step each parameter during backward and free its gradient at once
    accumulation_rank: int | None = None  # Flora-style compressed gradient accumulation at this rank
    seed: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def compressible(model: nn.Module, rank: int) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(2-D trainable weights worth projecting at ``rank``, all other trainable parameters).

    LTE's stacked head factors [H, r, n] / [H, m, r] count as H matrices each (one basis per head).
    """
    from lrsurgery.targets import head_names
    skip = set()
    heads = head_names(model)
    for name, m in model.named_modules():
        if isinstance(m, nn.Embedding) or name in heads:
            skip.update(id(p) for p in m.parameters())
    from lrsurgery.layers.lte import lte_parameters
    stacks = {id(p) for p in lte_parameters(model)}  # [H, ·, ·]: one matrix per LTE head
    low, rest = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        matrix = p.dim() == 2 or (p.dim() == 3 and id(p) in stacks)
        (low if matrix and min(p.shape[-2:]) > rank and id(p) not in skip else rest).append(p)
    return low, rest


def build_optimizer(model: nn.Module, config: OptimConfig, lr: float, weight_decay: float = 0.0,
                    accumulation: int = 1) -> Any:
    """The optimizer named by ``config.name`` over the model's trainable parameters.

    With ``config.layerwise`` it is one optimizer per parameter stepped inside backward (see
    ``LayerwiseStepper``), honouring ``accumulation`` micro-batches per step.
    """
    if config.name not in OPTIMIZERS:
        raise LrsurgeryError(f"unknown optimizer {config.name!r}; choose one of {', '.join(OPTIMIZERS)}")
    if config.layerwise:
        from lrsurgery.optim.galore import LayerwiseOptimizer
        low = {id(p) for p in compressible(model, config.rank)[0]} if config.name != "adamw" else set()

        count = iter(range(1, 1 << 62))

        def make(params: list[nn.Parameter]) -> torch.optim.Optimizer:  # one parameter each
            return _build(config, [p for p in params if id(p) in low], [p for p in params if id(p) not in low],
                          lr, weight_decay, seed=config.seed + next(count) - 1)
        params = [p for p in model.parameters() if p.requires_grad]
        return LayerwiseStepper(LayerwiseOptimizer(params, make, accumulation_steps=accumulation))
    low, rest = compressible(model, config.rank) if config.name != "adamw" else ([], None)
    if config.name != "adamw" and not low:
        raise LrsurgeryError(f"{config.name}: no trainable 2-D weight is larger than --optim-rank {config.rank}; "
                             "lower --optim-rank or train full weights (inject --method full)")
    order = {id(p): i for i, p in enumerate(model.parameters())}
    return _build(config, low, rest if rest is not None else [p for p in model.parameters() if p.requires_grad],
                  lr, weight_decay, order=order)


def _build(config: OptimConfig, low: list[nn.Parameter], rest: list[nn.Parameter], lr: float,
           weight_decay: float, seed: int | None = None, order: dict[int, int] | None = None) -> torch.optim.Optimizer:
    """The optimizer over ``low`` (compressed) and ``rest`` (same optimizer, uncompressed) parameters."""
    if config.name == "adamw":
        return torch.optim.AdamW(rest + low, lr=lr, weight_decay=weight_decay)
    if config.name.startswith("galore"):
        from lrsurgery.optim.galore import GaLoreAdafactor, GaLoreAdamW
        groups = ([{"params": rest}] if rest else []) + ([{
            "params": low, "rank": config.rank, "update_proj_gap": config.update_gap, "scale": config.scale,
            "proj_type": config.proj_type, "svd": config.svd}] if low else [])
        if config.name == "galore":
            return GaLoreAdamW(groups, lr=lr, weight_decay=weight_decay)
        return GaLoreAdafactor(groups, lr=lr, weight_decay=weight_decay, scale_parameter=False)
    from lrsurgery.optim.flora import Flora
    # One group per parameter, in the model's order: Flora numbers its projection seeds by position,
    # so the whole-model optimizer and the per-layer ones draw the same projections.
    compressed = {id(p) for p in low}
    ordered = sorted(low + rest, key=lambda p: order.get(id(p), 0)) if order else low + rest
    groups = [{"params": [p]} if id(p) in compressed else {"params": [p], "rank": None} for p in ordered]
    return Flora(groups, lr=lr, rank=config.rank, kappa=config.kappa, beta1=config.beta1, weight_decay=weight_decay,
                 seed=config.seed if seed is None else seed, scale_parameter=False)


class LayerwiseStepper:
    """A ``LayerwiseOptimizer`` behind the optimizer interface the trainer uses.

    The per-parameter optimizers step inside backward, so ``step`` and ``zero_grad`` do nothing;
    ``param_groups`` and ``state`` expose all of theirs (schedules set the LR through them).
    Gradient clipping cannot work here: each gradient is freed before the others exist.
    """

    def __init__(self, inner) -> None:
        self.inner = inner

    @property
    def param_groups(self) -> list[dict]:
        return [g for opt in self.inner.optimizers for g in opt.param_groups]

    @property
    def state(self) -> dict:
        return {p: s for opt in self.inner.optimizers for p, s in opt.state.items()}

    def step(self) -> None:
        """Nothing: every parameter was stepped during backward."""

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Nothing: gradients were freed during backward."""

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state)
