"""LTE, LoRA-the-Explorer (Huh et al., 2024, arXiv 2402.16828): full-rank training through H LoRA heads.

One frozen weight W (m×n) and H heads (A_h: r×n, B_h: m×r), s = alpha / r. The batch is cut into H
contiguous chunks along dim 0; chunk h is the batch of head h, as if each head were one worker:

        x = [x_1; x_2; …; x_H]               (batch % H == 0)
                  ┌────────────── W, b (frozen between merges) ──────────────┐
        x_h ─────►│                                                          ├──(+)──► y_h
              │   └──────────────────────────────────────────────────────────┘   ▲
              └──► A_h (r×n) ──► B_h (m×r) ──► · s ──(−) s·B_h⁰ A_h⁰ x_h ────────┘

    'parallel' (the reference's reset-less 'ddp' mode, default):
        y_h   = W x_h + b + s·(B_h A_h − B_h⁰ A_h⁰) x_h
        merge:  W ← W + (1/H) Σ_h s·(B_h A_h − B_h⁰ A_h⁰),   then (A_h⁰, B_h⁰) ← (A_h, B_h)
    'multihead' (the reference's 'mhlora'): every head sees the whole batch
        y     = W x + b + s·Σ_h B_h A_h x
        merge:  W ← W + s·Σ_h B_h A_h,   then B ← 0     (not in the reference; the output is unchanged)

(A⁰, B⁰) are buffers holding the heads at the last merge. A parallel merge re-initialises nothing and
keeps the optimizer state, so right after a merge every head's local model is exactly the merged W
(B_h A_h − B_h⁰ A_h⁰ = 0), and between merges it is W plus that head's change since the merge. Because
every merge adds an average of H rank-2r changes, W − W0 can reach full rank.

Init (as in the reference): each A_h is orthogonal with gain √(n/r) (A_h A_hᵀ = (n/r)·I when r ≤ n),
a different random draw per head; B = 0; A⁰ = A, B⁰ = B. So at init the output equals the base layer's.
Evaluation (``model.eval()``) in parallel mode uses only the merged W: changes made since the last merge
are ignored, as in the reference. Merges add in at least fp32 (low-precision merges lose updates).

Memory per layer (parallel): W plus H·r(m+n) × (factor + snapshot + grad + 2 Adam moments).
Trainable non-linear modules (norms, heads) become ``HeadReplicas``: H copies, chunk h through copy h,
parameters averaged at each merge. The reference's defaults: r=8, alpha=16; its paper regime is r=32,
alpha in {1024…8192}, 32 heads, merging every 1–10 steps, with LR 0.05–0.1× the usual one.
"""

from __future__ import annotations

import copy
from typing import Callable, Sequence

import torch
from torch import nn

from lrsurgery.errors import ShapeMismatchError, TargetError, TrainingError
from lrsurgery.layers.lora import LoRALinear, linear_shape

MODES = {"parallel": "parallel", "ddp": "parallel", "multihead": "multihead", "mhlora": "multihead"}


