"""The ``lrsurgery`` command line: each command parses, calls the Python API, and prints a table or JSON.

User errors (``LrsurgeryError``) print one line on stderr, without a traceback, and exit 1.
"""

from __future__ import annotations

import sys
import warnings
from typing import Any

import click

from lrsurgery import __version__
from lrsurgery.errors import LrsurgeryError
from lrsurgery.report import adapter_summary, inspect_model, lineage_lines, print_json, rank_cell, table


class Group(click.Group):
    """A click group that shows project errors as one clear line and a non-zero exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                warnings.showwarning = _one_line_warning
                return super().invoke(ctx)
        except LrsurgeryError as e:
            click.echo(f"error: {e}", err=True)
            ctx.exit(e.exit_code)


def _one_line_warning(message: Warning | str, category: type, filename: str, lineno: int, file: Any = None,
                      line: str | None = None) -> None:
    """Warnings are for users too: one `warning:` line on stderr, no source location."""
    click.echo(f"warning: {message}", err=True)


def list_option(*names: str, help: str) -> Any:
    """A repeatable option whose values may also be comma-separated (``--targets a,b --targets c``)."""
    return click.option(*names, multiple=True, help=help + " Comma-separated; may repeat.")


def model_options(f: Any) -> Any:
    f = click.option("--seed", type=int, default=0, show_default=True, help="Seed of random inits (model, head).")(f)
    f = click.option("--num-classes", type=int, help="Replace the classification head with N classes.")(f)
    f = click.option("--init", type=click.Choice(["pretrained", "random"]), default="pretrained",
                     show_default=True, help="random: seeded fresh init instead of pretrained weights.")(f)
    f = click.option("--weights", type=click.Path(dir_okay=False), help="Weights file for timm:NAME (safetensors).")(f)
    return f


def targets_arg(values: tuple[str, ...]) -> Any:
    """CLI target values → the API's spec: None (preset), a regex string, or a list."""
    from lrsurgery.targets import _is_regex, split_spec
    if not values:
        return None
    if len(values) == 1 and _is_regex(values[0]):
        return values[0]
    return split_spec(values)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="lrsurgery")
def main() -> None:
    """Model surgery for memory-efficient low-rank training: inject, train, extract, merge adapters."""


@main.command()
@click.argument("model")
@model_options
@list_option("--targets", help="Modules to adapt (PEFT rules; default: the family preset).")
@click.option("--rank", type=int, default=8, show_default=True, help="LoRA rank for the estimate.")
@click.option("--all", "show_all", is_flag=True, help="List every module, not only linear layers.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def inspect(model: str, weights: str | None, init: str, num_classes: int | None, seed: int,
            targets: tuple[str, ...], rank: int, show_all: bool, as_json: bool) -> None:
    """List MODEL's modules, which ones the targets match, and LoRA's cost at --rank."""
    from lrsurgery.models import load_model
    m = load_model(model, weights=weights, init=init, num_classes=num_classes, seed=seed)
    info = inspect_model(m, targets_arg(targets), rank)
    if as_json:
        return print_json(info)
    rows = [r for r in info["modules"] if show_all or r["linear"]]
    table(f"{model} — {info['family'] or 'unknown family'}, {info['total_params']:,} parameters",
          ["module", "type", "shape", "params", "target"],
          [[r["name"], r["type"], "×".join(map(str, r["shape"])) if r["shape"] else "", f"{r['params']:,}",
            "✓" if r["target"] else ""] for r in rows])
    e = info["lora"]
    click.echo(f"{len(info['matched'])} target modules; LoRA rank {rank}: {e['trainable_params']:,} trainable "
               f"parameters ({e['trainable_params'] / max(info['total_params'], 1):.2%}), "
               f"adapter + grads + AdamW state ≈ {e['training_bytes_h']}")


