"""LTE in the trainer: the merge schedule, and head ownership under ``torchrun``.

Single process: every T optimizer steps (and after the last one) each ``LTELinear`` folds
(s/H) Σ_h (B_h A_h − B_h⁰ A_h⁰) into W and every ``HeadReplicas`` averages its copies.

W processes (H divisible by W): rank k owns heads [kH/W, (k+1)H/W) and takes the k-th contiguous
slice of every global micro-batch, which is exactly the data those heads see in one process. There
is no DDP: heads are private, so no gradient is ever communicated. Each rank's loss is scaled by
1/W so that a head's gradient is the one-process gradient (the global mean over the whole batch).
At a merge, ranks all-gather only the heads' low-rank factors (2·H·r(m+n) numbers per layer, against
m·n for one DDP gradient all-reduce) and the replicas' small tensors, and every rank computes the
same ΔW from all heads in the same order, so all copies of W stay bit-identical.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lrsurgery.errors import TrainingError
from lrsurgery.layers.lte import HeadReplicas, LTELinear, MergeEvery, lte_delta
from lrsurgery.surgery import adapter_config, lte_layers
from lrsurgery.train.distributed import World


def has_lte(model: nn.Module) -> bool:
    return bool(lte_layers(model))


def prepare(model: nn.Module, w: World, micro_batch: int) -> None:
    """Check the batch splits over the heads and, under torchrun, keep only this rank's heads.

    Call before the optimizer is built: sharding replaces the head parameters.
    """
    layers = lte_layers(model)
    heads = {m.total_heads if isinstance(m, LTELinear) else m.heads for m in layers.values()}
    if len(heads) != 1:
        raise TrainingError(f"LTE layers disagree on the number of heads ({sorted(heads)}); re-inject the run")
    h = heads.pop()
    modes = {m.mode for m in layers.values() if isinstance(m, LTELinear)}
    if w.size > 1:
        if modes != {"parallel"}:
            raise TrainingError("LTE over several processes needs the parallel mode (each rank owns its heads)")
        if h % w.size:
            raise TrainingError(f"LTE with {h} heads cannot be split over {w.size} processes: use a number of "
                                f"processes that divides {h}")
        owned = {id(p) for m in layers.values() for p in m.parameters()}
        stray = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in owned]
        if stray:
            raise TrainingError(f"{stray[0]} trains outside the LTE heads and replicas; under torchrun every "
                                "trained module must be an LTE layer or a --train replica")
    local = micro_batch // w.size
    if local % (h // w.size) and modes != {"multihead"}:
        raise TrainingError(f"LTE needs every batch to split evenly over its heads: a micro-batch of "
                            f"{micro_batch} examples over {w.size} process(es) gives {local} per process for "
                            f"{h // w.size} head(s); make --batch-size / --accumulation a multiple of {h}")
    if w.size > 1:
        per = h // w.size
        for m in layers.values():
            _shard(m, w.rank * per, (w.rank + 1) * per)


@torch.no_grad()
def _shard(m: nn.Module, lo: int, hi: int) -> None:
    if isinstance(m, HeadReplicas):
        m.replicas = nn.ModuleList(list(m.replicas)[lo:hi])
        m.heads = hi - lo
        return
    for name in ("lora_A", "lora_B"):
        old = getattr(m, name)
        setattr(m, name, nn.Parameter(old[lo:hi].clone(), requires_grad=old.requires_grad))
    for name in ("prev_A", "prev_B"):
        if getattr(m, name) is not None:
            setattr(m, name, getattr(m, name)[lo:hi].clone())
    m.heads, m.head_offset = hi - lo, lo


def _gather(t: torch.Tensor, w: World) -> torch.Tensor:
    """Every rank's ``t`` [k, …] concatenated in rank order: [W·k, …]."""
    parts = [torch.empty_like(t) for _ in range(w.size)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


@torch.no_grad()
def merge(model: nn.Module, w: World) -> int:
    """Merge every LTE layer and replica set (all ranks' heads); returns how many were merged."""
    layers = lte_layers(model)
    for m in layers.values():
        if w.size == 1:
            m.merge()
        elif isinstance(m, LTELinear):
            a, b = _gather(m.lora_A, w), _gather(m.lora_B, w)
            pa, pb = _gather(m.prev_A, w), _gather(m.prev_B, w)
            m.merge(lte_delta(a, b, pa, pb, m.scaling, m.total_heads, m.fan_in_fan_out, m.weight.dtype))
        else:  # replicas: the mean over every rank's copies, stacked in head order as one process does
            m.merge(gather=lambda t: _gather(t, w))
    return len(layers)


@torch.no_grad()
def unshard(model: nn.Module, w: World) -> None:
    """Give every rank all heads again (after the final merge), so rank 0 can save them."""
    if w.size == 1:
        return
    import copy
    for m in lte_layers(model).values():
        if isinstance(m, HeadReplicas):  # merged: every copy is the same
            m.replicas = nn.ModuleList([m.replicas[0]] + [copy.deepcopy(m.replicas[0])
                                                          for _ in range(m.heads * w.size - 1)])
            m.heads = len(m.replicas)
            continue
        for name in ("lora_A", "lora_B"):
            old = getattr(m, name)
            setattr(m, name, nn.Parameter(_gather(old.detach(), w), requires_grad=old.requires_grad))
        for name in ("prev_A", "prev_B"):
            setattr(m, name, _gather(getattr(m, name), w))
        m.heads, m.head_offset = m.total_heads, 0


class LTESchedule(MergeEvery):
    """The trainer's ``MergeEvery``: also merges after the last step, and merges all ranks' heads together."""

    def __init__(self, model: nn.Module, optimizer: Any, total: int, w: World) -> None:
        config = adapter_config(model)
        if config is None or not config.merge_every:
            raise TrainingError("the model has LTE layers but no merge interval; inject with --merge-every T")
        super().__init__(model, config.merge_every, optimizer, config.reset_optimizer)
        self.total, self.w = total, w

    def after_step(self, step: int) -> dict[str, Any] | None:
        if step % self.every and step != self.total:
            return None
        merge(self.model, self.w)
        if self.reset_optimizer:
            self.zero_state()
        self.merges += 1
        return {"lte_merge": self.merges}
