"""Generate the golden adapter-format-v1 files in this directory (run once; the outputs are committed).

    python formats/examples/make_examples.py [--force]   # makes the missing files only, unless --force

Every value is deterministic: base weights follow a closed formula (``pattern``; exact in float32,
float16 and bfloat16, no RNG), LoRA factors and full tensors come from a seeded ``torch.Generator``
and are quantized to multiples of 1/64 so that they are exact in every float dtype. The metadata
is produced by the production path (``LoRALinear`` + ``lrsurgery.adapter.adapter_from_model``) and
the files are written with ``lrsurgery.format.write``.

Only the content is deterministic, not the bytes: safetensors writes the ``__metadata__`` keys in
hash-map order, so a regenerated file has the same tensors and ``adapter`` object but usually another
file SHA-256.

Do NOT regenerate the committed files to make a test pass: they are the compatibility contract
(tests/test_golden.py pins their bytes). If the format changes, add new files for the new version
and keep these.
"""

from __future__ import annotations

import argparse
import hashlib
import math
from pathlib import Path

import torch
from torch import nn

from lrsurgery import format as fmt
from lrsurgery.adapter import adapter_from_model
from lrsurgery.layers.lora import LoRALinear
from lrsurgery.models import BaseInfo
from lrsurgery.surgery import AdapterConfig, set_submodule

HERE = Path(__file__).resolve().parent


def pattern(shape: tuple[int, ...], dtype: torch.dtype, salt: int = 0) -> torch.Tensor:
    """Deterministic base weights: ((7·i + salt) mod 17 − 8) / 16 in row-major order (exact in any float dtype)."""
    n = math.prod(shape)
    v = ((torch.arange(n, dtype=torch.int64) * 7 + salt) % 17 - 8).to(torch.float64) / 16
    return v.reshape(shape).to(dtype)