@main.command()
@click.argument("model")
@model_options
@click.option("--method", type=click.Choice(["lora", "full", "velora", "lte"]), default="lora", show_default=True,
              help="lora: low-rank adapters; full: train the modules in full; velora: train the targets in "
                   "full with VeLoRA-compressed saved inputs; lte: H parallel LoRA heads merged every T steps.")
@click.option("--groups", type=int, help="VeLoRA (--method velora): sub-tokens per token; must divide the width.")
@click.option("--velora-groups", type=int, help="VeLoRA on LoRA's A branch (--method lora).")
@click.option("--heads", type=int, help="LTE (--method lte): LoRA heads per layer; the batch is split over them.")
@click.option("--merge-every", type=int, help="LTE: optimizer steps between merges of the heads into W.")
@click.option("--lte-mode", type=click.Choice(["parallel", "multihead"]), default="parallel", show_default=True,
              help="LTE: parallel = head h trains on the h-th batch chunk; multihead = every head sees the batch.")
@click.option("--reset-optimizer", is_flag=True, help="LTE: zero the heads' optimizer state at each merge.")
@click.option("--rank", "-r", type=int, default=8, show_default=True)
@click.option("--alpha", type=float, help="LoRA alpha (scaling alpha/r). Default: 2·rank.")
@click.option("--rslora", is_flag=True, help="Scale by alpha/sqrt(r) (rank-stabilized LoRA).")
@click.option("--dropout", type=float, default=0.0, show_default=True, help="Dropout on the adapter branch.")
@list_option("--targets", help="Modules to adapt (PEFT rules: name or .suffix; a regex; all-linear; preset).")
@list_option("--train", help="Modules to train in full, e.g. head.")
@click.option("--on", "on", multiple=True, type=click.Path(dir_okay=False),
              help="Train on top of this adapter (folded into the base first); repeat for a chain, root first.")
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False), help="Run directory to create.")
@click.option("--force", is_flag=True, help="Overwrite an existing run directory.")
@click.option("--json", "as_json", is_flag=True)
def inject(model: str, weights: str | None, init: str, num_classes: int | None, seed: int, method: str,
           groups: int | None, velora_groups: int | None, heads: int | None, merge_every: int | None,
           lte_mode: str, reset_optimizer: bool, rank: int,
           alpha: float | None, rslora: bool, dropout: float, targets: tuple[str, ...], train: tuple[str, ...],
           on: tuple[str, ...], out: str, force: bool, as_json: bool) -> None:
    """Wrap MODEL's target layers with LoRA and write a run directory (adapter + recipe)."""
    from lrsurgery.run import create_run
    run, report = create_run(model, out, weights=weights, init=init, num_classes=num_classes, seed=seed,
                             method=method, rank=rank, alpha=2.0 * rank if alpha is None else alpha,
                             rslora=rslora, dropout=dropout, targets=targets_arg(targets),
                             train=targets_arg(train), groups=groups, velora_groups=velora_groups, heads=heads,
                             merge_every=merge_every, lte_mode=lte_mode, reset_optimizer=reset_optimizer,
                             on=on, force=force)
    summary = {"run": str(run.path), "base": run.recipe["base"], "method": method,
               "targets": report.config.targets, "train": report.config.train,
               "trainable_params": report.trainable_params, "total_params": report.total_params,
               **({"on": run.recipe["on"]} if on else {})}
    if as_json:
        return print_json(summary)
    click.echo(f"base: {run.recipe['base']['ref']} (weights: {run.recipe['base']['source']})")
    for parent in run.recipe.get("on", []):
        click.echo(f"on top of: {parent['name']} (id {parent['id'][:12]})")
    click.echo(f"{method}: {len(report.config.targets)} adapted modules, trained in full: "
               f"{', '.join(report.config.train) or 'none'}")
    click.echo(f"trainable parameters: {report.trainable_params:,} of {report.total_params:,} "
               f"({report.trainable_params / report.total_params:.2%})")
    click.echo(f"run directory: {run.path}")


