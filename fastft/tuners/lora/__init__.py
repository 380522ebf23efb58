"""LoRA: ``apply(model, LoraConfig(...))`` -> handle; ``load``; PEFT interop (``from_peft``, ``merge_and_unload``)."""
from .config import ALL_LINEAR, LoraConfig, as_lora_config
from .model import (DEFAULT_TARGETS, LoraHandle, adapter_state_dict, apply, find_targets, from_peft, layer_from_peft,
                    load, lora_layers, merge_and_unload)

__all__ = ["ALL_LINEAR", "DEFAULT_TARGETS", "LoraConfig", "LoraHandle", "adapter_state_dict", "apply",
           "as_lora_config", "find_targets", "from_peft", "layer_from_peft", "load", "lora_layers", "merge_and_unload"]
