"""Merge benchmark: streaming a LoRA adapter into a ≥ 2 GB sharded checkpoint, against a plain copy.

    python benchmarks/merge.py [--size-gb 2] [--dtype bf16] [--repeats 3] [--threads 1] [--json] [--workdir DIR]

Checkpoint: generated in a temporary directory (removed at the end) with LLaMA-7B names and widths
(hidden 4096, intermediate 11008, vocabulary 32000: embed_tokens and lm_head are the largest tensors,
250 MiB each in bf16), as many layers as it takes to reach ``--size-gb``, sharded greedily in key order
into files of at most a quarter of the total, with ``model.safetensors.index.json`` and a config.json,
as transformers lays it out. Smaller sizes shrink the widths (hidden 2048, 1024, … with the same
ratios) so that at least two layers fit. Adapter: random LoRA, rank 16, alpha 32, on every
``q_proj`` and ``v_proj``, with the base SHA-256 records of the generated weights.

Measured in one run, alternating copy and merge ``--repeats`` times (medians). Every step starts
alike: earlier outputs deleted, ``os.sync()`` (no step pays for the previous one's dirty pages), and
the input read once, untimed, so it is in the page cache (as a checkpoint just downloaded is):
- copy: ``shutil.copyfile`` of every file of the checkpoint (the floor: the same bytes read and
  written), and the same followed by ``fsync`` of each file (the merge fsyncs each shard it writes);
- merge: ``lrsurgery.ops.merge.merge_files`` (streaming) in a fresh Python process, timed inside it
  from the call to its return (adapter loading included, imports excluded); its peak RSS growth is
  VmHWM after the merge minus VmRSS before it, the high-water mark being reset just before the call
  (``/proc/self/clear_refs``), or ``ru_maxrss`` where that is unavailable.
The merged output is checked: headers byte-identical to the input's, two changed tensors equal to
``merged_tensor`` of the input tensor, the unchanged bytes of one shard identical.
Timing is context only, never asserted; read time ratios to about ±0.1 on a shared machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import save_file

from lrsurgery import format as fmt
from lrsurgery.memory import format_bytes

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
RANK, ALPHA = 16, 32.0
GiB = 1 << 30

# The merge, in a fresh process so its peak RSS is its own. argv[1]: JSON {src, adapter, out, threads}.
CHILD = r"""
import json, os, resource, sys, time
import torch
from lrsurgery.ops.merge import merge_files
args = json.loads(sys.argv[1])
torch.set_num_threads(args["threads"])

def status(key):
    try:
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None

rss_before = status("VmRSS")
try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    reset = True
except OSError:
    reset = False
start = time.perf_counter()
merge_files(args["src"], args["adapter"], args["out"])
seconds = time.perf_counter() - start
hwm = status("VmHWM") if reset else None
peak = hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"seconds": seconds, "rss_before": rss_before or 0, "peak": peak,
                  "growth": peak - (rss_before or 0), "method": "VmHWM" if hwm else "ru_maxrss"}))
"""


def layout(size_bytes: int, itemsize: int) -> tuple[int, int, int, int]:
    """(hidden, intermediate, vocab, layers): LLaMA-7B ratios, the widest that fits 2 layers, ≥ size_bytes."""
    for hidden in (4096, 2048, 1024, 512, 256, 128, 64):
        inter, vocab = hidden * 11008 // 4096, 32000 * hidden // 4096
        embed = vocab * hidden * itemsize
        layer = (4 * hidden * hidden + 3 * inter * hidden + 2 * hidden) * itemsize
        if 2 * embed + 2 * layer <= size_bytes or hidden == 64:
            layers = max(2, math.ceil((size_bytes - 2 * embed - hidden * itemsize) / layer))
            return hidden, inter, vocab, layers
    raise AssertionError("unreachable")


def shapes(hidden: int, inter: int, vocab: int, layers: int) -> list[tuple[str, tuple[int, ...]]]:
    """The tensors of a LLaMA checkpoint, in transformers' state-dict order."""
    out = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [(p + "self_attn.q_proj.weight", (hidden, hidden)), (p + "self_attn.k_proj.weight", (hidden, hidden)),
                (p + "self_attn.v_proj.weight", (hidden, hidden)), (p + "self_attn.o_proj.weight", (hidden, hidden)),
                (p + "mlp.gate_proj.weight", (inter, hidden)), (p + "mlp.up_proj.weight", (inter, hidden)),
                (p + "mlp.down_proj.weight", (hidden, inter)), (p + "input_layernorm.weight", (hidden,)),
                (p + "post_attention_layernorm.weight", (hidden,))]
    return out + [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]