@main.command("train")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--data", required=True, help="digits[:5-9] | imagefolder:DIR | text:FILE")
@click.option("--epochs", type=int, default=1, show_default=True)
@click.option("--steps", type=int, help="Train for N steps instead of --epochs.")
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--lr", type=float, default=1e-3, show_default=True)
@click.option("--weight-decay", type=float, default=0.0, show_default=True)
@click.option("--max-grad-norm", type=float, help="Clip gradients to this norm.")
@click.option("--max-length", type=int, default=128, show_default=True, help="Token block length for text data.")
@click.option("--accumulation", type=int, default=1, show_default=True,
              help="Micro-batches per optimizer step (--batch-size is the whole step's batch).")
@click.option("--bf16", is_flag=True, help="bf16 autocast for the forward pass.")
@click.option("--optimizer", type=click.Choice(["adamw", "galore", "galore-adafactor", "flora"]), default="adamw",
              show_default=True)
@click.option("--optim-rank", type=int, default=128, show_default=True, help="GaLore/Flora projection rank.")
@click.option("--update-gap", type=int, default=200, show_default=True, help="GaLore: steps between SVD refreshes.")
@click.option("--scale", type=float, default=0.25, show_default=True, help="GaLore: scale of the projected update.")
@click.option("--proj-type", type=click.Choice(["std", "reverse_std", "left", "right", "full"]), default="std",
              show_default=True, help="GaLore: which side(s) to project.")
@click.option("--svd", type=click.Choice(["full", "randomized"]), default="full", show_default=True,
              help="GaLore: full SVD or torch.svd_lowrank at each refresh.")
@click.option("--kappa", type=int, default=1000, show_default=True, help="Flora: steps between projection resamples.")
@click.option("--beta1", type=float, default=0.9, show_default=True, help="Flora: momentum (0 = none).")
@click.option("--layerwise", is_flag=True, help="Per-layer updates: step each parameter in backward, free its grad.")
@click.option("--accumulation-rank", type=int, help="Flora: keep accumulated gradients compressed at this rank.")
@click.option("--schedule", type=click.Choice(["constant", "relora"]), default="constant", show_default=True)
@click.option("--restart-every", type=int, default=1000, show_default=True, help="ReLoRA: steps between restarts.")
@click.option("--prune", type=float, default=0.99, show_default=True, help="ReLoRA: optimizer-state fraction zeroed.")
@click.option("--prune-mode", type=click.Choice(["magnitude", "random", "reset"]), default="magnitude",
              show_default=True)
