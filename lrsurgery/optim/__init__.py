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
    seed: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def compressible(model: nn.Module, rank: int) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(2-D trainable weights worth projecting at ``rank``, all other trainable parameters)."""
    from lrsurgery.targets import head_names
    skip = set()
    heads = head_names(model)
    for name, m in model.named_modules():
        if isinstance(m, nn.Embedding) or name in heads:
            skip.update(id(p) for p in m.parameters())
    low, rest = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (low if p.dim() == 2 and min(p.shape) > rank and id(p) not in skip else rest).append(p)
    return low, rest


def build_optimizer(model: nn.Module, config: OptimConfig, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """The optimizer named by ``config.name`` over the model's trainable parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    if config.name not in OPTIMIZERS:
        raise LrsurgeryError(f"unknown optimizer {config.name!r}; choose one of {', '.join(OPTIMIZERS)}")
    if config.name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    low, rest = compressible(model, config.rank)
    if not low:
        raise LrsurgeryError(f"{config.name}: no trainable 2-D weight is larger than --optim-rank {config.rank}; "
                             "lower --optim-rank or train full weights (inject --method full)")
    if config.name.startswith("galore"):
        from lrsurgery.optim.galore import GaLoreAdafactor, GaLoreAdamW
        group = {"params": low, "rank": config.rank, "update_proj_gap": config.update_gap, "scale": config.scale,
                 "proj_type": config.proj_type, "svd": config.svd}
        groups = [g for g in ({"params": rest}, group) if g["params"]]
        if config.name == "galore":
            return GaLoreAdamW(groups, lr=lr, weight_decay=weight_decay)
        return GaLoreAdafactor(groups, lr=lr, weight_decay=weight_decay, scale_parameter=False)
    from lrsurgery.optim.flora import Flora
    return Flora([{"params": rest, "rank": None}, {"params": low}] if rest else [{"params": low}],
                 lr=lr, rank=config.rank, kappa=config.kappa, beta1=config.beta1,
                 weight_decay=weight_decay, seed=config.seed, scale_parameter=False)
