"""``PackedConfig``: the ``transformers.TrainingArguments`` fields every packed trainer shares, validated once."""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field

import torch
from transformers import TrainingArguments

logger = logging.getLogger(__name__)

TRUNCATION_MODES = ("keep_end", "keep_start")
#: transformers 5.23 renamed ``gradient_checkpointing`` to ``activation_checkpointing`` (the old name stays as an
#: alias); before it, PackedConfig adds the new name itself and passes it on.
NAMES_ACTIVATION_CHECKPOINTING = any(f.name == "activation_checkpointing" for f in dataclasses.fields(TrainingArguments))


@dataclass
class PackedConfig(TrainingArguments):
    """Training arguments of a trainer on packed micro-batches (``fastdpo.train.PackedTrainer``); ``DPOConfig``,
    ``OnlineDPOConfig`` and ``SFTConfig`` extend it with their own fields and checks (each ``__post_init__`` checks
    its own fields, then calls this one).

    Micro-batches are padding-free token streams of whole rows under ``max_tokens_per_batch`` tokens. Defaults that
    differ from TrainingArguments': ``logging_steps`` 10 (TRL's); ``remove_unused_columns`` False (the tokenised
    columns are not model arguments); ``bf16`` None = on where the GPU supports it and off elsewhere (CPUs without
    bf16 units run bf16 matmuls over 10x slower than fp32). Launched on several processes without an accelerator,
    ``use_cpu`` is set, so that the processes join one gloo group instead of each training alone.

    Raises:
        ValueError: ``truncation_mode`` other than keep_end/keep_start, ``max_tokens_per_batch < 2``, ``max_length``
            below 2.
    """

    max_length: int | None = field(default=1024, metadata={
        "help": "Maximum tokens per sequence (prompt + completion); longer ones are truncated (truncation_mode)."})
    truncation_mode: str = field(default="keep_end", metadata={
        "help": "Which end of a long prompt to keep: keep_end or keep_start."})
    max_tokens_per_batch: int = field(default=4096, metadata={
        "help": "Token budget of one packed micro-batch (whole rows, no padding)."})
    dataset_num_proc: int | None = field(default=None, metadata={"help": "Processes for tokenisation."})

    logging_steps: float = field(default=10, metadata={"help": "Log every X updates steps."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep the tokenised columns."})
    bf16: bool | None = field(
        default=None, metadata={"help": "bf16 mixed precision; default: on where the GPU supports it, off on CPU."})
    if not NAMES_ACTIVATION_CHECKPOINTING:
        activation_checkpointing: bool = field(default=False, metadata={
            "help": "Recompute activations in backward to save memory (transformers' gradient_checkpointing)."})

    def __post_init__(self):
        if not NAMES_ACTIVATION_CHECKPOINTING:
            self.activation_checkpointing = self.gradient_checkpointing = (
                bool(self.activation_checkpointing) or bool(self.gradient_checkpointing))
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.accelerator.is_available():
            self.use_cpu = True
            if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
                logger.warning("accelerate runs FSDP on accelerators only: without one, these processes train "
                               "data-parallel (DDP) with a full model replica each")
        if self.bf16 is None:
            self.bf16 = not self.use_cpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        if self.truncation_mode not in TRUNCATION_MODES:
            raise ValueError(f"truncation_mode must be keep_end or keep_start, got {self.truncation_mode!r}")
        if self.max_tokens_per_batch < 2:
            raise ValueError(f"max_tokens_per_batch must be at least 2, got {self.max_tokens_per_batch}")
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"max_length must be at least 2 or None, got {self.max_length}")
        super().__post_init__()