@click.option("--restart-warmup", type=int, default=50, show_default=True, help="ReLoRA: re-warmup steps.")
@click.option("--warmup", type=int, default=100, show_default=True, help="ReLoRA: first warmup steps.")
@click.option("--min-lr-ratio", type=float, default=0.1, show_default=True, help="ReLoRA: cosine floor.")
@click.option("--checkpoint-every", type=int, help="Write RUN_DIR/checkpoint every N steps (for --resume).")
@click.option("--resume", is_flag=True, help="Continue a killed run from its checkpoint, with its original settings.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto (CUDA when present), cpu, cuda:0, ...")
@click.option("--no-progress", is_flag=True)
@click.option("--json", "as_json", is_flag=True)
def train_cmd(run_dir: str, data: str, epochs: int, steps: int | None, batch_size: int, lr: float, weight_decay: float,
              max_grad_norm: float | None, max_length: int, accumulation: int, bf16: bool, optimizer: str,
              optim_rank: int, update_gap: int, scale: float, proj_type: str, svd: str, kappa: int, beta1: float,
              layerwise: bool, accumulation_rank: int | None, schedule: str, restart_every: int, prune: float, prune_mode: str, restart_warmup: int, warmup: int,
              min_lr_ratio: float, checkpoint_every: int | None, resume: bool, seed: int, device: str,
              no_progress: bool, as_json: bool) -> None:
    """Train RUN_DIR's adapter on --data; saves the adapter and appends metrics.jsonl."""
    from lrsurgery.memory import format_bytes
    from lrsurgery.optim import OptimConfig
    from lrsurgery.run import train_run
    from lrsurgery.train.loop import TrainConfig
    from lrsurgery.train.relora import ReLoRAConfig
    optim = OptimConfig(name=optimizer, rank=optim_rank, update_gap=update_gap, scale=scale, proj_type=proj_type,
                        svd=svd, kappa=kappa, beta1=beta1, layerwise=layerwise, accumulation_rank=accumulation_rank,
                        seed=seed)
    relora = ReLoRAConfig(restart_every=restart_every, prune=prune, prune_mode=prune_mode,
                          restart_warmup=restart_warmup, warmup=warmup, min_lr_ratio=min_lr_ratio) \
        if schedule == "relora" else None
    config = TrainConfig(epochs=epochs, steps=steps, batch_size=batch_size, accumulation=accumulation, lr=lr,
                         weight_decay=weight_decay, max_grad_norm=max_grad_norm, optim=optim, relora=relora,
                         bf16=bf16, seed=seed, device=device, progress=not no_progress and not as_json)
    if resume:  # the killed session's settings win (bit-identical resume): say which given options are ignored
        ctx = click.get_current_context()
        kept = {"run_dir", "data", "resume", "device", "no_progress", "as_json", "max_length"}
        ignored = [f"--{k.replace('_', '-')}" for k in ctx.params if k not in kept
                   and ctx.get_parameter_source(k) == click.core.ParameterSource.COMMANDLINE]
        if ignored:
            warnings.warn(f"--resume continues the killed session with its own settings; ignoring "
                          f"{', '.join(ignored)}")
    result = train_run(run_dir, data, config, max_length=max_length, checkpoint_every=checkpoint_every,
                       resume=resume)
    from lrsurgery.train.distributed import world
    if not world().main:  # under torchrun, rank 0 reports
        return
    if as_json:
        return print_json(result.as_dict())
    mem = result.memory
    table(f"trained {result.steps} steps ({result.epochs:.2f} epochs) in {result.seconds:.1f} s",
          ["metric", "value"],
          [["train loss", f"{result.train_loss:.4f}"], *[[f"eval {k}", f"{v:.4f}"] for k, v in result.eval.items()],
           *([["params", format_bytes(mem.params)], ["grads", format_bytes(mem.grads)],
              ["optimizer state", format_bytes(mem.optimizer_state)],
              ["saved activations", format_bytes(mem.activations)], ["total", format_bytes(mem.total)]]
             if mem else [])])


@main.command()
@click.argument("run_dir", required=False, type=click.Path(exists=True, file_okay=False))
@click.option("--base", help="Base model reference (SVD extraction).")
@click.option("--tuned", help="Fine-tuned model reference (SVD extraction).")
@click.option("--rank", "-r", type=int, help="Keep R singular values per module.")
@click.option("--energy", type=float, help="Keep the fewest singular values holding this fraction of Σσ².")
@list_option("--targets", help="Modules to extract (default: the family preset).")
@click.option("--keep-heads", is_flag=True, help="LTE runs: keep the heads (to continue training) beside the "
              "dense change.")
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False), help="Adapter file to write.")
@click.option("--force", is_flag=True, help="Overwrite --out.")
@click.option("--json", "as_json", is_flag=True)
def extract(run_dir: str | None, base: str | None, tuned: str | None, rank: int | None, energy: float | None,
            keep_heads: bool, targets: tuple[str, ...], out: str, force: bool, as_json: bool) -> None:
    """Write an adapter file: from RUN_DIR (by SVD of its change with --rank/--energy), or by SVD of
    (--tuned − --base)."""
    from lrsurgery.ops.extract import extract_from_run, extract_models
    if run_dir:
        if base or tuned:
            raise click.UsageError("give either RUN_DIR or --base/--tuned, not both")
        path, stats = extract_from_run(run_dir, out, force=force, rank=rank, energy=energy,
                                       targets=targets_arg(targets), keep_heads=keep_heads)
        if not stats:
            summary = adapter_summary(path)
            return print_json(summary) if as_json else click.echo(f"wrote {path} ({summary['file_bytes']:,} bytes)")
    elif not (base and tuned):
        raise click.UsageError("SVD extraction needs --base MODEL and --tuned MODEL (or give a RUN_DIR)")
    else:
        path, stats = extract_models(base, tuned, out, targets=targets_arg(targets), rank=rank, energy=energy,
                                     force=force)
    rows = [{"module": s.name, "rank": s.rank, "full_rank": s.full_rank, "energy": s.energy, "error": s.error}
            for s in stats]
    if as_json:
        return print_json({"adapter": str(path), "modules": rows})
    table(f"SVD extraction → {path}", ["module", "rank", "of", "retained energy", "‖error‖_F"],
          [[r["module"], r["rank"], r["full_rank"], f"{r['energy']:.4%}", f"{r['error']:.3e}"] for r in rows])


