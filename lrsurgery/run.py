"""A run directory: the recipe that rebuilds the model, the current adapter, and the metrics log.

    RUN_DIR/recipe.json          base reference + load arguments, injection config, training sessions
    RUN_DIR/adapter.safetensors  the adapter (format v1), rewritten atomically after training
    RUN_DIR/metrics.jsonl        one JSON record per step and per evaluation
``inject`` creates it; ``train`` reads the recipe instead of asking again, trains, and saves.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from lrsurgery import lineage
from lrsurgery.adapter import apply_adapter, load_adapter, save_adapter
from lrsurgery.errors import LrsurgeryError, OutputExistsError
from lrsurgery.format import atomic_write
from lrsurgery.models import base_info, input_config, load_model, model_dir
from lrsurgery.surgery import InjectReport, inject
from lrsurgery.targets import TargetSpec, head_names
from lrsurgery.train.data import build_data
from lrsurgery.train.distributed import world
from lrsurgery.train.loop import TrainConfig, TrainResult, jsonl_logger, train

RECIPE, ADAPTER, METRICS, CHECKPOINT = "recipe.json", "adapter.safetensors", "metrics.jsonl", "checkpoint"


@dataclass
class Run:
    """An opened run: its directory, recipe, and the model with the adapter applied (trainable)."""

    path: Path
    recipe: dict[str, Any]
    model: nn.Module


def create_run(model_ref: str, out: str | os.PathLike, *, weights: str | None = None, init: str = "pretrained",
               num_classes: int | None = None, seed: int = 0, method: str = "lora", rank: int = 8,
               alpha: float | None = None, rslora: bool = False, dropout: float = 0.0,
               targets: TargetSpec = None, train: TargetSpec = None, groups: int | None = None,
               velora_groups: int | None = None, heads: int | None = None, merge_every: int | None = None,
               lte_mode: str = "parallel", reset_optimizer: bool = False,
               on: Sequence[str | os.PathLike] = (), force: bool = False) -> tuple[Run, InjectReport]:
    """Load the base, inject, and write a run directory with the initialized adapter and the recipe.

    ``on`` lists adapters to train on top of, root first: they are folded into the base in order
    (each checked against the base and the ones before it), and the new adapter records them as parents.
    """
    out = Path(out)
    if (out / RECIPE).exists() and not force:
        raise OutputExistsError(f"{out} already holds a run; pass --force to overwrite it or choose another -o")
    parents = [load_adapter(p) for p in on]
    load = {"weights": weights, "init": init, "num_classes": num_classes, "seed": seed}
    if parents:  # the base the parents were made on (weights file, head size, init seed), unless told otherwise
        from lrsurgery.ops.stack import base_load_kwargs
        base = parents[0].meta["base"]
        inherited = base_load_kwargs(model_ref, base, weights=weights)
        load.update(weights=inherited["weights"], init=inherited["init"] if init == "pretrained" else init,
                    num_classes=inherited["num_classes"] if num_classes is None else num_classes)
        if base.get("init_seed") is not None:
            load["seed"] = base["init_seed"]
    model = load_model(model_ref, **load)
    if parents:
        from lrsurgery.ops.stack import apply_stack
        apply_stack(model, parents)
    if train is None and num_classes is not None and method in ("lora", "velora", "lte"):
        train = sorted(head_names(model))  # a new head must be trained in full
    with torch.random.fork_rng(devices=[]):  # the initial adapter is a function of the seed
        torch.manual_seed(seed)
        report = inject(model, method=method, rank=rank, alpha=alpha, targets=targets, train=train,
                        dropout=dropout, rslora=rslora, groups=groups, velora_groups=velora_groups, heads=heads,
                        merge_every=merge_every, lte_mode=lte_mode, reset_optimizer=reset_optimizer)
    lineage.pin_records(model)
    info = base_info(model)
    recipe = {"base": info.as_dict(), "load": {"ref": info.ref, **info.load_kwargs()},
              "inject": {**report.config.as_dict(), "target_spec": targets, "train_spec": train},
              "seed": seed, "sessions": []}
    if parents:  # open_run rebuilds the same stack from these files, and checks they did not change
        recipe["on"] = [{"path": getattr(a, "source", None) or str(Path(p).resolve()), "id": lineage.adapter_id(a),
                         "name": lineage.adapter_name(a)} for p, a in zip(on, parents)]
    out.mkdir(parents=True, exist_ok=True)
    if (out / METRICS).exists():
        (out / METRICS).unlink()
    save_adapter(model, out / ADAPTER, force=True, provenance={"method": method, "steps": 0})
    write_recipe(out, recipe)
    return Run(out, recipe, model), report


def write_recipe(run_dir: Path, recipe: dict[str, Any]) -> None:
    atomic_write(run_dir / RECIPE, lambda tmp: tmp.write_text(json.dumps(recipe, indent=2)))


def open_run(run_dir: str | os.PathLike) -> Run:
    """Rebuild the base from the recipe and apply the run's adapter (checked against the base, trainable)."""
    run_dir = Path(run_dir)
    if not (run_dir / RECIPE).is_file():
        raise LrsurgeryError(f"{run_dir} is not a run directory (no {RECIPE}); create one with `lrsurgery inject`")
    recipe = json.loads((run_dir / RECIPE).read_text())
    load = dict(recipe["load"])
    model = load_model(load.pop("ref"), **load)
    _fold_parents(model, run_dir, recipe.get("on", []))
    cfg = recipe["inject"]
    if cfg["method"] in ("lora", "velora", "lte"):
        inject(model, method=cfg["method"], rank=cfg["rank"] or 8, alpha=cfg["alpha"], targets=cfg["targets"],
               train=cfg["train"] or None, dropout=cfg["dropout"], rslora=cfg["rslora"], groups=cfg.get("groups"),
               velora_groups=cfg.get("velora_groups"), heads=cfg.get("heads"), merge_every=cfg.get("merge_every"),
               lte_mode=cfg.get("lte_mode") or "parallel", reset_optimizer=cfg.get("reset_optimizer", False))
    lineage.pin_records(model)
    apply_adapter(model, run_dir / ADAPTER, trainable=True)
    return Run(run_dir, recipe, model)


