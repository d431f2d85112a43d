"""ReLoRA (Lialin et al., ICLR'24): high-rank training through periodic merge-and-restart of LoRA.

Every N optimizer steps each LoRA layer folds its update into the frozen weight and restarts:
    W ← W + s·B A;   A ← kaiming-uniform(a=√5), B ← 0
(the reference re-initializes A to zero as well, so A and B get zero gradients until the next
restart — its bug #18; here A is random, so the output is unchanged and training resumes at once).
The optimizer state of the LoRA factors is then pruned, so stale moments of the old subspace do not
drive the new one: ``magnitude`` zeroes the fraction p of entries with the smallest |x|, ``random``
zeroes a random fraction p, ``reset`` zeroes everything. The learning rate follows a jagged cosine:

    t < W:         lr(t) = t / W                                          (first warmup)
    otherwise:     cos(t) = m + (1 − m)·½(1 + cos(π (t − W) / (T − W)))   (global cosine to m)
    restarts:      with c = t mod N, for t ≥ N and c < R:  lr(t) = c / R · cos(t − c + R)
                   (a linear re-warmup to the cosine's value at the ramp's end)

as a multiplier of the base LR, with T total steps, N = restart_every, R = restart_warmup, m =
min_lr_ratio. Reference defaults: restart every 1000–5000, re-warmup 50–100, magnitude pruning 0.9
(README) to 0.99 (paper), min_lr_ratio 0.1. An optional warm start trains full-rank first.
The total change W − W0 stays an exact adapter: folded factors are kept (see ``LoRALinear.fold``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from lrsurgery.errors import LrsurgeryError
from lrsurgery.format import tensor_record
from lrsurgery.layers.lora import LoRALinear

PRUNE_MODES = ("magnitude", "random", "reset")


@dataclass
class ReLoRAConfig:
    restart_every: int = 1000    # N: optimizer steps between merge-and-restarts
    prune: float = 0.99          # fraction of optimizer state zeroed at a restart
    prune_mode: str = "magnitude"
    restart_warmup: int = 50     # R: re-warmup steps after each restart
    warmup: int = 100            # W: first warmup steps
    min_lr_ratio: float = 0.1    # m: the cosine's floor

    def __post_init__(self) -> None:
        if self.restart_every < 1:
            raise LrsurgeryError(f"--restart-every must be ≥ 1, got {self.restart_every}")
        if self.prune_mode not in PRUNE_MODES:
            raise LrsurgeryError(f"--prune-mode must be one of {', '.join(PRUNE_MODES)}, got {self.prune_mode!r}")
        if not 0.0 <= self.prune <= 1.0:
            raise LrsurgeryError(f"--prune must be in [0, 1], got {self.prune}")
        if self.restart_warmup >= self.restart_every:
            raise LrsurgeryError("--restart-warmup must be shorter than --restart-every")

    def as_dict(self) -> dict:
        return asdict(self)


def jagged_cosine(t: int, total: int, config: ReLoRAConfig) -> float:
    """LR multiplier at optimizer step ``t`` (0-based) of ``total``: warmup, cosine, re-warmups."""
    w, n, r, m = config.warmup, config.restart_every, config.restart_warmup, config.min_lr_ratio
    if t < w:
        return t / w

    def cosine(s: int) -> float:
        progress = min(max((s - w) / max(1, total - w), 0.0), 1.0)
        return m + (1.0 - m) * 0.5 * (1.0 + math.cos(math.pi * progress))

    c = t % n
    if t >= n and c < r:
        return c / r * cosine(t - c + r)
    return cosine(t)


@torch.no_grad()
def merge_and_reinit(model: nn.Module) -> int:
    """Fold every LoRA layer's update into its weight and restart it; returns the number of layers."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    for layer in layers:
        if layer.base_weight_record is None:  # remember the original base before changing it
            layer.base_weight_record = tensor_record(layer.weight)
        layer.fold()
    return len(layers)


@torch.no_grad()
def prune_state(optimizer: torch.optim.Optimizer, params: list[nn.Parameter], ratio: float, mode: str,
                generator: torch.Generator | None = None) -> float:
    """Zero a fraction ``ratio`` of the optimizer state of ``params``; returns the fraction zeroed.

    One mask per parameter (and state shape) is applied to all its moments, chosen from the first
    moment ``exp_avg`` when present. The reference prunes each moment on its own, which can keep a
    momentum entry whose second moment was zeroed: Adam then divides it by ε alone and diverges.
    """
    zeroed = total = 0
    for p in params:
        groups: dict[tuple, list[torch.Tensor]] = {}
        state = optimizer.state.get(p, {})
        for key in sorted(state, key=lambda k: k != "exp_avg"):  # exp_avg first: it decides the mask
            t = state[key]
            if torch.is_tensor(t) and t.is_floating_point() and t.dim() > 0 and key != "step":
                groups.setdefault(tuple(t.shape), []).append(t)
        for tensors in groups.values():
            mask = _prune_mask(tensors[0], ratio, mode, generator)
            for t in tensors:
                t.masked_fill_(mask, 0.0)
                zeroed += int(mask.sum())
                total += t.numel()
    return zeroed / total if total else 0.0


def _prune_mask(t: torch.Tensor, ratio: float, mode: str, generator: torch.Generator | None) -> torch.Tensor:
    """Which entries to zero: all (reset), a random fraction, or exactly round(ratio·n) smallest |x|."""
    if mode == "reset" or ratio >= 1.0:
        return torch.ones_like(t, dtype=torch.bool)
    if mode == "random":
        return (torch.rand(t.shape, generator=generator) < ratio).to(t.device)
    k = int(round(ratio * t.numel()))
    mask = torch.zeros(t.numel(), dtype=torch.bool, device=t.device)
    if k:
        mask[torch.argsort(t.abs().flatten(), stable=True)[:k]] = True
    return mask.view(t.shape)


class ReLoRASchedule:
    """Drives ReLoRA during training: call ``after_step(step)`` after each optimizer step (1-based)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, config: ReLoRAConfig, total: int,
                 seed: int = 0) -> None:
        self.model, self.optimizer, self.config, self.total = model, optimizer, config, total
        self.lora_params = [p for m in model.modules() if isinstance(m, LoRALinear) for p in (m.lora_A, m.lora_B)]
        if not self.lora_params:
            raise LrsurgeryError("the relora schedule needs LoRA layers: inject with --method lora")
        self.base_lrs = [g["lr"] for g in optimizer.param_groups]
        self.generator = torch.Generator().manual_seed(seed)
        self.restarts = 0
        self.set_lr(0)

    def set_lr(self, t: int) -> float:
        """Set every group's LR for optimizer step ``t`` (0-based) and return the multiplier."""
        factor = jagged_cosine(t, self.total, self.config)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * factor
        return factor

    def after_step(self, step: int) -> dict | None:
        """After optimizer step ``step``: restart on schedule, then set the LR of the next step."""
        event = None
        if step % self.config.restart_every == 0 and step < self.total:
            merge_and_reinit(self.model)
            fraction = prune_state(self.optimizer, self.lora_params, self.config.prune, self.config.prune_mode,
                                   self.generator)
            self.restarts += 1
            event = {"step": step, "restart": self.restarts, "pruned": fraction}
        self.set_lr(step)
        return event

    def state_dict(self) -> dict:
        return {"restarts": self.restarts, "generator": self.generator.get_state(), "base_lrs": self.base_lrs}

    def load_state_dict(self, state: dict) -> None:
        self.restarts, self.base_lrs = state["restarts"], state["base_lrs"]
        self.generator.set_state(state["generator"])