@main.command()
@click.argument("model")
@click.argument("adapter", type=click.Path(dir_okay=False))
@click.option("-o", "--out", required=True, type=click.Path(), help="Merged model: a directory, or FILE.safetensors.")
@click.option("--weights", type=click.Path(dir_okay=False), help="Weights file for timm:NAME.")
@click.option("--force", is_flag=True, help="Overwrite --out, and merge despite a base-hash mismatch (warns).")
@click.option("--stream/--in-memory", default=None,
              help="Default: stream safetensors checkpoints (file, directory, shards, hf: snapshot) tensor by "
                   "tensor, build the model otherwise. --in-memory always builds it.")
@click.option("--json", "as_json", is_flag=True)
def merge(model: str, adapter: str, out: str, weights: str | None, force: bool, stream: bool | None,
          as_json: bool) -> None:
    """Fold ADAPTER into MODEL and save the merged model in the base's own layout."""
    from lrsurgery.ops.merge import merge_files
    path = merge_files(model, adapter, out, weights=weights, force=force, force_base=force, stream=stream)
    if as_json:
        return print_json({"merged": str(path)})
    click.echo(f"merged {adapter} into {model} → {path}")


@main.command()
@click.argument("model")
@click.argument("adapters", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("-o", "--out", required=True, type=click.Path(),
              help="Stacked adapter file; with --merge, the merged model (a directory, or FILE.safetensors).")
@click.option("--merge", "merge_", is_flag=True, help="Save MODEL with the whole stack folded in.")
@click.option("--weights", type=click.Path(dir_okay=False), help="Weights file for timm:NAME.")
@click.option("--force", is_flag=True, help="Overwrite --out, and stack despite a base or lineage mismatch (warns).")
@click.option("--json", "as_json", is_flag=True)
def stack(model: str, adapters: tuple[str, ...], out: str, merge_: bool, weights: str | None, force: bool,
          as_json: bool) -> None:
    """Apply ADAPTERS to MODEL in order (each must have been trained on the ones before it): write one
    adapter holding the stack, or the merged model."""
    from lrsurgery.ops.stack import stack_files
    result = stack_files(model, adapters, out, merge=merge_, weights=weights, force=force)
    if as_json:
        return print_json(result.as_dict())
    table(f"stack of {len(result.adapter.meta['layers'])} adapters on {model} → {result.path}"
          + (" (merged model)" if result.merged else ""), ["layer", "adapter", "id", "method", "ranks"],
          [[i, x["name"], x["id"][:12], x.get("method", ""), ", ".join(map(str, x.get("ranks", [])))]
           for i, x in enumerate(result.adapter.meta["layers"])])
    summary = result.as_dict()
    click.echo(f"{summary['modules']['lora']} LoRA, {summary['modules']['full']} full"
               + (f", {summary['modules']['delta']} dense" if summary['modules']['delta'] else "")
               + f" modules; {summary['parameters']:,} parameters")


@main.command("combine")
@click.argument("adapters", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--mode", type=click.Choice(["cat", "linear", "svd", "mean"]), default="cat", show_default=True,
              help="cat: exact weighted sum (ranks add); linear: its SVD at the largest input rank (or --rank); "
                   "svd: its SVD at --rank or --energy; mean: federated average (exact, or SVD with --rank/--energy).")
@click.option("--weights", help="One weight per adapter, comma-separated, e.g. 0.5,-1 (default: 1 each; mean: "
                                "1/n, and mean scales the weights to sum to 1).")
@click.option("--rank", "-r", type=int, help="SVD modes: rank per module.")
@click.option("--energy", type=float, help="svd/mean: keep the fewest singular values holding this fraction of Σσ².")
@click.option("--drop-full", is_flag=True, help="Leave modules trained in full (e.g. heads) out of the result.")
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False), help="Adapter file to write.")
@click.option("--force", is_flag=True, help="Overwrite --out.")
@click.option("--json", "as_json", is_flag=True)
def combine_cmd(adapters: tuple[str, ...], mode: str, weights: str | None, rank: int | None, energy: float | None,
                drop_full: bool, out: str, force: bool, as_json: bool) -> None:
    """Combine ADAPTERS made on one base into one adapter: ΔW = Σ wᵢ ΔWᵢ, exact (cat, mean) or by SVD."""
    from lrsurgery.ops.combine import combine_files
    try:
        parsed = [float(x) for x in weights.split(",")] if weights else None
    except ValueError:
        raise click.BadParameter(f"{weights!r} is not a comma-separated list of numbers", param_hint="--weights")
    result = combine_files(adapters, out, weights=parsed, mode=mode, rank=rank, energy=energy,
                           drop_full=drop_full, force=force)
    if as_json:
        return print_json(result.as_dict())
    table(f"combine ({mode}, weights {', '.join(f'{x:g}' for x in result.weights)}) → {result.path}",
          ["module", "kind", "input ranks", "rank", "retained energy", "‖error‖_F"],
          [[m.name or "(whole model)", m.kind, " + ".join("–" if r is None else str(r) for r in m.input_ranks)
            if m.kind != "full" else "", "" if m.rank is None else m.rank,
            "exact" if result.exact or m.kind == "full" else f"{m.energy:.4%}",
            "" if result.exact or m.kind == "full" else f"{m.error:.3e}"] for m in result.modules])