def _fold_parents(model: nn.Module, run_dir: Path, on: list[dict[str, Any]]) -> None:
    """Fold the adapters a run was created on into its base, refusing any that is missing or changed."""
    from lrsurgery.ops.stack import fold_adapter
    for parent in on:
        path = parent["path"]  # a file, or a pinned hub reference hf:ORG/NAME@COMMIT[:FILE]
        if not path.startswith("hf:") and not Path(path).is_file():
            raise LrsurgeryError(f"{run_dir} was trained on top of {path}, which no longer exists; put it back "
                                 f"(adapter id {lineage.short_id(parent['id'])})")
        adapter = load_adapter(path)
        if lineage.adapter_id(adapter) != parent["id"]:
            raise LrsurgeryError(f"{path} changed since {run_dir} was created on top of it (id "
                                 f"{lineage.short_id(lineage.adapter_id(adapter))}, expected "
                                 f"{lineage.short_id(parent['id'])}); restore the original file")
        fold_adapter(model, adapter)


def train_run(run_dir: str | os.PathLike, data: str, config: TrainConfig, *, max_length: int = 128,
              checkpoint_every: int | None = None, resume: bool = False) -> TrainResult:
    """Train a run on a data spec, then save its adapter and record the session in the recipe.

    ``checkpoint_every`` writes RUN_DIR/checkpoint every N steps; ``resume`` continues a killed
    session from it with the configuration it was started with, to bit-identical weights.
    """
    run = open_run(run_dir)
    ckpt_dir = run.path / CHECKPOINT
    if resume:
        config, checkpoint_every = _resume_config(ckpt_dir, config, _steps_before(run))
    tokenizer = None
    if data.startswith("text:"):
        tokenizer = load_tokenizer(run.model)
    cfg = input_config(run.model)
    bundle = build_data(data, image_size=cfg["image_size"], in_chans=cfg["in_chans"], mean=cfg["mean"],
                        std=cfg["std"], tokenizer=tokenizer, max_length=max_length, seed=config.seed)
    head = getattr(run.model, "num_classes", None) or getattr(getattr(run.model, "config", None), "num_labels", None)
    if bundle.num_classes and head and bundle.num_classes != head:
        raise LrsurgeryError(f"the data has {bundle.num_classes} classes but the model's head has {head}; "
                             f"inject with --num-classes {bundle.num_classes}")
    result = train(run.model, bundle, config, log=_session_logger(run), checkpoint_dir=ckpt_dir,
                   checkpoint_every=checkpoint_every, resume=resume)
    if not world().main:  # under torchrun only rank 0 writes
        return result
    steps = sum(s["steps"] for s in run.recipe["sessions"]) + result.steps
    save_adapter(run.model.cpu(), run.path / ADAPTER, force=True, provenance={
        "method": run.recipe["inject"]["method"], "optimizer": config.optim.name, "steps": steps, "data": data,
        "schedule": "relora" if config.relora else "constant",
        "eval": result.eval})
    run.recipe["sessions"].append({"data": data, "config": config.as_dict(), "steps": result.steps,
                                   "eval": result.eval, "seconds": round(result.seconds, 3)})
    write_recipe(run.path, run.recipe)
    if ckpt_dir.exists():  # the session is complete: its adapter supersedes the checkpoint
        shutil.rmtree(ckpt_dir)
    return result


