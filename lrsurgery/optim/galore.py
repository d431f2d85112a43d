"""GaLore: gradient low-rank projection (Zhao et al., ICML 2024, arXiv 2403.03507).

The weight W (m×n) stays full rank; the optimizer's moments live in an r-dimensional projection
of the gradient G, whose basis an SVD refreshes every T = update_proj_gap steps (a 3-D parameter
[H, m, n], such as LTE's stacked heads, is H matrices, each with its own basis and moments):

    refresh when t % T == 0 (t = steps done before this one: optimizer calls 1, T+1, 2T+1, …)
        U, S, Vᴴ = svd(float32(G)), basis cast back to G's dtype
        right:  Q = Vᴴ[:r]    (r×n)    R = G Qᵀ      (m×r)    back(N) = α · N Q
        left:   P = U[:, :r]  (m×r)    R = Pᵀ G      (r×n)    back(N) = α · P N
        full:   P and Q                R = Pᵀ G Qᵀ   (r×r)    back(N) = α · P N Q
    std goes right when m ≥ n (square matrices too), else left: moments are r×max(m, n);
    reverse_std makes the opposite choice (r×min(m, n)); left/right force a side.

    AdamW, HF style (t ← t + 1):
        M ← β1 M + (1 − β1) R            V ← β2 V + (1 − β2) R²
        W ← W − lr · √(1 − β2ᵗ) / (1 − β1ᵗ) · back(M / (√V + ε))
        W ← W − lr · wd · W               (decoupled decay, after the update)
    Adafactor, HF style, runs on R; back(·) applies to its final update (after the β1 EMA).
    The moments are neither reset nor rotated at a refresh: the old basis' M, V carry over.

Reference defaults (galore-torch 1.0): AdamW betas (0.9, 0.999), eps 1e-6 (the paper says 1e-8),
weight_decay 0, correct_bias True; group keys update_proj_gap 200, scale α 1.0, proj_type std.
Adafactor: lr None, eps (1e-30, 1e-3), clip_threshold 1.0, decay_rate -0.8, beta1 None,
weight_decay 0, scale_parameter True, relative_step True, warmup_init False.

Deliberate differences: project_back takes the side from the basis stored at refresh, not from the
low-rank shape (the reference's reverse_std breaks on a wide matrix with r ≥ m); the basis is a
compact copy (a slice view keeps all of U or Vᴴ alive); state holds only tensors and ints (loads with
``weights_only=True``); ``svd="randomized"`` uses ``torch.svd_lowrank`` (q = r + oversample, niter 2)
with signs fixed (largest entry of each right vector positive); GaLoreAdafactor's ``relative_step``
defaults to ``lr is None``; LayerwiseOptimizer steps once per accumulation window, not per micro-batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import torch

from lrsurgery.errors import LrsurgeryError

PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")
SVD_KINDS = ("full", "randomized")
# Defaults for the optional keys of a GaLore group (one that has "rank"); the reference's class defaults.
GALORE_GROUP_DEFAULTS: dict[str, Any] = {"update_proj_gap": 200, "scale": 1.0, "proj_type": "std", "svd": "full",
                                         "oversample": 8}  # oversample: extra columns for svd_lowrank
_LOW_PRECISION = (torch.float16, torch.bfloat16)


@dataclass
class Projector:
    """The GaLore basis of one matrix: ``project`` G to the rank-r space, ``project_back`` an update.

    Each refresh picks the side from ``proj_type`` and G's shape and stores ``left`` (P, m×r) and/or
    ``right`` (Q, r×n); ``side`` and hence ``project_back`` follow from which basis is stored.
    """

    rank: int
    proj_type: str = "std"
    update_proj_gap: int = 200
    scale: float = 1.0
    svd: str = "full"
    oversample: int = 8
    left: torch.Tensor | None = field(default=None, repr=False)
    right: torch.Tensor | None = field(default=None, repr=False)

    @property
    def side(self) -> str | None:
        """'left', 'right' or 'full': the side of the basis stored at the last refresh (None before one)."""
        if self.left is None:
            return None if self.right is None else "right"
        return "left" if self.right is None else "full"

    def side_for(self, shape: tuple[int, ...]) -> str:
        """The side ``proj_type`` projects a matrix of this shape from."""
        if self.proj_type in ("std", "reverse_std"):
            return "right" if (shape[-2] >= shape[-1]) == (self.proj_type == "std") else "left"
        return self.proj_type

    def refresh(self, grad: torch.Tensor) -> None:
        """Recompute the basis from the top-r singular vectors of float32(grad)."""
        side = self.side_for(tuple(grad.shape))
        u, vh = self._singular_vectors(grad.float())
        # copies own compact storage (a slice would keep all of U/Vᴴ) in LAPACK's stride order, as the reference
        self.left = u[..., : self.rank].to(grad.dtype, copy=True) if side in ("left", "full") else None
        self.right = vh[..., : self.rank, :].to(grad.dtype, copy=True) if side in ("right", "full") else None

    def _singular_vectors(self, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.svd == "randomized":
            u, _, v = torch.svd_lowrank(a, q=min(self.rank + self.oversample, *a.shape[-2:]), niter=2)
            # Fix each pair's sign (largest |v| entry positive) so the basis depends on G, not on the
            # random test matrix: the moments persist across refreshes, a flipped vector reverses them.
            sign = torch.sign(v.gather(-2, v.abs().argmax(dim=-2, keepdim=True)))
            return u * sign, (v * sign).mT
        u, _, vh = torch.linalg.svd(a, full_matrices=False)
        return u, vh

    def project(self, grad: torch.Tensor, step: int) -> torch.Tensor:
        """R: ``grad`` in the rank-r space; refreshes first if ``step % update_proj_gap == 0``."""
        if self.side is None or step % self.update_proj_gap == 0:
            self.refresh(grad)
        low = torch.matmul(self.left.mT, grad) if self.left is not None else grad
        return torch.matmul(low, self.right.mT) if self.right is not None else low

    def project_back(self, low: torch.Tensor) -> torch.Tensor:
        """scale · the full-shape matrix whose projection is ``low``, on the side stored at refresh."""
        if self.side is None:
            raise LrsurgeryError("Projector.project_back called before project: there is no basis yet")
        full = torch.matmul(self.left, low) if self.left is not None else low
        return (torch.matmul(full, self.right) if self.right is not None else full) * self.scale


def galore_state_bytes(shape: tuple[int, int], rank: int, proj_type: str = "std", state_bytes: int = 4,
                       basis_bytes: int = 4) -> int:
    """Bytes of GaLoreAdamW state for one m×n matrix: two moments of R plus the basis.

    std (M = max, N = min): ``2·r·M·state_bytes + r·N·basis_bytes``; reverse_std swaps M and N;
    left: moments r×n, basis m×r; right: moments m×r, basis r×n; full: moments r×r, basis r·(m+n).
    r is clipped to min(m, n), as the SVD has no more singular vectors.
    """
    if proj_type not in PROJ_TYPES:
        raise LrsurgeryError(f"unknown proj_type {proj_type!r}; choose one of {', '.join(PROJ_TYPES)}")
    m, n = shape
    r = min(rank, m, n)
    side = Projector(rank, proj_type).side_for((m, n))
    moments, basis = {"right": (m * r, r * n), "left": (r * n, m * r), "full": (r * r, r * (m + n))}[side]
    return 2 * moments * state_bytes + basis * basis_bytes


class _GaLoreOptimizer(torch.optim.Optimizer):
    """Shared by both optimizers: GaLore group validation and the projector kept in tensor-only state."""

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        params = param_group["params"]
        param_group["params"] = [params] if isinstance(params, torch.Tensor) else list(params)
        if "rank" in param_group:
            for key, value in GALORE_GROUP_DEFAULTS.items():
                param_group.setdefault(key, value)
            _check_galore_group(param_group)
        super().add_param_group(param_group)

    def _with_grads(self) -> Iterator[tuple[dict[str, Any], torch.Tensor, dict[str, Any]]]:
        """(group, parameter, state) for every parameter that has a gradient."""
        for group in self.param_groups:
            for p in (p for p in group["params"] if p.grad is not None):
                if p.grad.is_sparse:
                    raise LrsurgeryError(f"{type(self).__name__} does not support sparse gradients")
                self.state[p].setdefault("step", 0)
                yield group, p, self.state[p]

    @staticmethod
    def _projector(group: dict[str, Any], state: dict[str, Any]) -> Projector | None:
        """The group's Projector over the basis in ``state`` (None for a plain group)."""
        if "rank" not in group:
            return None
        return Projector(group["rank"], group["proj_type"], group["update_proj_gap"], group["scale"], group["svd"],
                         group["oversample"], left=state.get("proj_left"), right=state.get("proj_right"))

    @staticmethod
    def _project(proj: Projector | None, grad: torch.Tensor, state: dict[str, Any]) -> torch.Tensor:
        """R for a GaLore parameter (storing a refreshed basis back in ``state``), else ``grad``."""
        if proj is None:
            return grad
        low = proj.project(grad, state["step"])
        for key, basis in (("proj_left", proj.left), ("proj_right", proj.right)):
            if basis is not None:
                state[key] = basis
        return low


