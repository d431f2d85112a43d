"""Training-memory accounting: where the bytes of one training step go, counted exactly.

Four resident categories are counted, each as the bytes of distinct tensor *storages* so that
tied weights, views and flat buffers are counted once:

- parameters (buffers are reported separately and left out of ``total``),
- gradients present in ``.grad``,
- optimizer state (every tensor in ``optimizer.state``, including AdamW's scalar ``step``),
- activations: the tensors autograd saves for backward during one forward pass, seen through
  ``torch.autograd.graph.saved_tensors_hooks``. Parameters saved by an op (e.g. the weight a
  matmul keeps for ``grad_input``) are excluded because they are already counted as parameters.

Counting storages rather than tensor sizes is deliberate: a small view saved from a large
buffer keeps the whole buffer alive, so the storage size is the honest upper bound of what stays
in memory (it can overcount what the view itself needs). On CUDA the measured step's
``torch.cuda.max_memory_allocated`` is reported too, as a cross-check of the exact counts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from lrsurgery.errors import LrsurgeryError

_StorageKey = tuple[str, int]
_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


@dataclass
class MemoryReport:
    """Bytes per category for one training step; counts are numbers of parameters, not bytes."""

    params: int
    trainable_params: int
    total_params: int
    grads: int
    optimizer_state: int
    activations: int
    cuda_peak: int | None
    buffers: int = 0

    @property
    def total(self) -> int:
        """Exactly counted bytes: parameters, gradients, optimizer state and saved activations."""
        return self.params + self.grads + self.optimizer_state + self.activations

    def as_dict(self) -> dict[str, int | None]:
        """All fields plus ``total``, ready for JSON or a table."""
        return {**asdict(self), "total": self.total}


def _storage(t: torch.Tensor) -> tuple[_StorageKey, int]:
    """Identity and size of the storage behind ``t``, so views of one buffer count once.

    Storage-less tensors (meta, some subclasses) fall back to the tensor's own identity and size.
    """
    try:
        storage = t.untyped_storage()
        if storage.data_ptr() != 0:
            return (str(t.device), storage.data_ptr()), storage.nbytes()
    except (RuntimeError, NotImplementedError):
        pass
    return ("id", id(t)), t.numel() * t.element_size()


def _unique_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Sum of storage bytes over ``tensors``, each storage once."""
    return sum(dict(_storage(t) for t in tensors).values())


def parameter_bytes(model: nn.Module) -> tuple[int, int, int]:
    """(bytes of all parameters, count trainable, count total); shared parameters counted once."""
    params = list(model.parameters())  # deduplicates tied parameters by identity
    trainable = sum(p.numel() for p in params if p.requires_grad)
    return _unique_bytes(params), trainable, sum(p.numel() for p in params)


def buffer_bytes(model: nn.Module) -> int:
    """Bytes of the model's buffers (running stats, masks), each storage once."""
    return _unique_bytes(model.buffers())


def grad_bytes(model: nn.Module) -> int:
    """Bytes of the ``.grad`` tensors currently present on the model's parameters."""
    return _unique_bytes(p.grad for p in model.parameters() if p.grad is not None)


def state_tensors(value: Any, _seen: set[int] | None = None) -> Iterator[torch.Tensor]:
    """Every tensor in optimizer state: in dicts, lists, tuples, and in objects' attributes
    (galore-torch keeps a projector object per weight whose basis is no state slot)."""
    seen = set() if _seen is None else _seen
    if id(value) in seen:
        return
    seen.add(id(value))
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from state_tensors(item, seen)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from state_tensors(item, seen)
    elif hasattr(value, "__dict__") and not isinstance(value, type):
        yield from state_tensors(vars(value), seen)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of all tensors in ``optimizer.state`` (nested containers too), each storage once."""
    return _unique_bytes(state_tensors(list(optimizer.state.values())))


class SavedTensorMeter:
    """Counts bytes of tensors autograd saves for backward, each storage once, excluding
    parameters (and their views) of `model` (they live in memory anyway).

    Storages are identified by device and address. That is exact within one forward pass, where
    every saved tensor stays alive until backward, so no address is reused. While active, the
    meter is the innermost ``saved_tensors_hooks`` pair and so replaces any outer pair; hooks
    installed inside it (non-reentrant checkpointing, compressing autograd functions) win, and
    the meter then sees only what they actually keep.
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = ()) -> None:
        self.bytes = 0
        self.count = 0
        self._excluded = {_storage(t)[0] for t in exclude}
        self._seen: set[_StorageKey] = set()
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        """Record the saved tensor's storage unless already seen or excluded; keep it as is."""
        key, nbytes = _storage(tensor)
        if key not in self._excluded and key not in self._seen:
            self._seen.add(key)
            self.bytes += nbytes
            self.count += 1
        return tensor

    @staticmethod
    def _unpack(tensor: torch.Tensor) -> torch.Tensor:
        """Identity: the meter observes and never changes what backward gets."""
        return tensor

    def __enter__(self) -> SavedTensorMeter:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)


