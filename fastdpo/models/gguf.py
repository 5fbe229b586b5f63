"""GGUF weights turned once into a regular, trainable safetensors checkpoint in fastdpo's cache."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .cache import cache_dir, file_sha256
from .sources import ModelSource

if TYPE_CHECKING:
    import transformers


def gguf_checkpoint(source: ModelSource) -> Path:
    """Convert a GGUF source once into a regular safetensors checkpoint (model and tokenizer).

    transformers dequantises GGUF weights on load but marks the model as GGUF-quantized; Trainer
    then refuses to train it and save_pretrained refuses to save it. The marker is stripped, the
    dequantised weights are kept in float32 (one copy serves every load dtype) and, with the
    tokenizer, saved into a temporary directory beside the target, which is then renamed into
    place, so a checkpoint directory either is complete or does not exist. Later calls return it without reconverting.

    Args:
        source: with ``gguf_file`` set.

    Returns:
        ``cache_dir() / "checkpoints" / "<gguf stem>-<sha256[:16] of the gguf>"``.

    Raises:
        ValueError: ``source.gguf_file`` is None.
        FileNotFoundError: the .gguf file does not exist.
    """
    if source.gguf_file is None:
        raise ValueError(f"{source.path!r} is not a GGUF source")
    gguf = Path(source.path) / source.gguf_file
    if not gguf.is_file():
        raise FileNotFoundError(f"GGUF file {str(gguf)!r} does not exist")
    root = cache_dir() / "checkpoints"
    target = root / f"{gguf.stem}-{file_sha256(gguf)[:16]}"
    if target.is_dir():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{target.name}."))
    try:
        _convert_gguf(source, tmp)
        os.replace(tmp, target)
    except OSError:
        # Another process renamed its complete conversion into place first.
        if not target.is_dir():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert_gguf(source: ModelSource, out: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source.path, gguf_file=source.gguf_file, dtype=torch.float32)
    _strip_quantization_marker(model)
    model.save_pretrained(out)
    gguf_tokenizer(source).save_pretrained(out)


#: GGUF metadata key -> the tokenizer's special-token attribute
_SPECIAL_TOKENS = {"bos": "bos_token", "eos": "eos_token", "unknown": "unk_token", "padding": "pad_token"}


def gguf_tokenizer(source: ModelSource) -> transformers.PreTrainedTokenizerBase:
    """The tokenizer of a GGUF source, its special tokens the ones the GGUF's metadata names.

    transformers before 5.2x (5.17 here) loads SmolLM2's GGUF with eos ``<|im_start|>`` (its bos) and no pad token;
    the metadata (``tokenizer.ggml.eos_token_id`` …) says ``<|im_end|>``, as newer versions read it.
    """
    import gguf
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source.path, gguf_file=source.gguf_file)
    fields = gguf.GGUFReader(Path(source.path) / source.gguf_file).fields
    for key, attr in _SPECIAL_TOKENS.items():
        found = fields.get(f"tokenizer.ggml.{key}_token_id")
        if found is not None:
            token = tokenizer.convert_ids_to_tokens(int(found.parts[found.data[0]][0]))
            if token is not None and getattr(tokenizer, attr) != token:
                setattr(tokenizer, attr, token)
    return tokenizer


def _strip_quantization_marker(model: transformers.PreTrainedModel) -> None:
    # Verified with transformers 5.23: Trainer checks only `is_quantized`; save_pretrained refuses
    # while `hf_quantizer` is set; a saved `quantization_config` brings the GGUF quantizer back on
    # reload; `quantization_method` goes too so nothing reads the model as quantized.
    for owner, attr in ((model, "hf_quantizer"), (model.config, "quantization_config"), (model, "quantization_method")):
        if hasattr(owner, attr):
            delattr(owner, attr)
    model.is_quantized = False


def checkpoint_path(source: ModelSource) -> str:
    """Where ``source`` loads from: its converted checkpoint for GGUF weights, else its own path or hub id."""
    return str(gguf_checkpoint(source)) if source.gguf_file is not None else source.path
