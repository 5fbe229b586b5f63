"""``DPOConfig``: ``transformers.TrainingArguments`` plus TRL's DPO fields, with fastdpo's packing."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import TrainingArguments

from .losses import LOSS_TYPES


@dataclass
class DPOConfig(TrainingArguments):
    """Training arguments for ``fastdpo.DPOTrainer``; DPO field names and meanings follow TRL's DPOConfig.

    Micro-batches are packed token streams of at most ``max_tokens_per_batch`` tokens (whole pairs),
    so ``per_device_train_batch_size`` is not used; the effective batch is
    ``gradient_accumulation_steps`` micro-batches per device, and the loss is the mean over its pairs.

    Defaults that differ from TrainingArguments': ``learning_rate`` 1e-6 and ``logging_steps`` 10
    (TRL's); ``remove_unused_columns`` False (the tokenised columns are not model arguments);
    ``bf16`` None = on where the GPU supports it and off elsewhere (CPUs without bf16 units run bf16
    matmuls over 10x slower than fp32).
    """

    beta: float = field(default=0.1, metadata={"help": "KL-penalty coefficient β of the DPO loss."})
    loss_type: str = field(default="sigmoid", metadata={"help": f"Preference loss: {', '.join(LOSS_TYPES)}."})
    label_smoothing: float = field(
        default=0.0, metadata={"help": "cDPO: assumed probability in [0, 0.5] that a preference label is flipped."}
    )
    max_length: int | None = field(default=1024, metadata={"help": "Maximum prompt + completion tokens per sequence."})
    max_prompt_length: int | None = field(default=512, metadata={"help": "Maximum prompt tokens (truncated beyond)."})
    truncation_mode: str = field(
        default="keep_end", metadata={"help": "Which end of a long prompt to keep: keep_end or keep_start."}
    )
    max_tokens_per_batch: int = field(
        default=4096, metadata={"help": "Token budget of one packed micro-batch (whole pairs, no padding)."}
    )
    precompute_ref_log_probs: bool = field(
        default=False,
        metadata={"help": "Compute the reference log-probs once before training, cache them with the tokenised "
                          "dataset and release the reference model."},
    )
    reference_free: bool = field(default=False, metadata={"help": "Ignore the reference model (log-probs taken as 0)."})
    dataset_num_proc: int | None = field(default=None, metadata={"help": "Processes for tokenisation."})

    learning_rate: float = field(default=1e-6, metadata={"help": "The initial learning rate for AdamW."})
    logging_steps: float = field(default=10, metadata={"help": "Log every X updates steps."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep the tokenised columns."})
    bf16: bool | None = field(
        default=None, metadata={"help": "bf16 mixed precision; default: on where the GPU supports it, off on CPU."}
    )

    def __post_init__(self):
        if self.bf16 is None:
            self.bf16 = not self.use_cpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        if self.truncation_mode not in ("keep_end", "keep_start"):
            raise ValueError(f"truncation_mode must be keep_end or keep_start, got {self.truncation_mode!r}")
        if self.max_tokens_per_batch < 2:
            raise ValueError(f"max_tokens_per_batch must be at least 2, got {self.max_tokens_per_batch}")
        super().__post_init__()