@main.command()
@click.argument("source", type=click.Path())
@click.option("--to", "to_format", type=click.Choice(["peft"]),
              help="SOURCE is an adapter file; write a PEFT directory.")
@click.option("--from", "from_format", type=click.Choice(["peft"]),
              help="SOURCE is a PEFT LoRA directory; write an adapter file.")
@click.option("--base", help="--from: the base model (default: adapter_config.json's base_model_name_or_path).")
@model_options
@click.option("-o", "--out", required=True, type=click.Path(), help="--to: directory to write; --from: adapter file.")
@click.option("--force", is_flag=True, help="Overwrite --out.")
@click.option("--json", "as_json", is_flag=True)
def convert(source: str, to_format: str | None, from_format: str | None, base: str | None, weights: str | None,
            init: str, num_classes: int | None, seed: int, out: str, force: bool, as_json: bool) -> None:
    """Convert adapters: --to peft ADAPTER -o DIR, or --from peft DIR -o ADAPTER [--base MODEL]."""
    import json
    from pathlib import Path

    from lrsurgery import format as fmt
    from lrsurgery.errors import OutputExistsError
    from lrsurgery.ops.peft import CONFIG_FILE, from_peft, to_peft
    if bool(to_format) == bool(from_format):
        raise click.UsageError("give exactly one of --to peft or --from peft")
    if to_format:
        if base or weights:
            raise click.UsageError("--base/--weights are for --from peft (the PEFT adapter's base model)")
        path = to_peft(source, out, force=force)
        config = json.loads((path / CONFIG_FILE).read_text())
        summary = {"peft_dir": str(path), "lora_modules": len(config["target_modules"]),
                   "modules_to_save": config["modules_to_save"] or [], "adapter_config": config}
        if as_json:
            return print_json(summary)
        others = len(config["rank_pattern"])
        click.echo(f"wrote {path}: {summary['lora_modules']} LoRA modules (r={config['r']}, lora_alpha="
                   f"{config['lora_alpha']}{', rsLoRA' if config['use_rslora'] else ''}"
                   f"{f', {others} at other ranks' if others else ''}), "
                   f"modules_to_save: {', '.join(summary['modules_to_save']) or 'none'}")
        return click.echo(f"load it with: PeftModel.from_pretrained(base_model, {str(path)!r})")
    if Path(out).exists() and not force:  # before loading the base, which can take long
        raise OutputExistsError(f"{out} exists; pass --force to overwrite it")
    adapter = from_peft(source, base, weights=weights, init=init, num_classes=num_classes, seed=seed)
    summary = adapter_summary(fmt.write(out, adapter, force=force))
    if as_json:
        return print_json(summary)
    kinds = [m["kind"] for m in summary["modules"]]
    click.echo(f"wrote {out}: {kinds.count('lora')} LoRA and {kinds.count('full')} full modules from {source}; "
               f"base {summary['base'].get('ref')}")
    table(None, ["module", "kind", "rank", "alpha", "scaling", "shape"],
          [[m["name"], m["kind"], *("" if m.get(k) is None else f"{m[k]:g}" for k in ("rank", "alpha", "scaling")),
            m["shape"]] for m in summary["modules"]])


