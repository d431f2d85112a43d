"""Low-rank layer variants; each module opens with its math."""

from lrsurgery.layers.lora import LoRALinear, is_linear, linear_shape, lora_scaling

__all__ = ["LoRALinear", "is_linear", "linear_shape", "lora_scaling"]
