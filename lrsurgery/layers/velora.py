"""VeLoRA: train a linear layer while keeping one number per sub-token instead of its input
(Miles et al., NeurIPS 2024, arXiv 2405.17991; official repo roymiles/VeLoRA, also in HF PEFT).

    forward (exact)       x [T, D] ──► y = x Wᵀ + b
                          │
    saved for backward    └─► split each token into G sub-tokens of size M = D/G
                              x_t = [x_t1 | x_t2 | … | x_tG],   z_tg = ⟨x_tg, v⟩   (v ∈ R^M, |v| = 1)
                              keep z [T, G] and v; drop x
    backward              ∂x = ∂y W                                      (exact)
                          ∂b = Σ_t ∂y_t                                  (exact)
                          ∂W = scale · Σ_t ∂y_tᵀ x̂_t,   x̂_tg = z_tg v   (x rebuilt on the line v)
                             = scale · ∂W_true · (I_G ⊗ v vᵀ)

The weight gradient is the true one projected, group by group, on the line spanned by v: rank-1
"sub-token" compression, so the saved activation shrinks by exactly D/G (= M). We never build x̂
either: ∂W viewed as [out, G, M] is scale · (∂yᵀ z)[o, g] · v[m], an outer product per group, so the
backward costs T·out·G flops and needs no [T, D] transient (the official code materialises x̂).

v is a buffer, set from the data on training forwards (``init``):
- ``batch_average_once`` (official default): v = normalise(mean of every sub-token of the first
  training batch), then frozen;
- ``batch_average`` (PEFT default): the same, recomputed at every training forward;
- ``ema``: v ← normalise(decay·v + (1 − decay)·mean), the first batch as above (official formula).
Until the first training forward v is zero ("not initialised"); it goes in the state dict, so a
resumed ``batch_average_once`` run keeps its v. Evaluation, ``no_grad`` and frozen weights run the
plain ``F.linear`` (bit-identical output, nothing saved for a weight gradient).

When does memory actually drop? Only if nothing else keeps x alive: if another op saves the same
tensor (a second Linear on the same input, attention that saves its output), x stays in memory and
z, v come on top. In timm ViT blocks (fused attention, measured in tests/test_velora.py):
``attn.qkv`` (input = norm1 output; LayerNorm saves its *input*), ``mlp.fc1`` (norm2 output) and
``mlp.fc2`` (GELU output; GELU saves its input) are held by nothing else and pay off in full;
``attn.proj`` does not (scaled-dot-product attention saves its output, which is proj's input).
In LLaMA the ``down_proj`` input (act(gate)·up) is held by down_proj alone; q/k/v share theirs.
With LoRA (``VeLoRALoRALinear``) the compression applies to the adapter's down-projection A: the
frozen W0 x saves no input, so VeLoRA removes the adapter's copy of x; dropout > 0 still keeps its
1-byte-per-element mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from lrsurgery.errors import ShapeMismatchError, TargetError
from lrsurgery.layers.lora import LoRALinear

VELORA_INITS = ("batch_average_once", "batch_average", "ema")


def group_dim(d: int, groups: int, pad: bool = False) -> int:
    """M, the sub-token size for an input width D split into G groups (⌈D/G⌉ with ``pad``).

    Raises TargetError when G does not divide D and ``pad`` is False, listing the valid G.
    """
    if groups < 1 or groups > d:
        raise TargetError(f"VeLoRA needs 1 ≤ G ≤ D groups; got G={groups} for an input width D={d}")
    if d % groups == 0:
        return d // groups
    if pad:
        return -(-d // groups)
    divisors = [k for k in range(1, d + 1) if d % k == 0]
    below = max(k for k in divisors if k < groups)
    above = min(k for k in divisors if k > groups)
    raise TargetError(
        f"VeLoRA groups G={groups} do not divide the input width D={d} (each token is split into G "
        f"sub-tokens of size D/G). Nearest valid G: {below} or {above}; all divisors of {d}: "
        f"{', '.join(map(str, divisors))}. Pick one, or pass pad=True to zero-pad tokens to G·⌈D/G⌉.")


def saved_bytes(shape_tokens: int, d: int, groups: int, dtype_bytes: int) -> int:
    """Bytes VeLoRA saves for one wrapped layer: z (T·G) plus v (M = ⌈D/G⌉), at ``dtype_bytes`` each.

    >>> saved_bytes(10, 64, 8, 4)   # a plain Linear would save 10·64·4 = 2560
    352
    """
    return (shape_tokens * groups + group_dim(d, groups, pad=True)) * dtype_bytes


def _subtokens(x: torch.Tensor, groups: int, m: int) -> torch.Tensor:
    """x [..., D] as [T, G, M], zero-padded on the right when G·M > D."""
    flat = x.reshape(-1, x.shape[-1])
    if groups * m != flat.shape[1]:
        flat = F.pad(flat, (0, groups * m - flat.shape[1]))
    return flat.view(-1, groups, m)


class _VeLoRAFunction(torch.autograd.Function):
    """y = F.linear(x, W, b), saving z = ⟨x_tg, v⟩ [T, G] instead of x."""

    @staticmethod
    def forward(ctx, x, weight, bias, v, groups, scale):  # type: ignore[override]
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ctx.x_shape, ctx.d, ctx.scale, ctx.w_dtype = x.shape, x.shape[-1], scale, weight.dtype
        # z stays in x's dtype (as PEFT 0.21 does). The official code stores z and v in fp16, whose
        # range (65504) a bf16 activation's dot product can exceed: inf in z, NaN in ∂W.
        z = _subtokens(x, groups, v.numel()) @ v.to(x.dtype) if need_w else None
        # W only if ∂x is wanted (it is a parameter: alive anyway); z, v only if ∂W is.
        ctx.save_for_backward(z, weight if need_x else None, v if need_w else None)
        return F.linear(x, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):  # type: ignore[override]
        z, weight, v = ctx.saved_tensors
        g = grad_y.reshape(-1, grad_y.shape[-1])  # [T, out]
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = (g @ weight.to(g.dtype)).reshape(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            gz = g.T @ z.to(g.dtype)  # [out, G] = Σ_t ∂y_t z_t
            full = (gz.unsqueeze(-1) * v.to(g.dtype)).reshape(g.shape[1], -1)  # [out, G·M]
            grad_w = (full[:, :ctx.d] * ctx.scale).to(ctx.w_dtype)
        if ctx.needs_input_grad[2]:
            grad_b = g.sum(0)
        return grad_x, grad_w, grad_b, None, None, None


def velora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, v: torch.Tensor,
                  groups: int, scale: float = 1.0, pad: bool = False) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` whose backward uses VeLoRA's compressed input for ∂W.

    Args:
        x: [..., D]; weight: [out, D]; bias: [out] or None.
        v: [M] projection vector, M = D/G (⌈D/G⌉ with ``pad``); unit norm for the projection to be
            one (any v gives ∂W = scale·∂W_true·(I_G ⊗ v vᵀ)).
        groups: G, number of sub-tokens per token.
        scale: factor on ∂W (official fine-tuning: 0.1; pre-training 1.0).
        pad: zero-pad each token to G·M when G does not divide D (as PEFT does).

    Raises TargetError if G does not divide D (without ``pad``), ShapeMismatchError for a wrong v.
    """
    m = group_dim(x.shape[-1], groups, pad)
    if v.dim() != 1 or v.numel() != m:
        raise ShapeMismatchError(f"VeLoRA v must have shape [{m}] (D={x.shape[-1]}, G={groups}), "
                                 f"got {list(v.shape)}")
    return _VeLoRAFunction.apply(x, weight, bias, v, groups, float(scale))