@main.command()
@click.argument("adapter", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True)
def show(adapter: str, as_json: bool) -> None:
    """Show an adapter file: base, modules, ranks, parameters, validation."""
    summary = adapter_summary(adapter)
    if as_json:
        return print_json(summary)
    base = summary["base"]
    click.echo(f"{adapter}: lrsurgery adapter v{summary['format_version']}, valid ✓")
    click.echo(f"base: {base.get('ref')} (weights: {base.get('source', '?')}"
               + (f", revision {base['revision']}" if base.get("revision") else "") + ")")
    click.echo(f"method: {summary['method']}; {summary['num_parameters']:,} parameters in "
               f"{len(summary['modules'])} modules; {summary['file_bytes']:,} bytes")
    prov = summary.get("provenance", {})
    if prov:
        click.echo("provenance: " + ", ".join(f"{k}={v}" for k, v in prov.items() if not isinstance(v, dict)))
    for line in lineage_lines(summary):
        click.echo(line)
    table(None, ["module", "kind", "rank", "alpha", "scaling", "shape", "params"],
          [[m["name"], m["kind"], rank_cell(m), *("" if m.get(k) is None else m[k] for k in ("alpha", "scaling")),
            m["shape"], f"{m['params']:,}"]
           for m in summary["modules"]])


@main.command()
@click.argument("adapter", type=click.Path(exists=True))
@click.argument("repo_id")
@click.option("--revision", help="Branch to push to (created if missing). Default: main.")
@click.option("--private", is_flag=True, help="Create the repository private (an existing one keeps its visibility).")
@click.option("-m", "--message", help="Commit message. Default: names the method, base and lrsurgery version.")
@click.option("--dry-run", "dry_run", type=click.Path(file_okay=False),
              help="Write the files that would be uploaded to DIR instead; no network, no login.")
