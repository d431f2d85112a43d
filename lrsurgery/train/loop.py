"""The training loop: the chosen optimizer over the trainable parameters, per-epoch evaluation, JSONL metrics.

Deterministic for a given seed on a given device (data order, dropout and init all draw from it).
The first step is measured: bytes of parameters, gradients, optimizer state and saved activations.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from lrsurgery.errors import TrainingError
from lrsurgery.memory import MemoryReport, measure_step, optimizer_state_bytes
from lrsurgery.optim import OptimConfig, build_optimizer
from lrsurgery.train import lte as lte_train
from lrsurgery.train.data import DataBundle, collate
from lrsurgery.train.relora import ReLoRAConfig, ReLoRASchedule


@dataclass
class TrainConfig:
    """Hyperparameters of one training session."""

    epochs: int | None = 1          # ignored when steps is set
    steps: int | None = None        # optimizer steps
    batch_size: int = 32            # examples per optimizer step (split into `accumulation` micro-batches)
    accumulation: int = 1           # micro-batches per optimizer step
    lr: float = 1e-3
    weight_decay: float = 0.0
    max_grad_norm: float | None = None
    optim: OptimConfig = field(default_factory=OptimConfig)
    relora: ReLoRAConfig | None = None   # the ReLoRA schedule (merge-and-restart, jagged cosine)
    bf16: bool = False              # bf16 autocast for the forward pass
    seed: int = 0
    device: str = "auto"            # "auto" = CUDA when present, else CPU
    eval_batch_size: int = 256
    progress: bool = True

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["relora"] = self.relora.as_dict() if self.relora else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        """Inverse of ``as_dict`` (how a resumed run gets back its exact configuration)."""
        d = dict(d)
        d["optim"] = OptimConfig(**d["optim"])
        d["relora"] = ReLoRAConfig(**d["relora"]) if d.get("relora") else None
        return cls(**d)


@dataclass
class TrainResult:
    steps: int
    epochs: float
    seconds: float
    train_loss: float
    eval: dict[str, float]
    memory: MemoryReport | None
    history: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["memory"] = self.memory.as_dict() if self.memory else None
        return d


def select_device(spec: str = "auto") -> torch.device:
    """``auto`` picks CUDA when available, else CPU; anything else is passed to ``torch.device``."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as e:
        raise TrainingError(f"--device {spec!r} is not a device ({e}); use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainingError(f"--device {spec} asks for CUDA, but no CUDA device is available; use --device cpu")
    return device


def compute_loss(model: nn.Module, batch: Any, task: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Loss of one batch, and per-example correctness for classification (None for LMs)."""
    if task == "causal-lm":
        batch = {k: v.to(device) for k, v in batch.items()}
        out = model(**batch)
        if getattr(out, "loss", None) is None:
            raise TrainingError("text data needs a causal LM (a model with an LM head); load e.g. GPT2LMHeadModel")
        return out.loss, None
    images, labels = batch[0].to(device), batch[1].to(device)
    out = model(images)
    logits = out.logits if hasattr(out, "logits") else out
    if logits.dim() != 2:
        raise TrainingError(f"the model returns {tuple(logits.shape)} outputs, not class logits; "
                            "give the model a classification head (--num-classes N)")
    return F.cross_entropy(logits, labels), logits.argmax(-1) == labels


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, task: str, device: torch.device, batch_size: int = 256) -> dict[str, float]:
    """Mean loss (and accuracy for classification) over ``dataset`` in eval mode."""
    was_training = model.training
    model.eval()
    total_loss, n, correct = 0.0, 0, 0
    for i in range(0, len(dataset), batch_size):  # plain batching: no DataLoader draws from the global RNG
        batch = collate([dataset[j] for j in range(i, min(i + batch_size, len(dataset)))])
        loss, hits = compute_loss(model, batch, task, device)
        size = len(batch[1]) if task != "causal-lm" else batch["input_ids"].shape[0]
        total_loss += float(loss) * size
        n += size
        correct += int(hits.sum()) if hits is not None else 0
    model.train(was_training)
    result = {"loss": total_loss / max(n, 1)}
    if task != "causal-lm":
        result["accuracy"] = correct / max(n, 1)
    else:
        result["perplexity"] = math.exp(min(result["loss"], 50.0))
    return result


@dataclass
class Position:
    """Where training is: enough, with the RNG states, to resume bit for bit."""

    step: int = 0            # optimizer steps done
    micro_step: int = 0      # micro-batches done
    epoch: int = 0           # epochs completed
    batch: int = 0           # micro-batches done in the current epoch
    running: float = 0.0     # sum of step losses
    history: list[dict[str, Any]] = field(default_factory=list)


def epoch_batches(n: int, micro: int, seed: int, epoch: int, drop_last: bool) -> list[list[int]]:
    """The shuffled micro-batches of one epoch, a pure function of (seed, epoch): resumable anywhere."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
    batches = [order[i:i + micro] for i in range(0, n, micro)]
    return [b for b in batches if len(b) == micro] if drop_last else batches


def train(model: nn.Module, data: DataBundle, config: TrainConfig,
          log: Callable[[dict[str, Any]], None] | None = None, checkpoint_dir: Path | None = None,
          checkpoint_every: int | None = None, resume: bool = False) -> TrainResult:
    """Train the model's trainable parameters on ``data``; return losses, eval metrics and memory.

    With ``checkpoint_every`` a checkpoint is written to ``checkpoint_dir`` every N optimizer steps;
    ``resume`` continues from it and reaches the same weights as an uninterrupted run.
    """
    from lrsurgery.train import checkpoint as ckpt
    from lrsurgery.train import distributed
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise TrainingError("the model has no trainable parameters: inject an adapter or pass --train")
    if config.accumulation < 1 or config.batch_size % config.accumulation:
        raise TrainingError(f"--batch-size {config.batch_size} must be a multiple of --accumulation {config.accumulation}")
    w = distributed.world()
    device = distributed.init(w, select_device(config.device))
    torch.manual_seed(config.seed)
    model.to(device).train()
    _check_combination(config, w)
    micro = config.batch_size // config.accumulation
    lte = lte_train.has_lte(model)
    if lte:
        if config.relora:
            raise TrainingError("ReLoRA restarts LoRA layers; an LTE run merges its heads on its own schedule: "
                                "drop --schedule relora")
        if w.size > 1 and checkpoint_every:
            raise TrainingError("checkpoints of LTE runs under torchrun are not supported yet: drop "
                                "--checkpoint-every or train in one process")
        lte_train.prepare(model, w, micro)  # before the optimizer: a rank keeps only its own heads
    optimizer = build_optimizer(model, config.optim, config.lr, config.weight_decay, config.accumulation)
    accumulator = None
    if config.optim.accumulation_rank and config.accumulation > 1:
        from lrsurgery.optim.flora import CompressedAccumulator
        accumulator = CompressedAccumulator(params, config.optim.accumulation_rank, config.accumulation,
                                            seed=config.seed)
    n_train = len(data.train)
    drop_last = n_train >= config.batch_size
    steps_per_epoch = len(epoch_batches(n_train, micro, 0, 0, drop_last)) // config.accumulation
    if steps_per_epoch == 0:
        raise TrainingError(f"the training set ({n_train} examples) is smaller than one batch of "
                            f"{config.batch_size}; lower --batch-size")
    total = config.steps if config.steps else steps_per_epoch * (config.epochs or 1)
    schedule = ReLoRASchedule(model, optimizer, config.relora, total, config.seed) if config.relora else None
    if lte:
        schedule = lte_train.LTESchedule(model, optimizer, total, w)
    pos = Position()
    if resume:
        state = ckpt.load(checkpoint_dir, model)
        optimizer.load_state_dict(state["optimizer"])
        if accumulator is not None:
            accumulator.load_state_dict(state["accumulator"])
        if schedule is not None:
            schedule.load_state_dict(state["schedule"])
        pos = Position(**state["position"])
        ckpt.set_rng_state(state["rng"])
    log = log if log and w.main else (lambda record: None)
    # LTE heads are private to a rank: no DDP, and 1/W on the loss makes each head's gradient the
    # one-process one (the mean over the global batch)
    ddp = model if lte else distributed.wrap(model, w, device)
    loss_divisor = config.accumulation * (w.size if lte else 1)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.bf16)
    memory, window, start = None, 0.0, time.perf_counter()
    bar = tqdm(total=total, initial=pos.step, disable=not (config.progress and w.main), desc="train", unit="step",
               leave=False)
    while pos.step < total:
        batches = epoch_batches(n_train, micro, config.seed, pos.epoch, drop_last)
        batches = batches[:len(batches) - len(batches) % config.accumulation]  # whole steps only
        while pos.batch < len(batches) and pos.step < total:
            batch = collate([data.train[i] for i in distributed.shard(batches[pos.batch], w)])
            pos.batch += 1
            holder: dict[str, torch.Tensor] = {}

            def forward() -> torch.Tensor:
                with autocast:
                    holder["loss"] = compute_loss(ddp, batch, data.task, device)[0]
                return holder["loss"] / loss_divisor

            last_micro = (pos.micro_step + 1) % config.accumulation == 0
            # DDP: all-reduce gradients only on the step's last micro-batch (sums are the same)
            with (ddp.no_sync() if ddp is not model and not last_micro else contextlib.nullcontext()):
                if memory is None:  # measure the first step: it allocates everything later steps reuse
                    memory = measure_step(model, forward, optimizer=None)
                else:
                    forward().backward()
            loss_value = float(holder["loss"].detach())
            if not math.isfinite(loss_value):
                raise TrainingError(f"loss became {loss_value} at step {pos.step + 1}; lower --lr and retrain")
            window += loss_value / config.accumulation  # mean loss over the step's micro-batches
            pos.micro_step += 1
            if pos.micro_step % config.accumulation:
                continue
            if config.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            pos.step += 1
            window = distributed.mean(window, w)  # the global batch's loss, as one process would log it
            pos.running += window
            record = {"step": pos.step, "epoch": pos.epoch + 1, "loss": window, "lr": optimizer.param_groups[0]["lr"]}
            window = 0.0
            if schedule is not None:
                record.update(schedule.after_step(pos.step) or {})
            log(record)
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.4f}")
            if (pos.batch == len(batches) or pos.step == total) and w.main:
                _end_epoch(model, data, config, device, pos, log)
            if checkpoint_every and pos.step % checkpoint_every == 0 and pos.step < total and w.main:
                ckpt.save(checkpoint_dir, model, {
                    "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict() if schedule else None,
                    "accumulator": accumulator.state_dict() if accumulator else None,
                    "position": asdict(pos), "rng": ckpt.rng_state(), "config": config.as_dict(),
                    "checkpoint_every": checkpoint_every},
                    ckpt.base_records(model))
        if pos.batch == len(batches):
            pos.epoch, pos.batch = pos.epoch + 1, 0
    bar.close()
    if lte:
        lte_train.unshard(model, w)
    distributed.shutdown(w)
    for hooks in (accumulator, getattr(optimizer, "inner", None)):
        if hooks is not None:
            hooks.remove()
    if memory is not None:
        memory.optimizer_state = optimizer_state_bytes(optimizer)
    final = pos.history[-1] if pos.history else {}
    return TrainResult(steps=pos.step, epochs=pos.step / steps_per_epoch, seconds=time.perf_counter() - start,
                       train_loss=pos.running / max(pos.step, 1),
                       eval={k[5:]: v for k, v in final.items() if k.startswith("eval_")},
                       memory=memory, history=pos.history)


