"""Layer 4, models: where models come from (``sources``: local paths and hub ids; ``smollm2``: the default model;
``gguf``: GGUF conversion; ``cache``: fastdpo's cache directory), loading them, LoRA/QLoRA, the packed attention, and
vision-language models (``vision``).
Imports torch, transformers and peft (lazily) and the layers below it."""

from . import attention  # noqa: F401,I001  registers "packed_sdpa" with transformers
from .cache import cache_dir
from .gguf import gguf_checkpoint
from .loading import default_attn_implementation, is_vision_model, load_causal_lm, load_processing_class, load_tokenizer
from .lora import apply_lora, load_lora_adapter
from .smollm2 import default_model
from .sources import ModelSource, resolve_model
from .vision import set_encoder_trainable, vision_family
from .wrappers import causal_lm, is_peft

__all__ = ["ModelSource", "apply_lora", "cache_dir", "causal_lm", "default_attn_implementation", "default_model",
           "gguf_checkpoint", "is_peft", "is_vision_model", "load_causal_lm", "load_lora_adapter",
           "load_processing_class", "load_tokenizer", "resolve_model", "set_encoder_trainable", "vision_family"]