@click.option("--force", is_flag=True, help="Overwrite files in the --dry-run DIR.")
@click.option("--json", "as_json", is_flag=True)
def push(adapter: str, repo_id: str, revision: str | None, private: bool, message: str | None, dry_run: str | None,
         force: bool, as_json: bool) -> None:
    """Upload ADAPTER (a file, or a run directory's adapter) to the hub repo REPO_ID (ORG/NAME) with a model card."""
    from lrsurgery.hub import plan_push, upload, write_plan
    plan = plan_push(adapter, repo_id, revision=revision, message=message)
    where = {"dry_run": str(write_plan(plan, dry_run, force=force))} if dry_run else \
        {"url": upload(plan, private=private)}
    summary = {"repo": plan.repo_id, "revision": plan.revision or "main", "files": plan.files,
               "commit_message": plan.message, **where}
    if as_json:
        return print_json(summary)
    target = f"{plan.repo_id}@{summary['revision']}"
    if dry_run:
        click.echo(f"dry run: wrote {', '.join(plan.files)} to {dry_run} (would push to {target}: {plan.message!r})")
    else:
        click.echo(f"pushed {', '.join(plan.files)} to {target} → {summary['url']}")


@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("-o", "--out", type=click.Path(dir_okay=False), help="PNG to write (default: RUN_DIR/curves.png).")
@click.option("--force", is_flag=True, help="Overwrite --out.")
def plot(run_dir: str, out: str | None, force: bool) -> None:
    """Plot RUN_DIR's loss, learning-rate and evaluation curves to a PNG."""
    from lrsurgery.train.plot import plot_run
    click.echo(f"wrote {plot_run(run_dir, out, force=force or out is None)}")


@main.command()
@click.option("-o", "--out", type=click.Path(file_okay=False), help="Output directory (default: a new temp dir).")
@click.option("--ranks", default="1,2,4,8,16", show_default=True, help="LoRA ranks to compare.")
@click.option("--epochs", type=int, default=12, show_default=True, help="Epochs on the new domain.")
@click.option("--quick", is_flag=True, help="A smaller run (fewer epochs and ranks), for smoke tests.")
@click.option("--json", "as_json", is_flag=True)
def demo(out: str | None, ranks: str, epochs: int, quick: bool, as_json: bool) -> None:
    """Adapt a small pretrained ViT from digits 0-4 to 5-9: LoRA ranks vs full fine-tuning."""
    from lrsurgery.demo import DemoConfig, run_demo
    from lrsurgery.memory import format_bytes
    try:
        parsed = tuple(int(r) for r in ranks.split(","))
    except ValueError:
        raise click.BadParameter(f"{ranks!r} is not a comma-separated list of integers", param_hint="--ranks")
    config = DemoConfig(ranks=parsed, epochs=epochs, progress=not as_json)
    if quick:
        config = DemoConfig(ranks=config.ranks[:2], pretrain_epochs=3, epochs=1, progress=False)
    result = run_demo(out, config, echo=(lambda s: click.echo(s, err=True)))
    if as_json:
        return print_json(result)
    table("LoRA ranks vs full fine-tuning: ViT pre-trained on digits 0-4, adapted to digits 5-9",
          ["method", "rank", "trainable params", "total params", "memory", "accuracy", "time", "adapter file"],
          [["LoRA" if r["method"] == "lora" else "Full fine-tuning", r["rank"] or "–", f"{r['trainable_params']:,}",
            f"{r['total_params']:,}", format_bytes(r["memory_bytes"]), f"{r['accuracy']:.4f}", f"{r['seconds']:.1f} s",
            format_bytes(r["adapter_bytes"])] for r in result["rows"]])
    click.echo(f"base accuracy on digits 0-4: {result['base_accuracy']:.4f}")
    click.echo(f"adapter: {result['adapter']} ({format_bytes(result['adapter_file_bytes'])}); merged model: "
               f"{result['merged']} (accuracy {result['merged_accuracy']:.4f}, max |logit diff| vs adapted "
               f"{result['merge_max_abs_diff']:.2e})")
    click.echo("memory = weights + gradients + AdamW state + saved activations, measured at the first step.")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
