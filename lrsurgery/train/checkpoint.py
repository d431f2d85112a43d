"""Training checkpoints that make a killed run resumable to bit-identical weights.

A checkpoint is a directory written atomically (temp dir + rename):
    state.safetensors   trainable tensors, ReLoRA's folded factors and the weights they changed
    trainer.pt          optimizer and schedule state, RNG states, data position, config, history
``trainer.pt`` holds only tensors and plain Python values and is read with
``torch.load(weights_only=True)``: no pickled code is ever executed.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lrsurgery.errors import TrainingError
from lrsurgery.layers.lora import LoRALinear
from lrsurgery.layers.lte import LTELinear

STATE, TRAINER = "state.safetensors", "trainer.pt"


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """What changes during training: trainable tensors, plus folded ReLoRA history and its weights."""
    state = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    # VeLoRA's projection vectors: set from the first batch, so a resumed run must get them back
    state.update({n: b.detach().cpu().contiguous() for n, b in model.named_buffers() if n.endswith("velora.v")})
    for name, m in model.named_modules():
        if isinstance(m, LTELinear):  # merges change W; the snapshots say what was merged last
            state[f"{name}.weight"] = m.weight.detach().cpu().contiguous()
            state.update({f"{name}.{k}": getattr(m, k).cpu().contiguous() for k in ("prev_A", "prev_B")
                          if getattr(m, k) is not None})
        if isinstance(m, LoRALinear) and m.folded_A is not None:
            state[f"{name}.weight"] = m.weight.detach().cpu().contiguous()
            state[f"{name}.folded_A"] = m.folded_A.cpu().contiguous()
            state[f"{name}.folded_B"] = m.folded_B.cpu().contiguous()
    return state


@torch.no_grad()
def load_model_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Inverse of ``model_state`` (the model must have the same adapters injected)."""
    params = {**dict(model.named_parameters()),
              **{n: b for n, b in model.named_buffers() if n.endswith(("velora.v", ".prev_A", ".prev_B"))}}
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear) and f"{name}.folded_A" in state:
            m.folded_A = state.pop(f"{name}.folded_A").to(m.weight.device)
            m.folded_B = state.pop(f"{name}.folded_B").to(m.weight.device)
    for key, value in state.items():
        if key not in params:
            raise TrainingError(f"checkpoint tensor {key!r} has no place in this model; was the run re-injected?")
        params[key].copy_(value)


def save(path: Path, model: nn.Module, trainer: dict[str, Any], base_records: dict[str, dict]) -> None:
    """Write the checkpoint directory atomically (the previous one is replaced only when complete)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        save_file(model_state(model), str(tmp / STATE))
        torch.save({**trainer, "base_records": base_records}, tmp / TRAINER)
        old = path.with_name(path.name + ".old")
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        if old.exists():
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def load(path: Path, model: nn.Module) -> dict[str, Any]:
    """Restore the model's trained tensors and return the trainer state."""
    if not (path / TRAINER).is_file():
        raise TrainingError(f"no checkpoint in {path}; train with --checkpoint-every N to write one")
    trainer = torch.load(path / TRAINER, map_location="cpu", weights_only=True)
    load_model_state(model, load_file(str(path / STATE)))
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear) and name in trainer["base_records"]:
            m.base_weight_record = trainer["base_records"][name]
    return trainer


def base_records(model: nn.Module) -> dict[str, dict]:
    """ReLoRA layers' records of their original base weights (kept with the checkpoint)."""
    return {n: m.base_weight_record for n, m in model.named_modules()
            if isinstance(m, LoRALinear) and m.base_weight_record is not None}


def rng_state() -> dict[str, Any]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