def quantized(shape: tuple[int, ...], g: torch.Generator, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Seeded normal values rounded to multiples of 1/64 (exact in float16/bfloat16 for |x| < 4)."""
    x = torch.randn(shape, generator=g, dtype=torch.float64).clamp(-3.5, 3.5)
    return (torch.round(x * 64) / 64).to(dtype)


def _linear(n_in: int, n_out: int, salt: int, dtype: torch.dtype = torch.float32) -> nn.Linear:
    layer = nn.Linear(n_in, n_out, dtype=dtype)
    with torch.no_grad():
        layer.weight.copy_(pattern((n_out, n_in), dtype, salt))
        layer.bias.copy_(pattern((n_out,), dtype, salt + 1))
    return layer


def _conv1d(n_in: int, n_out: int, salt: int):
    from transformers.pytorch_utils import Conv1D  # GPT-2's layer: weight stored [in, out]
    layer = Conv1D(n_out, n_in)
    with torch.no_grad():
        layer.weight.copy_(pattern((n_in, n_out), torch.float32, salt))
        layer.bias.copy_(pattern((n_out,), torch.float32, salt + 1))
    return layer


def _lora(model: nn.Module, name: str, rank: int, alpha: float, g: torch.Generator, *, rslora: bool = False,
          adapter_dtype: torch.dtype | None = None) -> LoRALinear:
    layer = LoRALinear(model.get_submodule(name), rank, alpha, rslora=rslora, adapter_dtype=adapter_dtype)
    with torch.no_grad():  # trained-looking factors: B is non-zero so that ΔW is non-zero
        layer.lora_A.copy_(quantized(tuple(layer.lora_A.shape), g))
        layer.lora_B.copy_(quantized(tuple(layer.lora_B.shape), g))
    set_submodule(model, name, layer)
    return layer


def _container(**children: nn.Module) -> nn.Module:
    m = nn.Module()
    for k, v in children.items():
        setattr(m, k, v)
    return m


def lora_linear_conv1d() -> fmt.Adapter:
    """Two LoRA modules: a Linear 8→12 (r=4, alpha=8) and a GPT-2-style Conv1D 6→9 (r=2, alpha=4, rsLoRA)."""
    g = torch.Generator().manual_seed(1)
    model = _container(encoder=_container(fc=_linear(8, 12, salt=0), c_attn=_conv1d(6, 9, salt=3)))
    _lora(model, "encoder.fc", 4, 8.0, g)
    _lora(model, "encoder.c_attn", 2, 4.0, g, rslora=True)
    rev = "0123456789abcdef0123456789abcdef01234567"
    model.lrsurgery_base = BaseInfo(ref=f"hf:lrsurgery/tiny-gpt2@{rev}", library="transformers",
                                    source="hub-cache", revision=rev)
    model.lrsurgery_adapter = AdapterConfig(method="lora", rank=4, alpha=8.0, rslora=False, dropout=0.05,
                                            targets=["encoder.fc", "encoder.c_attn"], train=[])
    return adapter_from_model(model, {"example": "lora-linear-conv1d", "seed": 1})


def lora_full_head() -> fmt.Adapter:
    """A LoRA Linear 12→12 (r=3, alpha=6) plus a fully trained classification head Linear 12→3 (kind "full")."""
    g = torch.Generator().manual_seed(2)
    model = _container(backbone=_container(proj=_linear(12, 12, salt=5)), head=_linear(12, 3, salt=9))
    _lora(model, "backbone.proj", 3, 6.0, g)
    with torch.no_grad():  # the "trained" head
        model.head.weight.copy_(quantized((3, 12), g))
        model.head.bias.copy_(quantized((3,), g))
    model.lrsurgery_base = BaseInfo(ref="timm:tiny_test", library="timm", source="file",
                                    weights="/models/tiny_test.safetensors",
                                    weights_sha256=hashlib.sha256(b"tiny_test base weights").hexdigest(),
                                    num_classes=3, init_seed=0, head_reset=True)
    model.lrsurgery_adapter = AdapterConfig(method="lora", rank=3, alpha=6.0, rslora=False, dropout=0.0,
                                            targets=["backbone.proj"], train=["head"])
    return adapter_from_model(model, {"example": "lora-full-head", "seed": 2})


def lora_fp16_bf16base() -> fmt.Adapter:
    """One LoRA module with float16 factors on a bfloat16 base Linear 8→12 (r=2, alpha=16)."""
    g = torch.Generator().manual_seed(3)
    model = _container(layer=_linear(8, 12, salt=11, dtype=torch.bfloat16))
    _lora(model, "layer", 2, 16.0, g, adapter_dtype=torch.float16)
    model.lrsurgery_base = BaseInfo(ref="timm:tiny_bf16", library="timm", source="random-init", init_seed=7)
    model.lrsurgery_adapter = AdapterConfig(method="lora", rank=2, alpha=16.0, rslora=False, dropout=0.0,
                                            targets=["layer"], train=[])
    return adapter_from_model(model, {"example": "lora-fp16-bf16base", "seed": 3})


def full_whole_model() -> fmt.Adapter:
    """Method "full" on the whole model: one "full" entry for the root module "" (tensors named by bare parameter names)."""
    g = torch.Generator().manual_seed(4)
    model = _container(fc=_linear(4, 3, salt=13), norm=nn.LayerNorm(3))
    with torch.no_grad():  # the "fine-tuned" model
        for p in model.parameters():
            p.copy_(quantized(tuple(p.shape), g))
    model.lrsurgery_base = BaseInfo(ref="/models/tiny-dir", library="timm", source="local-dir")
    model.lrsurgery_adapter = AdapterConfig(method="full", rank=0, alpha=0.0, rslora=False, dropout=0.0,
                                            targets=[], train=[""])
    return adapter_from_model(model, {"example": "full-whole-model", "seed": 4})


EXAMPLES = {
    "lora-linear-conv1d.safetensors": lora_linear_conv1d,
    "lora-full-head.safetensors": lora_full_head,
    "lora-fp16-bf16base.safetensors": lora_fp16_bf16base,
    "full-whole-model.safetensors": full_whole_model,
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--force", action="store_true",
                    help="overwrite existing golden files (you should not need this); by default only missing files are made")
    ap.add_argument("--out", type=Path, default=HERE)
    args = ap.parse_args()
    for fname, make in EXAMPLES.items():
        if (args.out / fname).exists() and not args.force:
            print(f"{args.out / fname} exists: kept")
            continue
        path = fmt.write(args.out / fname, make(), force=args.force)
        print(f"{path}  {path.stat().st_size} bytes  sha256 {fmt.file_sha256(path)}")


if __name__ == "__main__":
    main()