def _unit(u: torch.Tensor) -> torch.Tensor:
    """u/|u|; a zero mean (e.g. all-zero inputs) has no direction, so take the uniform one."""
    n = torch.linalg.vector_norm(u)
    return u / n if n > 0 else torch.full_like(u, u.numel() ** -0.5)


class VeLoRAProjection(nn.Module):
    """Owns v and computes ``h ↦ F.linear(h, weight, bias)`` with VeLoRA's backward when training.

    Used by ``VeLoRALinear`` (weight = the layer's own) and ``VeLoRALoRALinear`` (weight = LoRA's A).

    Args:
        in_features: D, the width of h.
        groups: G (must divide D unless ``pad``).
        init: how v follows the data: one of ``VELORA_INITS``.
        scale: factor on the weight gradient.
        ema_decay: decay for ``init="ema"``, in [0, 1).
        pad: allow G not dividing D by zero-padding tokens to G·⌈D/G⌉.

    Raises TargetError for a bad G, init or decay.
    """

    def __init__(self, in_features: int, groups: int, init: str = "batch_average_once", scale: float = 1.0,
                 ema_decay: float = 0.99, pad: bool = False, device: torch.device | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if init not in VELORA_INITS:
            raise TargetError(f"unknown VeLoRA init {init!r}; choose one of {', '.join(VELORA_INITS)}")
        if not 0.0 <= ema_decay < 1.0:
            raise TargetError(f"VeLoRA ema_decay must be in [0, 1), got {ema_decay}")
        self.in_features, self.groups, self.pad = in_features, groups, pad
        self.group_dim = group_dim(in_features, groups, pad)
        self.init, self.scale, self.ema_decay = init, float(scale), float(ema_decay)
        self.register_buffer("v", torch.zeros(self.group_dim, device=device, dtype=dtype))  # 0 = unset
        self._ready = False  # cache of "v is non-zero", so the check syncs at most once

    @property
    def initialized(self) -> bool:
        """Whether v has been set (by a training forward or a loaded state dict)."""
        if not self._ready:
            self._ready = bool(self.v.any())
        return self._ready

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._ready = False  # the loaded v may be set or not: look again

    @torch.no_grad()
    def update(self, h: torch.Tensor) -> None:
        """Move v according to ``init`` from the batch h [..., D] (a no-op once frozen)."""
        if self.init == "batch_average_once" and self.initialized:
            return
        mean = _subtokens(h.detach(), self.groups, self.group_dim).mean(dim=(0, 1), dtype=torch.float32)
        if self.init == "ema" and self.initialized:
            mean = self.ema_decay * self.v.float() + (1.0 - self.ema_decay) * mean
        # in place, so DDP's buffer broadcast (rank 0's v) and other references to the buffer hold
        self.v.copy_(_unit(mean))
        self._ready = True

    def forward(self, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if not (self.training and torch.is_grad_enabled() and weight.requires_grad):
            return F.linear(h, weight, bias)
        self.update(h)
        # backward gets a copy (M numbers): a later forward may move the buffer before this backward
        # runs (a layer called twice, two views of a batch), and each ∂W must use its own forward's v
        return velora_linear(h, weight, bias, self.v.clone(), self.groups, self.scale, self.pad)

    def extra_repr(self) -> str:
        return (f"groups={self.groups}, group_dim={self.group_dim}, init={self.init}, scale={self.scale:g}"
                f"{f', ema_decay={self.ema_decay:g}' if self.init == 'ema' else ''}{', pad' if self.pad else ''}")


class VeLoRALinear(nn.Module):
    """A full-rank trained ``nn.Linear`` whose weight gradient comes from VeLoRA-compressed inputs.

    ``y = x Wᵀ + b`` exactly; ∂x and ∂b exact; ∂W = scale·∂W_true·(I_G ⊗ v vᵀ). The base's own
    ``weight``/``bias`` Parameters are registered under the same names (state-dict keys unchanged,
    plus ``velora.v``), and ``eject`` returns the wrapped module. Which parameters train is the
    caller's choice (full-rank training: the weight and bias require grad).

    Args:
        base: the ``nn.Linear`` to wrap (GPT-2 ``Conv1D``: use LoRA with VeLoRA, ``VeLoRALoRALinear``).
        groups, init, scale, ema_decay, pad: see ``VeLoRAProjection``.

    Raises TargetError for a module that is not ``nn.Linear`` or a G that does not divide D.
    """

    def __init__(self, base: nn.Module, groups: int, init: str = "batch_average_once", scale: float = 1.0,
                 ema_decay: float = 0.99, pad: bool = False) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TargetError(f"VeLoRALinear wraps nn.Linear, not {type(base).__name__}; for Conv1D use "
                              "LoRA with VeLoRA (VeLoRALoRALinear)")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self._base = [base]  # a list so nn.Module does not register it twice
        self.velora = VeLoRAProjection(base.in_features, groups, init, scale, ema_decay, pad,
                                       device=base.weight.device, dtype=base.weight.dtype)

    @property
    def base_layer(self) -> nn.Module:
        return self._base[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.velora(x, self.weight, self.bias)

    def eject(self) -> nn.Module:
        """The wrapped module, with this layer's (trained) weight and bias."""
        base = self.base_layer
        base.weight, base.bias = self.weight, self.bias
        return base

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}"


class VeLoRALoRALinear(LoRALinear):
    """LoRA with VeLoRA on the adapter's down-projection: ``y = W0 x + b + s·B·VeLoRA(h; A)``, h = dropout(x).

    The output equals ``LoRALinear``'s exactly; ∂B is exact (B sees the exact A h); ∂A =
    scale·∂A_true·(I_G ⊗ v vᵀ) from z of h. Merge, unmerge, fold and eject are LoRA's. v is a buffer
    (``velora.v``) in the adapter dtype; it is only needed for training, never for inference.

    Args:
        base, rank, alpha, dropout, rslora, adapter_dtype: as ``LoRALinear``.
        groups, init, scale, ema_decay, pad: see ``VeLoRAProjection`` (G splits the layer's input width).
    """

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0, rslora: bool = False,
                 adapter_dtype: torch.dtype | None = None, *, groups: int, init: str = "batch_average_once",
                 scale: float = 1.0, ema_decay: float = 0.99, pad: bool = False) -> None:
        super().__init__(base, rank, alpha, dropout, rslora, adapter_dtype)
        self.velora = VeLoRAProjection(self.in_features, groups, init, scale, ema_decay, pad,
                                       device=self.lora_A.device, dtype=self.lora_A.dtype)

    def lora_forward(self, x: torch.Tensor) -> torch.Tensor:
        """s · B VeLoRA(dropout(x); A) (+ Δb): LoRA's adapter branch with A's input compressed."""
        h = self.dropout(x.to(self.lora_A.dtype))
        out = F.linear(self.velora(h, self.lora_A), self.lora_B) * self.scaling
        return out if self.lora_bias is None else out + self.lora_bias

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, velora"