@torch.no_grad()
def generate(root: Path, size_gb: float, dtype: torch.dtype, log: Callable[[str], None]) -> dict[str, Any]:
    """Write the sharded checkpoint and the adapter under ``root``; return what was generated."""
    from transformers import LlamaConfig
    itemsize = torch.empty((), dtype=dtype).element_size()
    hidden, inter, vocab, layers = layout(int(size_gb * 1e9), itemsize)
    specs = shapes(hidden, inter, vocab, layers)
    total = sum(math.prod(s) for _, s in specs) * itemsize
    max_shard = max(total // 4, max(math.prod(s) for _, s in specs) * itemsize)
    ckpt = root / "base"
    ckpt.mkdir()
    LlamaConfig(hidden_size=hidden, intermediate_size=inter, vocab_size=vocab, num_hidden_layers=layers,
                num_attention_heads=max(1, hidden // 128), num_key_value_heads=max(1, hidden // 128),
                dtype=str(dtype).removeprefix("torch.")).save_pretrained(ckpt)
    g = torch.Generator().manual_seed(0)
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in specs:  # greedy, in key order, like transformers' save_pretrained
        nbytes = math.prod(shape) * itemsize
        if groups[-1] and size + nbytes > max_shard:
            groups.append([])
            size = 0
        groups[-1].append((name, shape))
        size += nbytes
    weight_map, records = {}, {}
    for i, group in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        log(f"generating {fname} ({len(group)} tensors)")
        tensors = {}
        for name, shape in group:
            t = torch.empty(shape, dtype=dtype)
            t.normal_(0.0, 0.02, generator=g) if len(shape) == 2 else t.fill_(1.0)
            tensors[name] = t
            weight_map[name] = fname
            if name.endswith(("q_proj.weight", "v_proj.weight")):
                records[name] = fmt.tensor_record(t)
        save_file(tensors, str(ckpt / fname), metadata={"format": "pt"})
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    modules, adapter_tensors = {}, {}
    for key, rec in records.items():
        name = key.removesuffix(".weight")
        modules[name] = {"kind": "lora", "rank": RANK, "alpha": ALPHA, "rslora": False, "scaling": ALPHA / RANK,
                         "in_features": hidden, "out_features": hidden, "fan_in_fan_out": False,
                         "dtype": "float32", "base_tensors": {"weight": rec}}
        adapter_tensors[f"{name}.lora_A"] = torch.randn(RANK, hidden, generator=g) / math.sqrt(hidden)
        adapter_tensors[f"{name}.lora_B"] = torch.randn(hidden, RANK, generator=g) * 0.01
    meta = {"base": {"ref": str(ckpt), "library": "transformers", "source": "local-dir"}, "method": "lora",
            "config": {"rank": RANK, "alpha": ALPHA}, "modules": modules,
            "provenance": {"tool": "benchmarks/merge.py"}}
    fmt.write(root / "adapter.safetensors", fmt.Adapter(adapter_tensors, meta))
    largest = max(math.prod(s) for _, s in specs) * itemsize
    largest_changed = max(math.prod(s) for n, s in specs if n in records) * itemsize
    return {"dir": ckpt, "adapter": root / "adapter.safetensors", "checkpoint_bytes": total, "shards": len(groups),
            "tensors": len(specs), "changed_tensors": len(records), "layers": layers, "hidden": hidden,
            "largest_tensor_bytes": largest, "largest_changed_bytes": largest_changed}


def copy_checkpoint(src: Path, dst: Path, sync: bool) -> float:
    """Seconds to copy every file of ``src`` into a new ``dst`` (with fsync of each file if ``sync``)."""
    start = time.perf_counter()
    dst.mkdir()
    for f in sorted(src.iterdir()):
        shutil.copyfile(f, dst / f.name)
        if sync:
            with open(dst / f.name, "rb") as fh:
                os.fsync(fh.fileno())
    return time.perf_counter() - start


def merge_in_child(src: Path, adapter: Path, out: Path, threads: int) -> dict[str, Any]:
    args = json.dumps({"src": str(src), "adapter": str(adapter), "out": str(out), "threads": threads})
    res = subprocess.run([sys.executable, "-c", CHILD, args], capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"merge subprocess failed:\n{res.stderr}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def check(src: Path, out: Path, adapter_path: Path) -> str:
    """Spot-check the merged checkpoint against the input (the tests check every tensor on small models)."""
    from safetensors import safe_open

    from lrsurgery.ops.merge import merge_targets, merged_tensor
    from lrsurgery.ops.stream_merge import read_header
    adapter = fmt.read(adapter_path)
    targets = merge_targets(adapter)
    shards = sorted(p.name for p in src.glob("*.safetensors"))
    for name in shards:
        n = read_header(src / name).data_start
        with open(src / name, "rb") as f, open(out / name, "rb") as g:
            if f.read(n) != g.read(n):
                return f"header of {name} differs"
    keys = sorted(targets, key=lambda k: int(k.split(".")[2]))
    weight_map = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    for key in (keys[0], keys[-1]):
        with safe_open(str(src / weight_map[key]), "pt") as f, safe_open(str(out / weight_map[key]), "pt") as g:
            if not torch.equal(g.get_tensor(key), merged_tensor(adapter, key, targets[key], f.get_tensor(key))):
                return f"{key} differs from merged_tensor"
    h = read_header(src / shards[0])
    with open(src / shards[0], "rb") as f, open(out / shards[0], "rb") as g:
        for e in h.entries:
            if e.name not in targets:
                f.seek(h.data_start + e.begin)
                g.seek(h.data_start + e.begin)
                for _ in range(0, e.nbytes, 1 << 24):
                    n = min(1 << 24, h.data_start + e.end - f.tell())
                    if f.read(n) != g.read(n):
                        return f"unchanged tensor {e.name} differs"
    return "bit-identical"


def _settle(src: Path, *old: Path) -> None:
    """Start every step alike: earlier outputs removed, no dirty pages (no step pays for the previous
    one's writes), and the input read once so it is in the page cache (nothing evicted it meanwhile)."""
    for p in old:
        if p.exists():
            shutil.rmtree(p)
    os.sync()
    for f in src.iterdir():
        with open(f, "rb") as fh:
            while fh.read(1 << 24):
                pass


def run(size_gb: float = 2.0, dtype: str = "bf16", repeats: int = 3, workdir: str | os.PathLike | None = None,
        threads: int = 1, log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Generate, copy and merge ``repeats`` times (alternating), check the output; clean everything up."""
    began = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="lrsurgery-merge-bench-", dir=workdir))
    try:
        gen = generate(root, size_gb, DTYPES[dtype], log)
        src = gen.pop("dir")
        adapter = gen.pop("adapter")
        copies, synced, merges = [], [], []
        for i in range(repeats):
            for sync, times in ((False, copies), (True, synced)):
                log(f"repeat {i + 1}/{repeats}: copy{' + fsync' if sync else ''}")
                _settle(src, root / "copy", root / "merged")
                times.append(copy_checkpoint(src, root / "copy", sync))
                log(f"  {times[-1]:.2f} s")
            log(f"repeat {i + 1}/{repeats}: streaming merge")
            _settle(src, root / "copy", root / "merged")
            merges.append(merge_in_child(src, adapter, root / "merged", threads))
            log(f"  {merges[-1]['seconds']:.2f} s, peak RSS growth {format_bytes(merges[-1]['growth'])}")
        verdict = check(src, root / "merged", adapter)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    merge_s = statistics.median(m["seconds"] for m in merges)
    copy_s, synced_s = statistics.median(copies), statistics.median(synced)
    peak = max(m["growth"] for m in merges)
    return {**gen, "dtype": dtype, "repeats": repeats, "threads": threads,
            "copy_s": copy_s, "copy_fsync_s": synced_s, "merge_s": merge_s,
            "merge_over_copy": merge_s / copy_s, "merge_over_copy_fsync": merge_s / synced_s,
            "merge_gb_per_s": gen["checkpoint_bytes"] / merge_s / 1e9, "peak_rss_bytes": peak,
            "peak_over_largest_tensor": peak / gen["largest_tensor_bytes"],
            "peak_over_largest_changed": peak / gen["largest_changed_bytes"], "rss_method": merges[0]["method"],
            "copy_runs_s": copies, "copy_fsync_runs_s": synced, "merge_runs_s": [m["seconds"] for m in merges],
            "check": verdict, "date": datetime.date.today().isoformat(), "torch": torch.__version__,
            "wall_s": time.perf_counter() - began}


def render(r: dict[str, Any]) -> str:
    head = (f"{r['date']} · torch {r['torch']} · {r['dtype']} · LLaMA-like, hidden {r['hidden']}, "
            f"{r['layers']} layers · LoRA r={RANK} on q_proj, v_proj · {r['threads']} thread(s) · "
            f"median of {r['repeats']} · {r['wall_s']:.0f} s")
    cols = ["checkpoint", "shards", "tensors (changed)", "largest tensor", "largest changed", "copy s",
            "copy+fsync s", "merge s", "merge / copy", "merge / copy+fsync", "merge GB/s", "peak RSS growth",
            "peak / largest tensor", "peak / largest changed", "output"]
    row = [format_bytes(r["checkpoint_bytes"]), str(r["shards"]), f"{r['tensors']} ({r['changed_tensors']})",
           format_bytes(r["largest_tensor_bytes"]), format_bytes(r["largest_changed_bytes"]), f"{r['copy_s']:.2f}",
           f"{r['copy_fsync_s']:.2f}", f"{r['merge_s']:.2f}", f"{r['merge_over_copy']:.2f}×",
           f"{r['merge_over_copy_fsync']:.2f}×", f"{r['merge_gb_per_s']:.2f}", format_bytes(r["peak_rss_bytes"]),
           f"{r['peak_over_largest_tensor']:.2f}", f"{r['peak_over_largest_changed']:.2f}", r["check"]]
    lines = [head, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols), "| " + " | ".join(row) + " |"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gb", type=float, default=2.0, help="checkpoint size to generate (default 2)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    parser.add_argument("--repeats", type=int, default=3, help="copy/merge repeats, alternating (median)")
    parser.add_argument("--workdir", help="where to generate (default: the system temp dir); needs 3× the size free")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the merge (default 1: stable timings)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    args = parser.parse_args(argv)
    result = run(args.size_gb, args.dtype, args.repeats, args.workdir, args.threads,
                 log=lambda s: print(s, file=sys.stderr, flush=True))
    print(json.dumps(result, indent=2) if args.json else render(result))


if __name__ == "__main__":
    main()
