"""LoRA: a frozen linear map plus a trainable low-rank update (Hu et al., 2021; rsLoRA: Kalajdzievski, 2023).

                 ┌──────────── W0 (frozen, out×in) ────────────┐
        x ──────►│                                             ├──(+)──► y
            │    └─────────────────────────────────────────────┘   ▲
            └──► dropout ──► A (r×in) ──► B (out×r) ──► · s ───────┘

    y = W0 x + b + s · B A dropout(x)         s = alpha / r   (rsLoRA: alpha / sqrt(r))

A is kaiming-uniform(a=√5) (U(±1/√in), like nn.Linear), B is zero, so at init the layer's output
equals the base layer's output exactly. Merging folds ΔW = s·B A into W0 in place; for transformers'
``Conv1D`` (GPT-2) the weight is stored transposed ([in, out], ``fan_in_fan_out``), and so is ΔW.

The wrapper registers the base layer's own ``weight`` and ``bias`` Parameters under the same names,
so the model's state-dict keys for base weights do not change, and ``eject`` hands back the very
module object that was wrapped.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lrsurgery.errors import ShapeMismatchError, TargetError

try:  # transformers is optional for this module: timm models have no Conv1D
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a runtime dependency
    Conv1D = ()  # type: ignore[assignment,misc]


def is_linear(module: nn.Module) -> bool:
    """True for the layers LoRA can wrap: ``nn.Linear`` and transformers' ``Conv1D``."""
    return isinstance(module, nn.Linear) or (bool(Conv1D) and isinstance(module, Conv1D))


def linear_shape(module: nn.Module) -> tuple[int, int, bool]:
    """(out_features, in_features, fan_in_fan_out) of a Linear or Conv1D."""
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features, False
    if bool(Conv1D) and isinstance(module, Conv1D):
        n_in, n_out = module.weight.shape
        return n_out, n_in, True
    raise TargetError(f"{type(module).__name__} is not a Linear or Conv1D layer and cannot take LoRA")


def lora_scaling(alpha: float, rank: int, rslora: bool = False) -> float:
    """s = alpha/r, or alpha/sqrt(r) for rsLoRA (keeps the update's scale stable as r grows)."""
    return alpha / math.sqrt(rank) if rslora else alpha / rank