def canonical_mode(mode: str) -> str:
    """The mode's own name (aliases: ddp → parallel, mhlora → multihead); a clear error for any other."""
    if mode not in MODES:
        raise TargetError(f"LTE mode must be one of {', '.join(MODES)}, got {mode!r} "
                          "(the reference's 'dmp' mode needs one device per head and is not supported)")
    return MODES[mode]


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[batch, …, n] → [H, batch/H·…, n]: head h gets the h-th contiguous chunk of dim 0."""
    if x.dim() < 2 or x.size(0) % heads:
        size = x.size(0) if x.dim() >= 2 else "no batch dimension"
        raise TrainingError(f"LTE needs a batch divisible by the number of heads: batch size {size}, "
                            f"heads H={heads}; use a batch size that is a multiple of {heads}")
    return x.reshape(heads, -1, x.size(-1))


class LTELinear(nn.Module):
    """H LoRA heads on one ``nn.Linear`` or ``Conv1D``; W and b change only through ``merge()``.

    Args:
        base: the layer to wrap; its ``weight``/``bias`` Parameters are registered under the same names
            (state-dict keys unchanged), not copied. Freezing them is the caller's job (surgery does it).
        rank: r of each head (≥ 1).
        alpha: numerator of s = alpha / r.
        heads: H (≥ 1); in parallel mode the training batch must be a multiple of H.
        mode: 'parallel' (alias 'ddp') or 'multihead' (alias 'mhlora'); see the module docstring.
        adapter_dtype: dtype of the factors; default: the weight's, float32 for fp16/bf16 weights.
    Raises:
        TargetError: bad rank, heads, mode or layer type. TrainingError: batch not divisible by H.
    """

    def __init__(self, base: nn.Module, rank: int, alpha: float, heads: int, mode: str = "parallel",
                 adapter_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if rank < 1 or heads < 1:
            raise TargetError(f"LTE needs rank ≥ 1 and heads ≥ 1, got rank={rank}, heads={heads}")
        out_f, in_f, fifo = linear_shape(base)
        self.in_features, self.out_features, self.fan_in_fan_out = in_f, out_f, fifo
        self.rank, self.alpha, self.heads, self.mode = rank, float(alpha), heads, canonical_mode(mode)
        self.scaling = self.alpha / rank
        # Under torchrun a rank holds heads [head_offset, head_offset + heads) of total_heads.
        self.head_offset, self.total_heads = 0, heads
        # W at injection (a detached copy, set by surgery): what the merged change is measured from.
        self.initial_weight: torch.Tensor | None = None
        self.weight = base.weight
        self.bias = base.bias
        self._base = [base]  # a list so nn.Module does not register it twice
        w = base.weight
        if adapter_dtype is None:
            adapter_dtype = torch.float32 if w.dtype in (torch.float16, torch.bfloat16) else w.dtype
        kw = dict(device=w.device, dtype=adapter_dtype)
        self.lora_A = nn.Parameter(torch.empty(heads, rank, in_f, **kw))
        self.lora_B = nn.Parameter(torch.zeros(heads, out_f, rank, **kw))
        parallel = self.mode == "parallel"  # multihead mode has no snapshots
        self.register_buffer("prev_A", torch.empty(heads, rank, in_f, **kw) if parallel else None)
        self.register_buffer("prev_B", torch.zeros(heads, out_f, rank, **kw) if parallel else None)
        self.reset_lte()

    @torch.no_grad()
    def reset_lte(self) -> None:
        """A_h ← orthogonal·√(n/r), a distinct draw per head; B ← 0; snapshots ← the factors."""
        gain = (self.in_features / self.rank) ** 0.5
        for a in self.lora_A:
            nn.init.orthogonal_(a, gain=gain)
        self.lora_B.zero_()
        if self.prev_A is not None:
            self.prev_A.copy_(self.lora_A)
            self.prev_B.copy_(self.lora_B)

    @property
    def base_layer(self) -> nn.Module:
        return self._base[0]

    base_forward = LoRALinear.base_forward  # the wrapped layer's own computation, bit for bit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_forward(x)
        if self.mode == "multihead":
            return y + self._multihead_delta(x).to(y.dtype)
        if not self.training:  # evaluation uses the merged W only (changes since the merge are ignored)
            return y
        xh = _split_heads(x.to(self.lora_A.dtype), self.heads)
        now = torch.bmm(torch.bmm(xh, self.lora_A.mT), self.lora_B.mT)
        with torch.no_grad():  # the same ops on the snapshot: exactly `now` right after a merge
            then = torch.bmm(torch.bmm(xh, self.prev_A.mT), self.prev_B.mT)
        return y + ((now - then) * self.scaling).reshape(y.shape).to(y.dtype)

    def _multihead_delta(self, x: torch.Tensor) -> torch.Tensor:
        """s·Σ_h B_h A_h x as one rank-Hr LoRA: [B_1 … B_H] [A_1; …; A_H] x."""
        h, r = self.heads, self.rank
        a = self.lora_A.reshape(h * r, self.in_features)
        b = self.lora_B.permute(1, 0, 2).reshape(self.out_features, h * r)
        return (x.to(a.dtype) @ a.T @ b.T) * self.scaling

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """The pending change of W, in ≥ fp32 and the stored weight's orientation ([in, out] for Conv1D).

        parallel: (1/H) Σ_h s·(B_h A_h − B_h⁰ A_h⁰); multihead: s·Σ_h B_h A_h (see ``lte_delta``).
        """
        return lte_delta(self.lora_A, self.lora_B, self.prev_A, self.prev_B, self.scaling, self.total_heads,
                         self.fan_in_fan_out, self.weight.dtype)

    @torch.no_grad()
    def total_change(self) -> torch.Tensor:
        """W − W_initial plus the pending change: what a merge now would have added since injection."""
        if self.initial_weight is None:
            raise TargetError("this LTE layer does not know its initial weight (set layer.initial_weight)")
        delta = self.delta_weight()
        w0 = self.initial_weight.to(device=delta.device, dtype=delta.dtype)
        return (self.weight.to(delta.dtype) - w0) + delta

    @torch.no_grad()
    def merge(self, delta: torch.Tensor | None = None) -> None:
        """Fold the pending change into W (see ``delta_weight``); optimizer state is not touched.

        parallel: then snapshot (A⁰, B⁰) ← (A, B), nothing is re-initialised. multihead: then B ← 0.
        Either way the training output right after the merge is the output just before it.
        ``delta`` is the change to add when it was computed elsewhere (from every rank's heads).
        """
        w = self.weight
        delta = self.delta_weight() if delta is None else delta
        if delta.shape != w.shape:
            raise ShapeMismatchError(f"ΔW has shape {list(delta.shape)} but the weight has {list(w.shape)}")
        w.copy_((w.to(delta.dtype) + delta.to(w.device)).to(w.dtype))
        if self.mode == "parallel":
            self.prev_A.copy_(self.lora_A)
            self.prev_B.copy_(self.lora_B)
        else:
            self.lora_B.zero_()

    # The wrapped module with this layer's merged weight and bias, as LoRA's (call ``merge()`` first
    # to keep the change since the last merge).
    eject = LoRALinear.eject

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, heads={self.heads}, rank={self.rank}, "
                f"alpha={self.alpha:g}, scaling={self.scaling:g}, mode={self.mode}"
                f"{', fan_in_fan_out' if self.fan_in_fan_out else ''}")


def lte_delta(a: torch.Tensor, b: torch.Tensor, prev_a: torch.Tensor | None, prev_b: torch.Tensor | None,
              scaling: float, total_heads: int, fan_in_fan_out: bool, weight_dtype: torch.dtype) -> torch.Tensor:
    """The change an LTE merge adds to W, from heads a [H, r, n], b [H, m, r] (and snapshots).

    With snapshots (parallel): (s/H) Σ_h (B_h A_h − B_h⁰ A_h⁰); without (multihead): s Σ_h B_h A_h.
    One matmul of the factors concatenated along the rank, so no [H, m, n] tensor is built; a
    function of the heads alone, so every rank holding all heads computes the same bits.
    """
    dtype = torch.promote_types(torch.promote_types(a.dtype, weight_dtype), torch.float32)
    a, b = a.to(dtype), b.to(dtype)
    factor = scaling
    if prev_a is not None:
        a = torch.cat([a, prev_a.to(dtype)], dim=1)
        b = torch.cat([b, -prev_b.to(dtype)], dim=2)
        factor /= total_heads
    k = a.shape[0] * a.shape[1]
    out_f, in_f = b.shape[1], a.shape[2]
    delta = (b.permute(1, 0, 2).reshape(out_f, k) @ a.reshape(k, in_f)) * factor
    return delta.T if fan_in_fan_out else delta


def _stack(group: Sequence[torch.Tensor]) -> torch.Tensor:
    """The copies of one tensor stacked along a new dim 0, in at least fp32 (so a mean loses nothing)."""
    dtype = torch.promote_types(group[0].dtype, torch.float32)
    return torch.stack([t.to(dtype) for t in group])


class HeadReplicas(nn.Module):
    """H copies of a trainable non-linear module (a norm, a classifier head), one per LTE head.

    Training: the batch (dim 0) is cut into H contiguous chunks and chunk h goes through copy h; the
    outputs are concatenated. Evaluation uses copy 0. ``merge()`` sets every copy's floating-point
    parameters and buffers to their mean over copies. Copy 0 is the wrapped module itself (so it keeps
    its parameters' identity); the others are deep copies. Extra arguments go unchanged to every copy.
    """

    def __init__(self, module: nn.Module, heads: int) -> None:
        super().__init__()
        if heads < 1:
            raise TargetError(f"HeadReplicas needs heads ≥ 1, got {heads}")
        self.heads = heads
        self.replicas = nn.ModuleList([module] + [copy.deepcopy(module) for _ in range(heads - 1)])

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if not self.training:
            return self.replicas[0](x, *args, **kwargs)
        if x.dim() < 1 or x.size(0) % self.heads:
            raise TrainingError(f"LTE replicas need a batch divisible by the number of heads: batch size "
                                f"{x.size(0) if x.dim() else 'none'}, heads H={self.heads}")
        chunks = x.chunk(self.heads, dim=0)
        return torch.cat([m(c, *args, **kwargs) for m, c in zip(self.replicas, chunks)], dim=0)

    @torch.no_grad()
    def merge(self, gather: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        """Every copy's floating-point parameters and buffers ← their mean over the copies (in ≥ fp32).

        ``gather`` extends the stack [k, …] of this process's copies to all copies (under torchrun).
        """
        def tensors(m: nn.Module) -> list[torch.Tensor]:
            return [t for t in [*m.parameters(), *m.buffers()] if t.is_floating_point()]

        for group in zip(*(tensors(m) for m in self.replicas)):
            stacked = _stack(group)
            mean = (stacked if gather is None else gather(stacked)).mean(0)
            for t in group:
                t.copy_(mean.to(t.dtype))

    @torch.no_grad()
    def mean_parameters(self) -> dict[str, torch.Tensor]:
        """The copies' parameters averaged as ``merge`` would, without changing them (what is saved)."""
        copies = [dict(m.named_parameters()) for m in self.replicas]
        return {p: _stack([c[p] for c in copies]).mean(0).to(t.dtype) for p, t in copies[0].items()}

    def extra_repr(self) -> str:
        return f"heads={self.heads}"


def lte_modules(model: nn.Module) -> list[nn.Module]:
    """Every ``LTELinear`` and ``HeadReplicas`` of a model, in module order (nested ones too: all merge)."""
    return [m for m in model.modules() if isinstance(m, (LTELinear, HeadReplicas))]


def lte_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The outermost ``LTELinear`` and ``HeadReplicas`` by module name: what surgery replaces or saves."""
    found: dict[str, nn.Module] = {}
    for n, m in model.named_modules():
        if isinstance(m, (LTELinear, HeadReplicas)) and not any(n.startswith(f"{k}.") for k in found):
            found[n] = m
    return found


def lte_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The LTE factors (``lora_A``, ``lora_B``) of every ``LTELinear`` in the model."""
    return [p for m in model.modules() if isinstance(m, LTELinear) for p in (m.lora_A, m.lora_B)]


@torch.no_grad()
def merge_lte(model: nn.Module) -> int:
    """Merge every ``LTELinear`` and ``HeadReplicas`` of the model; returns how many were merged."""
    modules = lte_modules(model)
    for m in modules:
        m.merge()
    return len(modules)


class MergeEvery:
    """Merge schedule: call ``after_step(step)`` after optimizer step ``step`` (1-based); merges when
    ``step % every == 0`` (the reference's ``MergeCondition``).

    The reference keeps the optimizer state across merges (the default here). With
    ``reset_optimizer=True`` the floating-point state of the LTE factors (Adam's moments; not ``step``)
    is zeroed at each merge, which needs the ``optimizer``.
    """

    def __init__(self, model: nn.Module, every: int, optimizer: torch.optim.Optimizer | None = None,
                 reset_optimizer: bool = False) -> None:
        if every < 1:
            raise TrainingError(f"the LTE merge interval must be ≥ 1 step, got {every}")
        if reset_optimizer and optimizer is None:
            raise TrainingError("reset_optimizer=True needs the optimizer: MergeEvery(model, T, optimizer, True)")
        if not lte_modules(model):
            raise TrainingError("the model has no LTE layers to merge: wrap its linears in LTELinear first")
        self.model, self.every, self.optimizer, self.reset_optimizer = model, every, optimizer, reset_optimizer
        self.merges = 0

    def after_step(self, step: int) -> dict | None:
        """Merge on schedule; returns ``{"step", "merge", "modules"}`` when it merged, else None."""
        if step % self.every:
            return None
        n = merge_lte(self.model)
        if self.reset_optimizer:
            self.zero_state()
        self.merges += 1
        return {"step": step, "merge": self.merges, "modules": n}

    @torch.no_grad()
    def zero_state(self) -> None:
        """Zero the optimizer's floating-point state tensors of the LTE factors (keeps ``step``)."""
        for p in lte_parameters(self.model):
            for key, t in self.optimizer.state.get(p, {}).items():
                if torch.is_tensor(t) and t.is_floating_point() and t.dim() > 0 and key != "step":
                    t.zero_()

    def state_dict(self) -> dict:
        return {"merges": self.merges}

    def load_state_dict(self, state: dict) -> None:
        self.merges = state["merges"]