def _check_combination(config: TrainConfig, w: Any) -> None:
    """Refuse option combinations that would silently train something else than asked."""
    layerwise, compressed = config.optim.layerwise, bool(config.optim.accumulation_rank)
    if layerwise and config.max_grad_norm:
        raise TrainingError("--layerwise frees each gradient as soon as it is used: it cannot clip the global "
                            "gradient norm; drop --max-grad-norm")
    if layerwise and compressed:
        raise TrainingError("choose either --layerwise or --accumulation-rank, not both")
    if (layerwise or compressed) and w.size > 1:
        raise TrainingError("--layerwise and --accumulation-rank run in a single process (their gradient hooks "
                            "would act before DDP averages the gradients)")
    if compressed and config.accumulation < 2:
        raise TrainingError("--accumulation-rank compresses gradient accumulation: set --accumulation ≥ 2")


def _end_epoch(model: nn.Module, data: DataBundle, config: TrainConfig, device: torch.device, pos: Position,
               log: Callable[[dict[str, Any]], None]) -> None:
    """Evaluate at the end of an epoch (or of training) and record it."""
    metrics = evaluate(model, data.eval, data.task, device, config.eval_batch_size)
    record = {"step": pos.step, "epoch": pos.epoch + 1, **{f"eval_{k}": v for k, v in metrics.items()}}
    pos.history.append(record)
    log(record)


def jsonl_logger(path: Path) -> Callable[[dict[str, Any]], None]:
    """A ``log`` callback that appends each record as one JSON line to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)

    def log(record: dict[str, Any]) -> None:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
    return log
