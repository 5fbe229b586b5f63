"""Loading a causal LM or an image-text-to-text model (optionally 4-bit) and its tokenizer or processor from a
``ModelSource``; the default attention."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .gguf import checkpoint_path
from .sources import ModelSource
from .vision import vision_family

if TYPE_CHECKING:
    import transformers


def is_vision_model(source: ModelSource, *, trust_remote_code: bool = False) -> bool:
    """Whether ``source`` holds a vision-language model (``fastdpo.models.vision``; a GGUF file never does).

    Raises:
        ValueError: a vision-language model of a family fastdpo does not train (``vision_family``).
    """
    if source.gguf_file is not None:
        return False
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(source.path, trust_remote_code=trust_remote_code)
    return vision_family(config) is not None


def load_processing_class(source: ModelSource, *, trust_remote_code: bool = False):
    """The processor of a vision-language model (``AutoProcessor``), else the tokenizer (``load_tokenizer``); either
    way the tokenizer pads with eos where it has no pad token.

    Raises:
        ModuleNotFoundError: a processor that needs torchvision (Qwen2-VL's) without it; as ``is_vision_model``,
            ``load_tokenizer`` and ``AutoProcessor.from_pretrained``.
    """
    if not is_vision_model(source, trust_remote_code=trust_remote_code):
        return load_tokenizer(source, trust_remote_code=trust_remote_code)
    import importlib.util

    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(source.path, trust_remote_code=trust_remote_code)
    except ImportError as e:
        if importlib.util.find_spec("torchvision") is None:
            raise ModuleNotFoundError(f"the processor of {source.path} needs torchvision: {e}", name="torchvision") from e
        raise
    _pad_with_eos(processor.tokenizer)
    return processor


def load_tokenizer(source: ModelSource, *, trust_remote_code: bool = False) -> transformers.PreTrainedTokenizerBase:
    """``AutoTokenizer`` for ``source`` (a GGUF source reads its converted checkpoint, see
    ``gguf_checkpoint``); with no pad token, the eos token pads.

    Raises:
        as ``gguf_checkpoint`` and ``AutoTokenizer.from_pretrained``.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint_path(source), trust_remote_code=trust_remote_code)
    _pad_with_eos(tokenizer)
    return tokenizer


def _pad_with_eos(tokenizer) -> None:
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token


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
    then a plain fast load), so the model carries no quantization marker. A vision-language model
    (``is_vision_model``) loads as ``AutoModelForImageTextToText``, ``attn_implementation`` for its language model
    and sdpa for its vision tower.

    Args:
        dtype: weight dtype; with ``load_in_4bit``, the compute dtype and the dtype of the layers
            left unquantized (norms, embeddings, LM head).
        load_in_4bit: QLoRA-style bitsandbytes NF4 linear layers (runs on CPU with bitsandbytes >= 0.50).
        trust_remote_code: allow the checkpoint's own modelling code (off by default).
        attn_implementation: transformers' attention backend, or fastdpo's ``packed_sdpa`` (None: transformers'
            default).

    Raises:
        as ``gguf_checkpoint``, ``is_vision_model`` and ``from_pretrained`` (OSError where the
        checkpoint has no safetensors weights).
    """
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    quantization_config = None
    if load_in_4bit:
        from transformers import BitsAndBytesConfig  # bitsandbytes is needed only here

        quantization_config = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
        )
    auto = AutoModelForCausalLM
    if is_vision_model(source, trust_remote_code=trust_remote_code):
        auto = AutoModelForImageTextToText
        if attn_implementation is not None:
            attn_implementation = {"text_config": attn_implementation, "vision_config": "sdpa"}
    model = auto.from_pretrained(
        checkpoint_path(source), dtype=dtype, quantization_config=quantization_config,
        trust_remote_code=trust_remote_code, use_safetensors=True, attn_implementation=attn_implementation,
    )
    model.config.use_cache = False
    return model