def _steps_before(run: Run) -> int:
    """Optimizer steps of the run's completed sessions: where this session's step numbers start."""
    return sum(s["steps"] for s in run.recipe["sessions"])


def _session_logger(run: Run):
    """metrics.jsonl records numbered across sessions (step = run-wide step) and tagged with the session."""
    log, offset, session = jsonl_logger(run.path / METRICS), _steps_before(run), len(run.recipe["sessions"]) + 1

    def wrapped(record: dict[str, Any]) -> None:
        log({**record, "step": record["step"] + offset, "session": session})
    return wrapped


def _resume_config(ckpt_dir: Path, given: TrainConfig, steps_before: int = 0) -> tuple[TrainConfig, int | None]:
    """The killed session's config (device and progress may change) and its checkpoint interval."""
    from lrsurgery.train.checkpoint import TRAINER
    if not (ckpt_dir / TRAINER).is_file():
        raise LrsurgeryError(f"nothing to resume: {ckpt_dir} has no checkpoint (train with --checkpoint-every N)")
    state = torch.load(ckpt_dir / TRAINER, map_location="cpu", weights_only=True)
    config = TrainConfig.from_dict(state["config"])
    config.device, config.progress = given.device, given.progress
    if world().main:
        _truncate_metrics(ckpt_dir.parent / METRICS, steps_before + state["position"]["step"])
    return config, state.get("checkpoint_every")


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop the metrics a killed session logged after its last checkpoint."""
    if path.exists():
        lines = [ln for ln in path.read_text().splitlines() if json.loads(ln).get("step", 0) <= step]
        atomic_write(path, lambda tmp: tmp.write_text("".join(ln + "\n" for ln in lines)))

def load_tokenizer(model: nn.Module):
    """The tokenizer saved beside the base model (transformers directories and hub snapshots)."""
    from transformers import AutoTokenizer
    info = base_info(model)
    where = model_dir(info) if info else None
    if where is None:
        raise LrsurgeryError("text data needs a tokenizer, but the base was not loaded from a transformers "
                             "directory or the hub")
    try:
        return AutoTokenizer.from_pretrained(where)
    except Exception as e:
        raise LrsurgeryError(f"no tokenizer in {where} ({e}); save one beside the model")