def _evaluate(closure: Callable[[], Any] | None) -> Any:
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def _check_int(value: Any, what: str, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise LrsurgeryError(f"{what} must be an int ≥ {minimum}, got {value!r}")


def _check_galore_group(group: dict[str, Any]) -> None:
    for key in ("rank", "update_proj_gap", "oversample"):
        _check_int(group[key], f"GaLore group: {key}", minimum=int(key != "oversample"))
    for key, allowed in (("proj_type", PROJ_TYPES), ("svd", SVD_KINDS)):
        if group[key] not in allowed:
            raise LrsurgeryError(f"GaLore group: unknown {key} {group[key]!r}; choose one of {', '.join(allowed)}")
    for i, p in enumerate(group["params"]):
        if p.dim() not in (2, 3):
            raise LrsurgeryError(f"GaLore group: parameter {i} has shape {tuple(p.shape)}, but GaLore projects 2-D "
                                 "matrices (or a stack of them, e.g. LTE heads, each with its own basis) only; "
                                 "put biases, norms etc. in a plain group (one without 'rank')")


class GaLoreAdamW(_GaLoreOptimizer):
    """HF-style AdamW (eps 1e-6, decay after the update); groups with ``rank`` keep moments in the GaLore space.

    A GaLore group holds 2-D parameters only (full weights or LoRA factors) and has optional keys
    ``update_proj_gap`` 200, ``scale`` 1.0, ``proj_type`` 'std', ``svd`` 'full', ``oversample`` 8;
    other groups are plain AdamW with the same math. Raises LrsurgeryError on bad hyperparameters
    or a non-2-D parameter in a GaLore group.
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0, correct_bias: bool = True):
        if min(lr, eps, weight_decay) < 0.0 or not all(0.0 <= b < 1.0 for b in betas):
            raise LrsurgeryError(f"GaLoreAdamW: need lr, eps, weight_decay ≥ 0 and betas in [0, 1); got lr={lr}, "
                                 f"eps={eps}, weight_decay={weight_decay}, betas={betas}")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay,
                                  "correct_bias": correct_bias})

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = _evaluate(closure)
        for group, p, state in self._with_grads():
            beta1, beta2 = group["betas"]
            grad = self._project(proj := self._projector(group, state), p.grad, state)
            if "exp_avg" not in state:
                state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(grad), torch.zeros_like(grad)
            exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
            state["step"] += 1
            t = state["step"]

            exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
            denom = exp_avg_sq.sqrt().add_(group["eps"])
            step_size = group["lr"]
            if group["correct_bias"]:
                step_size = step_size * math.sqrt(1.0 - beta2 ** t) / (1.0 - beta1 ** t)
            update = exp_avg / denom
            if proj is not None:
                update = proj.project_back(update)
            p.add_(update, alpha=-step_size)
            if group["weight_decay"] > 0.0:
                p.add_(p, alpha=-group["lr"] * group["weight_decay"])
        return loss


class GaLoreAdafactor(_GaLoreOptimizer):
    """HF-style Adafactor on the GaLore-projected gradient; ``project_back`` maps its final update.

    Groups as in GaLoreAdamW. Hyperparameters and defaults are transformers' Adafactor's (see the
    module docstring), except ``relative_step=None`` which means ``lr is None``: with ``lr=None`` the
    step size is ``min(1e-2, 1/√t)`` (× RMS(W) if ``scale_parameter``), else ``lr`` (× RMS(W) likewise).
    """

    def __init__(self, params: Iterable[Any], lr: float | None = None, eps: tuple[float, float] = (1e-30, 1e-3),
                 clip_threshold: float = 1.0, decay_rate: float = -0.8, beta1: float | None = None,
                 weight_decay: float = 0.0, scale_parameter: bool = True, relative_step: bool | None = None,
                 warmup_init: bool = False):
        relative_step = lr is None if relative_step is None else relative_step
        if (lr is None) != relative_step or (warmup_init and not relative_step):
            raise LrsurgeryError(f"GaLoreAdafactor: give lr with relative_step=False, or lr=None with relative_step="
                                 f"True (warmup_init needs it); got lr={lr}, relative_step={relative_step}")
        super().__init__(params, {"lr": lr, "eps": eps, "clip_threshold": clip_threshold, "decay_rate": decay_rate,
                                  "beta1": beta1, "weight_decay": weight_decay, "scale_parameter": scale_parameter,
                                  "relative_step": relative_step, "warmup_init": warmup_init})

    @staticmethod
    def _rms(x: torch.Tensor) -> torch.Tensor:
        return x.norm(2) / (x.numel() ** 0.5)

    @staticmethod
    def _step_size(group: dict[str, Any], t: int, rms: torch.Tensor) -> Any:
        size = group["lr"]
        if group["relative_step"]:
            size = min(1e-6 * t if group["warmup_init"] else 1e-2, 1.0 / math.sqrt(t))
        return (max(group["eps"][1], rms) if group["scale_parameter"] else 1.0) * size

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = _evaluate(closure)
        for group, p, state in self._with_grads():
            grad = p.grad.float() if p.grad.dtype in _LOW_PRECISION else p.grad
            for key in [k for k, v in state.items() if torch.is_tensor(v) and v.dtype != grad.dtype]:
                state[key] = state[key].to(grad.dtype)  # load_state_dict casts state to a bf16 param's dtype
            grad = self._project(proj := self._projector(group, state), grad, state)
            factored = grad.dim() >= 2
            if "exp_avg_sq_row" not in state and "exp_avg_sq" not in state:
                if group["beta1"] is not None:
                    state["exp_avg"] = torch.zeros_like(grad)
                if factored:  # row/column EMAs of G² (r×… of R for a GaLore matrix)
                    state["exp_avg_sq_row"] = grad.new_zeros(grad.shape[:-1])
                    state["exp_avg_sq_col"] = grad.new_zeros(grad.shape[:-2] + grad.shape[-1:])
                else:
                    state["exp_avg_sq"] = torch.zeros_like(grad)
            w = p.float() if p.dtype in _LOW_PRECISION else p
            state["step"] += 1
            lr = self._step_size(group, state["step"], self._rms(w))

            beta2t = 1.0 - math.pow(state["step"], group["decay_rate"])
            update = grad**2 + group["eps"][0]
            if factored:
                row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
                row.mul_(beta2t).add_(update.mean(dim=-1), alpha=1.0 - beta2t)
                col.mul_(beta2t).add_(update.mean(dim=-2), alpha=1.0 - beta2t)
                r_factor = (row / row.mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1)
                update = torch.mul(r_factor, col.unsqueeze(-2).rsqrt()).mul_(grad)
            else:
                state["exp_avg_sq"].mul_(beta2t).add_(update, alpha=1.0 - beta2t)
                update = state["exp_avg_sq"].rsqrt().mul_(grad)
            update.div_((self._rms(update) / group["clip_threshold"]).clamp_(min=1.0))
            update.mul_(lr)
            if group["beta1"] is not None:
                state["exp_avg"].mul_(group["beta1"]).add_(update, alpha=1 - group["beta1"])
                update = state["exp_avg"]
            if proj is not None:
                update = proj.project_back(update)
            if group["weight_decay"] != 0:
                w.add_(w, alpha=-group["weight_decay"] * lr)
            w.add_(-update)
            if w is not p:
                p.copy_(w)
        return loss


class LayerwiseOptimizer:
    """One optimizer per parameter, stepped during backward so each full gradient is freed early.

    A ``post_accumulate_grad`` hook on every parameter counts backward passes (micro-batches). On the
    last micro-batch of each window of ``accumulation_steps`` it steps that parameter's optimizer on
    the gradient summed over the window and sets ``p.grad = None``; on the other micro-batches the
    gradient just accumulates. So k backwards equal one ``step()`` of ``make(all params)`` on the
    summed gradient. The count advances by itself at the end of each backward (an autograd-engine
    callback, as DDP uses); parameters a window's last backward did not reach are stepped then.

    Schedulers: call ``set_lr`` once per logical step (after ``steps`` grows), not per micro-batch. Example::

        lw = LayerwiseOptimizer(model.parameters(), lambda ps: GaLoreAdamW(ps, lr=1e-3), accumulation_steps=4)
        for i, batch in enumerate(micro_batches):
            loss_fn(model, batch).backward()        # every 4th backward steps and frees the grads
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], make: Callable[[list[torch.nn.Parameter]], Any],
                 accumulation_steps: int = 1):
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise LrsurgeryError("LayerwiseOptimizer: no trainable parameters were given")
        if len({id(p) for p in self.params}) != len(self.params):
            raise LrsurgeryError("LayerwiseOptimizer: a parameter was given twice (tied weights?); pass it once")
        _check_int(accumulation_steps, "LayerwiseOptimizer: accumulation_steps")
        self.accumulation_steps = accumulation_steps
        self.optimizers = [make([p]) for p in self.params]
        self.micro_steps = 0   # backward passes completed
        self.steps = 0         # accumulation windows completed (optimizer steps per parameter)
        self._in_backward = False
        self._handles = [p.register_post_accumulate_grad_hook(self._hook(i)) for i, p in enumerate(self.params)]

    def _last_micro_batch(self) -> bool:
        return (self.micro_steps + 1) % self.accumulation_steps == 0

    def _hook(self, i: int) -> Callable[[torch.Tensor], None]:
        def hook(param: torch.Tensor) -> None:
            if not self._in_backward:
                self._in_backward = True
                torch.autograd.Variable._execution_engine.queue_callback(self._end_backward)
            if self._last_micro_batch():
                self._step(i)
        return hook

    def _step(self, i: int) -> None:
        self.optimizers[i].step()
        self.optimizers[i].zero_grad(set_to_none=True)

    def _end_backward(self) -> None:
        self._in_backward = False
        if self._last_micro_batch():
            for i, p in enumerate(self.params):
                if p.grad is not None:   # accumulated earlier in the window, not reached by this backward
                    self._step(i)
            self.steps += 1
        self.micro_steps += 1

    def set_lr(self, lr: float) -> None:
        """Set the learning rate of every per-parameter optimizer (call once per logical step)."""
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["lr"] = lr

    def state_dict(self) -> dict[str, Any]:
        return {"accumulation_steps": self.accumulation_steps, "micro_steps": self.micro_steps, "steps": self.steps,
                "optimizers": [opt.state_dict() for opt in self.optimizers]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = (len(state["optimizers"]), state["accumulation_steps"])
        if saved != (len(self.optimizers), self.accumulation_steps):
            raise LrsurgeryError(f"LayerwiseOptimizer: the state has (parameters, accumulation_steps) = {saved}, this "
                                 f"one {(len(self.optimizers), self.accumulation_steps)}; build it the same way")
        for opt, sd in zip(self.optimizers, state["optimizers"]):
            opt.load_state_dict(sd)
        self.micro_steps, self.steps = state["micro_steps"], state["steps"]

    def remove(self) -> None:
        """Unregister the hooks; afterwards backward only accumulates gradients."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
