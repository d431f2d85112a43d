"""Flora: Adafactor whose momentum lives in a random low-rank projection (Hao, Cao & Mou, ICML'24).

Follows the torch optimizer of BorealisAI/flora-opt (PyPI ``flora-opt`` 0.0.3) to fp32 round-off;
``tests/test_flora.py`` checks this against it. For a weight W (m×n) with gradient G at step t:

    lr_t = lr · max(eps2, RMS(W))                     (just lr if scale_parameter=False)
    β2_t = 1 − t^decay_rate
    R ← β2_t R + (1−β2_t) rowmean(G² + eps1)          C ← β2_t C + (1−β2_t) colmean(G² + eps1)
    U    = G ⊙ rsqrt((R / mean(R)) ⊗ C)               factored second moment (2-D); else G / √V
    Ũ    = (1−β1) U + β1 · up_s(c)                    the momentum c is read back through projection s
    if t % κ == 0:  s' = next_seed(s);  c ← down_s'(up_s(c));  s ← s'     (resample, keep the momentum)
    c    ← β1 c + (1−β1) down_s(U)
    Ũ   /= max(1, RMS(Ũ) / clip_threshold)
    W   ← W − wd·lr_t·W − lr_t·Ũ

The projection of an m×n matrix (entries N(0, 1/r), so E[PᵀP] = I and up(down(A)) is unbiased):

    m <  n :  P is r×m, on the left     down(A) = P A  (r×n)     up(c) = Pᵀ c
    m >= n :  P is n×r, on the right    down(A) = A P  (m×r)     up(c) = c Pᵀ

Projections are regenerated from integer seeds and never stored. Parameter k (1-based over every
parameter of every group, frozen ones included) starts at ``seed + k``; ``split_seed(s)`` gives
(lseed, rseed), the first two int64 draws of a CPU generator seeded with s; a left projection is
drawn with lseed, a right one with rseed, by ``torch.randn`` from a generator on the parameter's
device (so CPU and CUDA draw different P for one seed); ``next_seed(s)`` is the 15th draw. A factored
W therefore keeps R (m), C (n) and c (r·max(m,n)) floats plus two Python ints (step, seed): see
``flora_state_bytes``. The momentum is compressed only if W is 2-D and factored, 1 ≤ r ≤ min(m,n)
and max/min ≤ 4 (which rules out embeddings); any other weight keeps a full m×n EMA momentum.

Defaults are the reference's (lr required, rank=None, kappa=1000, eps=(1e-30, 1e-3), clip 1.0,
decay_rate −0.8, weight_decay 0, scale_parameter=True, relative_step=False, factorized, seed 0)
except **beta1 = 0.9**: the reference defaults to ``beta1=None``, i.e. no momentum, which makes it
plain Adafactor with nothing to compress and ``rank`` silently ignored. Pass ``beta1=0`` for that.
Not ported: ``warmup_init`` and the bitsandbytes 8-bit state (``quantization``).

``CompressedAccumulator`` is Flora's other half, gradient accumulation in τ·max(m,n) per weight
instead of m·n: every micro-batch gradient g_i is down-projected with the weight's seed s (used
directly, not split) and freed; after k micro-batches ``p.grad = up_s(Σ down_s(g_i)) = PᵀP Σ g_i``
and s ← next_seed(s), a fresh projection per optimizer step. Unlike the reference's
``FloraAccelerator`` it needs no accelerate and works with any optimizer.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from functools import partial
from typing import Any, Callable

import torch

from lrsurgery.errors import ShapeMismatchError, TrainingError

_INT64_MAX = torch.iinfo(torch.int64).max
_LOW_PRECISION = (torch.float16, torch.bfloat16)


# ---------------------------------------------------------------- seeds and projections


def _int64_draws(seed: int, count: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, _INT64_MAX, (count,), generator=gen).tolist()


def split_seed(seed: int) -> tuple[int, int]:
    """(left, right) projection seeds: the first two int64 draws of a CPU generator seeded with ``seed``."""
    lseed, rseed = _int64_draws(seed, 2)
    return lseed, rseed


def next_seed(seed: int) -> int:
    """The seed that follows ``seed`` (the 15th int64 draw of a CPU generator seeded with it)."""
    return _int64_draws(seed, 15)[-1]


def random_projection(shape: Sequence[int], rank: int, seed: int, device: torch.device | str | None = None,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The projection for an m×n matrix: rank×m (left) if m < n, else n×rank (right), entries N(0, 1/rank).

    Drawn from a generator on ``device``: the same seed gives other numbers on CUDA than on CPU.
    """
    m, n = shape[-2:]
    device = torch.device(device if device is not None else "cpu")
    gen = torch.Generator(device=device).manual_seed(seed)
    size = (rank, m) if m < n else (n, rank)
    return torch.randn(size, generator=gen, device=device, dtype=dtype) / math.sqrt(rank)


