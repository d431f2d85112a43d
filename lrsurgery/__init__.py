"""lrsurgery: model surgery and a versioned adapter format for memory-efficient low-rank training.

    import lrsurgery
    model = lrsurgery.load_model("timm:vit_base_patch16_224", num_classes=9, init="random")
    lrsurgery.inject(model, method="lora", rank=8, alpha=16, targets=["attn.qkv"])
    lrsurgery.save_adapter(model, "a.safetensors")
    lrsurgery.merge(model)

Adapters as data: ``combine`` (weighted sums), ``compose``/``apply_stack`` (stacks with lineage),
``to_peft``/``from_peft`` (PEFT directories), ``extract_svd`` (an adapter from two models).
"""

__version__ = "0.1.0"

from lrsurgery.adapter import adapter_from_model, apply_adapter, check_base, load_adapter, save_adapter  # noqa: E402
from lrsurgery.errors import LrsurgeryError  # noqa: E402
from lrsurgery.format import Adapter  # noqa: E402
from lrsurgery.lineage import adapter_id  # noqa: E402
from lrsurgery.models import base_info, load_model, save_model  # noqa: E402
from lrsurgery.ops.combine import combine  # noqa: E402
from lrsurgery.ops.extract import extract_svd  # noqa: E402
from lrsurgery.ops.peft import from_peft, to_peft  # noqa: E402
from lrsurgery.ops.stack import apply_stack, compose  # noqa: E402
from lrsurgery.surgery import eject, inject, lora_modules, merge  # noqa: E402
from lrsurgery.targets import resolve_targets  # noqa: E402

__all__ = ["Adapter", "LrsurgeryError", "adapter_from_model", "adapter_id", "apply_adapter", "apply_stack",
           "base_info", "check_base", "combine", "compose", "eject", "extract_svd", "from_peft", "inject",
           "load_adapter", "load_model", "lora_modules", "merge", "resolve_targets", "save_adapter", "save_model",
           "to_peft"]
