"""Loading a causal LM (optionally 4-bit) and its tokenizer from a ``ModelSource``; the default attention."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .gguf import checkpoint_path
from .sources import ModelSource

if TYPE_CHECKING:
    import transformers


def load_tokenizer(source: ModelSource, *, trust_remote_code: bool = False) -> transformers.PreTrainedTokenizerBase:
    """``AutoTokenizer`` for ``source`` (a GGUF source reads its converted checkpoint, see
    ``gguf_checkpoint``); with no pad token, the eos token pads.

    Raises:
        as ``gguf_checkpoint`` and ``AutoTokenizer.from_pretrained``.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint_path(source), trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def default_attn_implementation(device_type: str) -> str:
    """The attention ``fastdpo train`` uses on a device type: ``packed_sdpa`` (``fastdpo.models.attention``) off CUDA;
    on CUDA ``flash_attention_2`` where flash-attn is installed, else ``flex_attention`` (both varlen)."""
    if device_type != "cuda":
        return "packed_sdpa"
    import importlib.util

    return "flash_attention_2" if importlib.util.find_spec("flash_attn") else "flex_attention"


def load_causal_lm(
    source: ModelSource,
    *,
    dtype: torch.dtype = torch.float32,
    load_in_4bit: bool = False,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
) -> transformers.PreTrainedModel:
    """Load a causal LM ready for training: safetensors weights only, ``config.use_cache = False``.

    A GGUF source loads from its converted checkpoint (``gguf_checkpoint``: converted on first use,
    then a plain fast load), so the model carries no quantization marker.

    Args:
        dtype: weight dtype; with ``load_in_4bit``, the compute dtype and the dtype of the layers
            left unquantized (norms, embeddings, LM head).
        load_in_4bit: QLoRA-style bitsandbytes NF4 linear layers (runs on CPU with bitsandbytes >= 0.50).
        trust_remote_code: allow the checkpoint's own modelling code (off by default).
        attn_implementation: transformers' attention backend, or fastdpo's ``packed_sdpa`` (None: transformers'
            default).

    Raises:
        as ``gguf_checkpoint`` and ``AutoModelForCausalLM.from_pretrained`` (OSError where the
        checkpoint has no safetensors weights).
    """
    from transformers import AutoModelForCausalLM

    quantization_config = None
    if load_in_4bit:
        from transformers import BitsAndBytesConfig  # bitsandbytes is needed only here

        quantization_config = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
        )
    model = AutoModelForCausalLM.from_pretrained(
        checkpoint_path(source), dtype=dtype, quantization_config=quantization_config,
        trust_remote_code=trust_remote_code, use_safetensors=True, attn_implementation=attn_implementation,
    )
    model.config.use_cache = False
    return model
