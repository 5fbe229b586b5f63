"""``KTOConfig``: ``PackedConfig`` plus TRL 1.16 KTOConfig's fields that apply to packed KTO."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..losses import KTO_LOSS_TYPES
from ..train.packed_config import PackedConfig

SAMPLING = ("random", "sequential")


@dataclass
class KTOConfig(PackedConfig):
    """Training arguments for ``fastdpo.KTOTrainer``: ``PackedConfig`` plus KTO's fields, whose names and meanings follow
    TRL 1.16's KTOConfig.

    Rows come in KL groups of ``per_device_train_batch_size`` consecutive rows (TRL's batches, whose completions it
    rotates by one to give each row its KL completion); a micro-batch packs whole groups under
    ``max_tokens_per_batch`` tokens, and the loss is the mean over the rows of the effective batch. The KL estimate
    z₀ is taken per micro-batch over every process's rows, as TRL takes it per batch.

    Differences from TRL 1.16: ``train_sampling_strategy`` ``random`` (the default here) shuffles whole KL groups,
    which keeps TRL's pairing (TRL needs ``sequential``, its default, because it shuffles rows); completions are cut
    at their end (``truncation_mode`` ``keep_start`` only, as TRL's collator cuts); ``bf16`` off on CPU and no gradient
    checkpointing by default (TRL turns both on); no ``sync_ref_model`` nor ``precompute_ref_batch_size`` (the
    reference is computed in the training micro-batches).

    Raises:
        ValueError: an unknown ``loss_type``, ``beta <= 0``, a negative weight, ``per_device_train_batch_size < 2``
            with the KL term, a ``train_sampling_strategy`` other than random/sequential, ``truncation_mode`` other
            than keep_start, and the errors of ``PackedConfig``.
    """

    beta: float = field(default=0.1, metadata={
        "help": "β: how far the policy may move from the reference (higher: less)."})
    loss_type: str = field(default="kto", metadata={
        "help": "kto (KTO, https://huggingface.co/papers/2402.01306) or apo_zero_unpaired (unpaired APO-zero, "
                "https://huggingface.co/papers/2408.06266; no KL term)."})
    desirable_weight: float = field(default=1.0, metadata={
        "help": "Weight of the desirable rows' losses (counter unequal numbers of desirable and undesirable rows)."})
    undesirable_weight: float = field(default=1.0, metadata={
        "help": "Weight of the undesirable rows' losses (counter unequal numbers of desirable and undesirable rows)."})
    per_device_train_batch_size: int = field(default=8, metadata={
        "help": "Rows per KL group (TRL's batch): each row's KL completion is the previous row's of its group; a "
                "micro-batch packs whole groups under max_tokens_per_batch. At least 2 with loss_type kto."})
    train_sampling_strategy: str = field(default="random", metadata={
        "help": "random: whole KL groups in a seeded random order each epoch; sequential: in dataset order (TRL's "
                "default)."})
    truncation_mode: str = field(default="keep_start", metadata={
        "help": "keep_start: a long completion keeps its first tokens (rows whose prompt fills max_length are "
                "dropped), as TRL's KTO."})
    prefix_sharing: bool = field(default=True, metadata={
        "help": "Pack each row as [prompt][completion][KL completion], the prompt through the model once, where the "
                "attention implementation supports it; false: [prompt+completion][prompt+KL completion]."})
    precompute_ref_log_probs: bool = field(default=False, metadata={
        "help": "Compute the reference log-probs of the completions and KL completions once before training and "
                "release the reference model."})

    skip_nonfinite_losses: bool = field(default=False, metadata={
        "help": "On a NaN/inf row loss, leave that micro-batch's rows out of the step (counted as skipped_rows) "
                "instead of stopping with an error naming the step and the rows (TRL drops NaN rows from its mean "
                "silently)."})

    learning_rate: float = field(default=1e-6, metadata={"help": "The initial learning rate for AdamW."})

    def __post_init__(self):
        if self.loss_type not in KTO_LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {KTO_LOSS_TYPES}, got {self.loss_type!r}")
        if self.beta <= 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        for name in ("desirable_weight", "undesirable_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.kl and self.per_device_train_batch_size < 2:
            raise ValueError(
                f"loss_type {self.loss_type!r} estimates the KL term from each row's KL completion, another row's of "
                f"its KL group of per_device_train_batch_size rows: it must be at least 2, got "
                f"{self.per_device_train_batch_size}")
        if self.train_sampling_strategy not in SAMPLING:
            raise ValueError(f"train_sampling_strategy must be one of {SAMPLING} (micro-batches are whole KL groups "
                             f"under the token budget), got {self.train_sampling_strategy!r}")
        if self.truncation_mode != "keep_start":
            raise ValueError(f"KTO keeps the start of a long completion (TRL's): truncation_mode must be keep_start, "
                             f"got {self.truncation_mode!r}")
        super().__post_init__()

    @property
    def kl(self) -> bool:
        """Whether the loss has the KL term, so each row a KL completion (TRL's ``calculate_KL``)."""
        return self.loss_type != "apo_zero_unpaired"