def project_down(a: torch.Tensor, proj: torch.Tensor) -> torch.Tensor:
    """``P A`` (rank×n) for a wide A, ``A P`` (m×rank) otherwise; ``proj`` from ``random_projection``."""
    return proj @ a if a.shape[-2] < a.shape[-1] else a @ proj


def project_up(c: torch.Tensor, proj: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Back to m×n: ``Pᵀ c`` for a wide ``shape``, ``c Pᵀ`` otherwise."""
    return proj.T @ c if shape[-2] < shape[-1] else c @ proj.T


def compresses_momentum(shape: Sequence[int], rank: int | None) -> bool:
    """True if Flora keeps this weight's momentum as rank·max(m,n) (2-D, 1 ≤ rank ≤ min(m,n), max/min ≤ 4)."""
    return (len(shape) == 2 and rank is not None and 0 < rank <= min(shape)
            and max(shape) / min(shape) <= 4)


def flora_state_bytes(shape: Sequence[int], rank: int | None, state_bytes: int = 4, *,
                      momentum: bool = True) -> int:
    """Bytes of Flora's state tensors for one parameter (factorize_second_moment=True).

    2-D: ``state_bytes·(m + n)`` for the row/column second moments, plus ``rank·max(m,n)`` momentum
    when ``compresses_momentum`` (else ``m·n``); other shapes: a full second moment (and momentum).
    The step counter and seed are Python ints, not tensors, and the projection is never stored.

    >>> flora_state_bytes((64, 32), rank=4)     # 4·(64 + 32) + 4·4·64
    1408
    """
    shape = tuple(int(d) for d in shape)
    numel = math.prod(shape)
    second = sum(shape) if len(shape) == 2 else numel
    first = 0 if not momentum else rank * max(shape) if compresses_momentum(shape, rank) else numel
    return state_bytes * (second + first)


def _rms(x: torch.Tensor) -> torch.Tensor:
    """Root mean square; per matrix [H, 1, 1] for a stack of matrices (LTE heads), so each is its own."""
    if x.dim() == 3:
        return x.flatten(1).norm(2, dim=1)[:, None, None] / math.sqrt(x[0].numel())
    return x.norm(2) / math.sqrt(x.numel())


# ---------------------------------------------------------------- the optimizer


class Flora(torch.optim.Optimizer):
    """Adafactor with momentum compressed by seeded random projections, resampled every ``kappa`` steps.

    Args:
        params: parameters or parameter groups; groups may override any option below (e.g. ``rank=None``
            for weights that should keep a full momentum).
        lr: learning rate; must be None with ``relative_step=True`` (then ``min(1e-2, 1/√t)``).
        rank: projection rank r of the momentum; None or 0 keeps it full.
        kappa: steps between projection resamples (the momentum is carried across).
        eps: (eps1 added to G², eps2 the floor of RMS(W) in the parameter scale).
        clip_threshold: the update is divided by max(1, RMS(update)/clip_threshold).
        decay_rate: β2_t = 1 − t^decay_rate.
        beta1: momentum; 0 or None gives plain Adafactor (the reference's default).
        weight_decay: decoupled, ``W −= wd·lr_t·W``.
        scale_parameter: multiply lr by max(eps2, RMS(W)).
        factorize_second_moment: row/column second moments for 2-D weights (needed to compress momentum).
        seed: parameter k's first projection seed is ``seed + k``.

    Raises:
        TrainingError: on an out-of-range option, or a sparse gradient.
    """

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict[str, Any]], lr: float | None,
                 rank: int | None = None, kappa: int = 1000, eps: tuple[float, float] = (1e-30, 1e-3),
                 clip_threshold: float = 1.0, decay_rate: float = -0.8, beta1: float | None = 0.9,
                 weight_decay: float = 0.0, scale_parameter: bool = True, relative_step: bool = False,
                 factorize_second_moment: bool = True, seed: int = 0) -> None:
        self._seed0, self._n_seen = int(seed), 0  # read by add_param_group, which super().__init__ calls
        defaults = dict(lr=lr, rank=rank, kappa=kappa, eps=tuple(eps), clip_threshold=clip_threshold,
                        decay_rate=decay_rate, beta1=beta1, weight_decay=weight_decay,
                        scale_parameter=scale_parameter, relative_step=relative_step,
                        factorize_second_moment=factorize_second_moment)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (checked) and give each of its trainable parameters its first projection seed."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        group["beta1"] = group["beta1"] or 0.0
        _check_group(group)
        for p in group["params"]:
            self._n_seen += 1  # frozen parameters count too, as in the reference
            if p.requires_grad:
                self.state[p]["seed"] = self._seed0 + self._n_seen

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group)
        return loss

    def _update(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        if p.grad.is_sparse:
            raise TrainingError("Flora does not support sparse gradients; use a dense embedding (sparse=False)")
        grad = p.grad.float() if p.grad.dtype in _LOW_PRECISION else p.grad
        w = p.float() if p.dtype in _LOW_PRECISION else p  # fp16/bf16 weights are updated in fp32
        state = self.state[p]
        state["step"] = state.get("step", 0) + 1
        t = state["step"]

        lr_t = min(1e-2, 1.0 / math.sqrt(t)) if group["relative_step"] else group["lr"]
        if group["scale_parameter"]:
            lr_t = _rms(w).clamp(min=group["eps"][1]) * lr_t
        update = self._precondition(state, grad, group, beta2t=1.0 - t ** group["decay_rate"])
        if group["beta1"] > 0:
            update = self._momentum(state, update, group, t)
        update.div_((_rms(update) / group["clip_threshold"]).clamp_(min=1.0)).mul_(lr_t)
        if group["weight_decay"] != 0:
            w.mul_(1 - group["weight_decay"] * lr_t)
        w.sub_(update)
        if w is not p:
            p.copy_(w)

    def _factored(self, group: dict[str, Any], grad: torch.Tensor) -> bool:
        return grad.dim() in (2, 3) and group["factorize_second_moment"]  # 3-D: a stack of matrices

    def _precondition(self, state: dict[str, Any], grad: torch.Tensor, group: dict[str, Any],
                      beta2t: float) -> torch.Tensor:
        """U = G / sqrt(second moment), with the EMAs updated in place."""
        sq = grad.square().add_(group["eps"][0])
        if not self._factored(group, grad):
            v = state.setdefault("exp_avg_sq", torch.zeros_like(grad))
            v.mul_(beta2t).add_(sq, alpha=1 - beta2t)
            return v.rsqrt() * grad
        row = state.setdefault("exp_avg_sq_row", grad.new_zeros(grad.shape[:-1]))
        col = state.setdefault("exp_avg_sq_col", grad.new_zeros(grad.shape[:-2] + grad.shape[-1:]))
        row.mul_(beta2t).add_(sq.mean(dim=-1), alpha=1 - beta2t)
        col.mul_(beta2t).add_(sq.mean(dim=-2), alpha=1 - beta2t)
        row_factor = (row / row.mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1)
        return (row_factor * col.unsqueeze(-2).rsqrt()).mul_(grad)

    def _momentum(self, state: dict[str, Any], update: torch.Tensor, group: dict[str, Any],
                  t: int) -> torch.Tensor:
        """Ũ = (1−β1) U + β1 · momentum, and the momentum (full, or compressed under seed s) updated."""
        b1, rank, shape = group["beta1"], group["rank"], update.shape
        if not (self._factored(group, update) and compresses_momentum(shape[-2:], rank)):
            m = state.setdefault("exp_avg", torch.zeros_like(update))
            out = update * (1 - b1) + m * b1
            m.copy_(out)
            return out
        c = state.get("exp_avg")
        if c is None:
            m, n = shape[-2:]
            c = state["exp_avg"] = update.new_zeros(shape[:-2] + ((rank, n) if m < n else (m, rank)))
        proj = self._projection(state["seed"], shape, rank, update)
        full = project_up(c, proj, shape)
        out = update * (1 - b1) + full * b1
        if t % group["kappa"] == 0:  # resample: a new subspace, carrying the momentum over
            state["seed"] = next_seed(state["seed"])
            proj = self._projection(state["seed"], shape, rank, update)
            c.copy_(project_down(full, proj))
        c.copy_(c * b1 + project_down(update, proj) * (1 - b1))
        return out

    @staticmethod
    def _projection(seed: int, shape: Sequence[int], rank: int, like: torch.Tensor) -> torch.Tensor:
        lseed, rseed = split_seed(seed)
        return random_projection(shape, rank, lseed if shape[-2] < shape[-1] else rseed, like.device, like.dtype)


def _check_group(g: dict[str, Any]) -> None:
    lr, rank, kappa = g["lr"], g["rank"], g["kappa"]
    problems = [
        (g["relative_step"] and lr is not None, "relative_step=True computes the learning rate; pass lr=None"),
        (not g["relative_step"] and (lr is None or lr < 0), f"lr must be a number ≥ 0 (got {lr!r})"),
        (rank is not None and (not isinstance(rank, int) or rank < 0), f"rank must be int ≥ 0 or None (got {rank!r})"),
        (not isinstance(kappa, int) or kappa < 1, f"kappa (steps between resamples) must be int ≥ 1 (got {kappa!r})"),
        (not 0.0 <= g["beta1"] < 1.0, f"beta1 must be in [0, 1) (got {g['beta1']!r}); 0 or None: no momentum"),
        (len(g["eps"]) != 2 or min(g["eps"]) < 0, f"eps must be two numbers ≥ 0 (got {g['eps']!r})"),
        (g["clip_threshold"] <= 0, f"clip_threshold must be > 0 (got {g['clip_threshold']!r})"),
        (g["decay_rate"] >= 0, f"decay_rate must be < 0 so that β2_t → 1 (got {g['decay_rate']!r})"),
        (g["weight_decay"] < 0, f"weight_decay must be ≥ 0 (got {g['weight_decay']!r})"),
    ]
    for bad, message in problems:
        if bad:
            raise TrainingError(f"Flora: {message}")


# ---------------------------------------------------------------- compressed gradient accumulation


class CompressedAccumulator:
    """Gradient accumulation over ``accumulation_steps`` micro-batches, ≥2-D gradients kept compressed.

    Hooks every trainable ≥2-D parameter (``register_post_accumulate_grad_hook``). On each backward
    pass the weight's gradient is down-projected with its current seed, added to a small buffer
    (rank·max(m,n)) and ``p.grad`` is set to None, so no full gradient outlives its micro-batch. On
    the k-th backward the buffer is up-projected into ``p.grad`` and the seed advances; then call
    ``optimizer.step()`` (any optimizer) and ``optimizer.zero_grad()`` as usual. 1-D parameters
    accumulate in ``p.grad`` the plain PyTorch way. Gradients are summed: scale the loss by 1/k
    as with ordinary accumulation.

    A micro-batch is one ``backward()`` that reaches at least one hooked weight (counted by an
    autograd end-of-backward callback); a weight that got no gradient in the last micro-batch is
    released at its end all the same. Seeds start at ``seed + i`` for the i-th (0-based) ≥2-D
    parameter, as in the reference's ``FloraAccelerator`` (seed 0). Tensors with more than two
    dimensions are projected as (shape[0], rest) matrices.

        acc = CompressedAccumulator(model.parameters(), rank=64, accumulation_steps=4)
        for i, batch in enumerate(batches):
            (loss_fn(model, batch) / 4).backward()
            if (i + 1) % 4 == 0:
                optimizer.step(); optimizer.zero_grad()
    """

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict[str, Any]], rank: int,
                 accumulation_steps: int, seed: int = 0) -> None:
        if not isinstance(rank, int) or rank < 1:
            raise TrainingError(f"CompressedAccumulator: rank must be an int ≥ 1 (got {rank!r})")
        if not isinstance(accumulation_steps, int) or accumulation_steps < 2:
            raise TrainingError(f"CompressedAccumulator: accumulation_steps must be an int ≥ 2 (got "
                                f"{accumulation_steps!r}); with one micro-batch there is nothing to accumulate")
        flat: list[torch.Tensor] = []
        for item in params:
            flat.extend(item["params"] if isinstance(item, dict) else [item])
        unique = list({id(p): p for p in flat if p.requires_grad}.values())
        self.params = [p for p in unique if p.dim() >= 2]
        if not self.params:
            raise TrainingError("CompressedAccumulator: no trainable parameter with ≥ 2 dimensions to compress")
        self.rank, self.accumulation_steps = rank, accumulation_steps
        self.seeds = [int(seed) + i for i in range(len(self.params))]
        self.micro_step = 0  # backward passes done in the current accumulation window
        self._buffers: list[torch.Tensor | None] = [None] * len(self.params)
        self._callback_queued = False
        self._handles = [p.register_post_accumulate_grad_hook(partial(self._on_grad, i))
                         for i, p in enumerate(self.params)]

    def _projection(self, i: int, like: torch.Tensor) -> torch.Tensor:
        return random_projection(_matrix_shape(self.params[i]), self.rank, self.seeds[i], like.device, like.dtype)

    @torch.no_grad()
    def _on_grad(self, i: int, p: torch.Tensor) -> None:
        if not self._callback_queued:
            self._callback_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._end_micro_batch)
        proj = self._projection(i, p.grad)
        small = project_down(p.grad.reshape(_matrix_shape(p)), proj)
        self._buffers[i] = small if self._buffers[i] is None else self._buffers[i].add_(small)
        p.grad = None
        if self.micro_step + 1 == self.accumulation_steps:
            self._release(i, proj)

    def _release(self, i: int, proj: torch.Tensor | None = None) -> None:
        """p.grad = up(buffer); the buffer goes, and the seed moves on to the next projection."""
        p, buf = self.params[i], self._buffers[i]
        proj = self._projection(i, buf) if proj is None else proj
        p.grad = project_up(buf, proj, _matrix_shape(p)).reshape(p.shape)
        self._buffers[i] = None
        self.seeds[i] = next_seed(self.seeds[i])

    @torch.no_grad()
    def _end_micro_batch(self) -> None:
        self._callback_queued = False
        self.micro_step += 1
        if self.micro_step == self.accumulation_steps:
            self.micro_step = 0
            for i, buf in enumerate(self._buffers):
                if buf is not None:  # no gradient in the last micro-batch, but some before
                    self._release(i)

    def state_dict(self) -> dict[str, Any]:
        """Seeds, pending compressed sums (by index into ``self.params``) and the micro-batch count."""
        return {"rank": self.rank, "accumulation_steps": self.accumulation_steps, "micro_step": self.micro_step,
                "seeds": list(self.seeds),
                "buffers": {i: b.clone() for i, b in enumerate(self._buffers) if b is not None}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()`` output; the parameters must be the same shapes in the same order."""
        if (state["rank"], state["accumulation_steps"]) != (self.rank, self.accumulation_steps):
            raise TrainingError(f"CompressedAccumulator: state is for rank {state['rank']}, "
                                f"{state['accumulation_steps']} steps; this one has rank {self.rank}, "
                                f"{self.accumulation_steps} steps")
        if len(state["seeds"]) != len(self.params):
            raise ShapeMismatchError(f"CompressedAccumulator: state has {len(state['seeds'])} compressed "
                                     f"parameters, this one {len(self.params)}; build it from the same parameters")
        buffers: list[torch.Tensor | None] = [None] * len(self.params)
        for i, buf in state["buffers"].items():
            i = int(i)
            p, (m, n) = self.params[i], _matrix_shape(self.params[i])
            want = (self.rank, n) if m < n else (m, self.rank)
            if tuple(buf.shape) != want:
                raise ShapeMismatchError(f"CompressedAccumulator: buffer {i} has shape {tuple(buf.shape)}, "
                                         f"expected {want} for a parameter of shape {tuple(p.shape)}")
            buffers[i] = buf.to(device=p.device, dtype=p.dtype).clone()
        self.seeds = [int(s) for s in state["seeds"]]
        self.micro_step = int(state["micro_step"])
        self._buffers = buffers

    def remove(self) -> None:
        """Unhook the parameters and drop any pending compressed sums."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._buffers = [None] * len(self.params)


def _matrix_shape(p: torch.Tensor) -> tuple[int, int]:
    return (p.shape[0], math.prod(p.shape[1:]))
