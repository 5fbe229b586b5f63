"""``SFTConfig``: ``PackedConfig`` plus TRL 1.16 SFTConfig's fields that apply to packed SFT."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..train.packed_config import PackedConfig

LOSS_TYPES = ("nll", "dft")


@dataclass
class SFTConfig(PackedConfig):
    """Training arguments for ``fastdpo.SFTTrainer``: ``PackedConfig`` plus SFT's fields, whose names and meanings
    follow TRL 1.16's SFTConfig.

    Micro-batches are padding-free streams of whole sequences: with ``packing`` (the default here; TRL's is False)
    best-fit decreasing under ``max_tokens_per_batch`` tokens (fastdpo's DPO budget; TRL packs into ``max_length``
    blocks), without it ``per_device_train_batch_size`` sequences. The loss is the mean over the loss tokens of the
    effective batch (``gradient_accumulation_steps`` micro-batches on every process).

    Differences from TRL 1.16: ``assistant_only_loss`` None (the default) means True for ``messages`` rows unless
    ``completion_only_loss`` is False (TRL: False), and needs no ``{% generation %}`` tags; ``packing_strategy``
    is ``bfd`` only; ``learning_rate`` 2e-5 as TRL, ``bf16`` off on CPU and no gradient checkpointing by default
    (TRL turns both on).

    Raises:
        ValueError: an unknown ``loss_type`` or ``packing_strategy``, and the errors of ``PackedConfig``.
    """

    dataset_text_field: str = field(default="text", metadata={
        "help": "Name of the column that contains text data in the dataset (language modelling rows)."})
    eos_token: str | None = field(default=None, metadata={
        "help": "Token appended to texts and string completions that lack it; default the tokenizer's eos_token."})
    truncation_mode: str = field(default="keep_start", metadata={
        "help": "Which end of a long sequence to keep: keep_start (TRL's default) or keep_end."})
    packing: bool = field(default=True, metadata={
        "help": "Pack whole sequences into micro-batches of at most max_tokens_per_batch tokens (best-fit "
                "decreasing); false: per_device_train_batch_size sequences per micro-batch. Never padded."})
    packing_strategy: str = field(default="bfd", metadata={
        "help": "bfd (best-fit decreasing, whole sequences); TRL's bfd_split and wrapped are not supported."})
    completion_only_loss: bool | None = field(default=None, metadata={
        "help": "Loss on the completion tokens only (prompt-completion and preference rows; None = true); false: on "
                "every token, also of messages rows unless --assistant-only-loss true."})
    assistant_only_loss: bool | None = field(default=None, metadata={
        "help": "Loss on the assistant turns only (conversational rows). None: true for messages rows unless "
                "--completion-only-loss false (TRL's default is false)."})
    loss_type: str = field(default="nll", metadata={
        "help": "nll (negative log-likelihood) or dft (Dynamic Fine-Tuning: each token's NLL times its detached "
                "probability, https://huggingface.co/papers/2508.05629)."})

    learning_rate: float = field(default=2e-5, metadata={"help": "The initial learning rate for AdamW."})

    def __post_init__(self):
        for name, value, allowed in (("loss_type", self.loss_type, LOSS_TYPES),
                                     ("packing_strategy", self.packing_strategy, ("bfd",))):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        super().__post_init__()