def _cuda_device(model: nn.Module) -> torch.device | None:
    """The CUDA device the model's parameters live on, or None for a model not on CUDA."""
    if not torch.cuda.is_available():
        return None
    return next((p.device for p in model.parameters() if p.device.type == "cuda"), None)


def measure_step(
    model: nn.Module,
    step_fn: Callable[[], torch.Tensor],
    optimizer: torch.optim.Optimizer | None = None,
) -> MemoryReport:
    """Run one training step under the meter: loss = step_fn(); loss.backward(); optimizer.step()
    if given; then report (do not zero grads before measuring grads).

    Only the forward (``step_fn``) is metered, since that is where tensors are saved for backward;
    parameters and buffers are excluded from activations. ``cuda_peak`` is None unless the model
    is on CUDA.
    """
    device = _cuda_device(model)
    if device is not None:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    meter = SavedTensorMeter(exclude=[*model.parameters(), *model.buffers()])
    with meter:
        loss = step_fn()
    loss.backward()
    if optimizer is not None:
        optimizer.step()
    cuda_peak = None
    if device is not None:
        torch.cuda.synchronize(device)
        cuda_peak = torch.cuda.max_memory_allocated(device)
    params, trainable, total = parameter_bytes(model)
    return MemoryReport(
        params=params,
        trainable_params=trainable,
        total_params=total,
        grads=grad_bytes(model),
        optimizer_state=optimizer_state_bytes(optimizer) if optimizer is not None else 0,
        activations=meter.bytes,
        cuda_peak=cuda_peak,
        buffers=buffer_bytes(model),
    )


def format_bytes(n: int) -> str:
    """Human-readable binary size: "512 B", "1.50 MiB", "3.20 GiB"."""
    size, unit = float(n), _UNITS[0]
    for unit in _UNITS:
        if abs(size) < 1024 or unit == _UNITS[-1]:
            break
        size /= 1024
    return f"{n} B" if unit == "B" else f"{size:.2f} {unit}"


def lora_estimate(
    shapes: list[tuple[int, int]],
    rank: int,
    bytes_per_param: int = 4,
    optimizer_states: int = 2,
) -> dict[str, int]:
    """Memory LoRA adds on Linear weights of shape (out, in): ``rank * (in + out)`` trainable
    parameters each, with one gradient and ``optimizer_states`` state tensors (AdamW: 2) apiece.

    Scalar per-parameter optimizer counters (AdamW's ``step``) are not included.
    """
    if rank < 1 or bytes_per_param < 1 or optimizer_states < 0:
        raise LrsurgeryError(
            f"lora_estimate needs rank >= 1, bytes_per_param >= 1 and optimizer_states >= 0; "
            f"got rank={rank}, bytes_per_param={bytes_per_param}, optimizer_states={optimizer_states}."
        )
    trainable = sum(rank * (fan_in + fan_out) for fan_out, fan_in in shapes)
    param_bytes = trainable * bytes_per_param
    return {
        "trainable_params": trainable,
        "param_bytes": param_bytes,
        "grad_bytes": param_bytes,
        "optimizer_bytes": param_bytes * optimizer_states,
    }