class LoRALinear(nn.Module):
    """``y = W0 x + b + s·B A dropout(x)`` around an ``nn.Linear`` or ``Conv1D``; W0 and b stay frozen.

    Args:
        base: the layer to wrap (its parameters are reused, not copied).
        rank: r, the inner dimension of B A (≥ 1).
        alpha: numerator of the scaling s.
        dropout: dropout probability on the adapter branch only.
        rslora: use s = alpha/√r instead of alpha/r.
        adapter_dtype: dtype of A and B; default: the base weight's, but float32 for fp16/bf16 bases
            (low-precision factors lose small updates).
    """

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0,
                 rslora: bool = False, adapter_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if rank < 1:
            raise TargetError(f"LoRA rank must be ≥ 1, got {rank}")
        out_f, in_f, fifo = linear_shape(base)
        self.in_features, self.out_features, self.fan_in_fan_out = in_f, out_f, fifo
        self.rank, self.alpha, self.rslora = rank, float(alpha), rslora
        self.scaling = lora_scaling(self.alpha, rank, rslora)
        self.weight = base.weight
        self.bias = base.bias
        self._base = [base]  # a list so nn.Module does not register it twice
        self.merged = False
        w = base.weight
        if adapter_dtype is None:
            adapter_dtype = torch.float32 if w.dtype in (torch.float16, torch.bfloat16) else w.dtype
        self.lora_A = nn.Parameter(torch.empty(rank, in_f, device=w.device, dtype=adapter_dtype))
        self.lora_B = nn.Parameter(torch.zeros(out_f, rank, device=w.device, dtype=adapter_dtype))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # ReLoRA restarts fold ΔW into W; the folded factors are kept (tiny) so that the total change
        # W − W0 stays an exact low-rank adapter on the original base, whose record is kept too.
        self.register_parameter("lora_bias", None)  # optional Δb (from extraction or PEFT's lora_bias)
        self.register_buffer("folded_A", None, persistent=False)
        self.register_buffer("folded_B", None, persistent=False)
        self.base_weight_record: dict | None = None
        self.reset_lora()

    def reset_lora(self) -> None:
        """A ← kaiming-uniform(a=√5), B ← 0: the adapter starts as an exact no-op."""
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            self.lora_B.zero_()

    @property
    def base_layer(self) -> nn.Module:
        return self._base[0]

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The wrapped layer's own computation, bit for bit (Conv1D uses addmm on [in, out])."""
        if self.fan_in_fan_out:
            out = torch.addmm(self.bias, x.reshape(-1, x.size(-1)), self.weight) if self.bias is not None \
                else x.reshape(-1, x.size(-1)) @ self.weight
            return out.view(*x.shape[:-1], self.out_features)
        return F.linear(x, self.weight, self.bias)

    def lora_forward(self, x: torch.Tensor) -> torch.Tensor:
        """s · B A dropout(x) (+ Δb), computed in the adapter dtype."""
        h = self.dropout(x.to(self.lora_A.dtype))
        out = F.linear(F.linear(h, self.lora_A), self.lora_B) * self.scaling
        return out if self.lora_bias is None else out + self.lora_bias

    def add_bias_delta(self, delta: torch.Tensor | None = None) -> nn.Parameter:
        """Give the adapter a Δb (zeros by default); merging adds it to the base bias."""
        if self.bias is None:
            raise ShapeMismatchError("the base layer has no bias, so the adapter cannot carry a bias change")
        value = torch.zeros(self.out_features, dtype=self.lora_A.dtype, device=self.lora_A.device) \
            if delta is None else delta.to(self.lora_A.device, self.lora_A.dtype)
        self.lora_bias = nn.Parameter(value.clone(), requires_grad=self.lora_A.requires_grad)
        return self.lora_bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_forward(x)
        if self.merged:
            return y
        return y + self.lora_forward(x).to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        """ΔW = s·B A in float32, in the orientation of the stored weight ([in, out] for Conv1D)."""
        delta = (self.lora_B.detach().float() @ self.lora_A.detach().float()) * self.scaling
        return delta.T if self.fan_in_fan_out else delta

    @torch.no_grad()
    def merge(self) -> None:
        """W0 ← W0 + ΔW in place (computed in fp32, cast to W0's dtype)."""
        if self.merged:
            raise RuntimeError("adapter already merged")
        self._add_to_weight(self.delta_weight())
        self._add_to_bias(1.0)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W0 ← W0 − ΔW: undo ``merge`` (exact up to rounding in W0's dtype)."""
        if not self.merged:
            raise RuntimeError("adapter is not merged")
        self._add_to_weight(-self.delta_weight())
        self._add_to_bias(-1.0)
        self.merged = False

    def _add_to_bias(self, sign: float) -> None:
        if self.lora_bias is not None:
            b = self.bias
            b.copy_((b.float() + sign * self.lora_bias.detach().float().to(b.device)).to(b.dtype))

    def _add_to_weight(self, delta: torch.Tensor) -> None:
        w = self.weight
        if delta.shape != w.shape:
            raise ShapeMismatchError(f"ΔW has shape {list(delta.shape)} but the weight has {list(w.shape)}")
        w.copy_((w.float() + delta.to(w.device)).to(w.dtype))

    @torch.no_grad()
    def fold(self, a: torch.Tensor | None = None, b: torch.Tensor | None = None) -> None:
        """W ← W + B A with the given factors (default: the current s·B, A), remembered as folded.

        Without arguments this is a ReLoRA restart: fold the current adapter, then A ← kaiming, B ← 0.
        """
        restart = a is None
        if restart:
            a = self.lora_A.detach().float().clone()  # a copy: reset_lora() overwrites A in place
            b = self.lora_B.detach().float() * self.scaling
        a, b = a.to(self.weight.device, torch.float32), b.to(self.weight.device, torch.float32)
        delta = b @ a
        self._add_to_weight(delta.T if self.fan_in_fan_out else delta)
        self.folded_A = a if self.folded_A is None else torch.cat([self.folded_A, a])
        self.folded_B = b if self.folded_B is None else torch.cat([self.folded_B, b], dim=1)
        if restart:
            self.reset_lora()

    def total_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) with B A = W − W0: folded factors and the current s·B A, concatenated along the rank."""
        a, b = self.lora_A.detach(), self.lora_B.detach() * self.scaling
        if self.folded_A is None:
            return a, b
        return (torch.cat([self.folded_A.to(a.dtype), a]), torch.cat([self.folded_B.to(b.dtype), b], dim=1))

    def eject(self) -> nn.Module:
        """The wrapped module, with this layer's (possibly merged) weight and bias."""
        base = self.base_layer
        base.weight, base.bias = self.weight, self.bias
        return base

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, rank={self.rank}, alpha={self.alpha:g}, "
                f"scaling={self.scaling:g}{', rslora' if self.rslora else ''}"
                f"{', fan_in_fan_out' if self.fan_in_fan_out else ''}{', merged' if self.merged else ''}")
