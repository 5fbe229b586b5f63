"""``OnlineDPOConfig``: ``DPOConfig`` plus TRL 1.16's OnlineDPOConfig fields."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..losses import LossSpec
from ..train import DPOConfig


@dataclass
class OnlineDPOConfig(DPOConfig):
    """Training arguments for ``fastdpo.OnlineDPOTrainer``: ``DPOConfig`` plus TRL 1.16's OnlineDPOConfig fields
    (``reward_model_path``, ``max_new_tokens``, ``temperature``, ``missing_eos_penalty``, ``beta`` as a per-epoch
    list) and TRL <= 0.2x's ``judge``.

    A micro-batch is ``per_device_train_batch_size`` prompts and their two completions each, packed in one stream
    (``max_tokens_per_batch`` is not used); the effective batch is ``gradient_accumulation_steps`` micro-batches
    per device. Prompts keep at most ``min(max_prompt_length, max_length - max_new_tokens)`` tokens
    (``truncation_mode``), so prompt + completion never exceeds ``max_length``.

    Raises:
        ValueError: ``precompute_ref_log_probs`` (the completions do not exist before the step that samples
            them), ``reference_free`` or a reference-free loss (cpo, simpo, orpo: the online objective and its
            ``objective/kl`` are relative to the reference), ``ld_alpha`` (``objective/kl`` and
            ``objective/entropy`` are over whole completions), both ``reward_model_path`` and ``judge``, an empty
            ``beta`` list or a β <= 0, ``max_new_tokens`` < 1, ``temperature`` <= 0, a negative
            ``missing_eos_penalty``, no room for a prompt (``max_length <= max_new_tokens``), and the errors of
            ``DPOConfig``.
    """

    reward_model_path: str | None = field(default=None, metadata={
        "aliases": ["--reward-model", "--reward_model"],
        "help": "Reward model ranking the two completions: a local AutoModelForSequenceClassification checkpoint "
                "with one label (and its tokenizer). Give this or --judge."})
    judge: str | None = field(default=None, metadata={
        "help": "LLM judge ranking the two completions: an instruct causal LM (directory, .gguf file or hub id) "
                "asked which response is better, TRL's pairwise prompt (OAIF). Give this or --reward-model."})
    judge_max_new_tokens: int = field(default=8, metadata={
        "help": "Tokens the judge may answer with; its verdict is the first standalone 0 or 1."})
    max_new_tokens: int = field(default=64, metadata={"help": "Maximum tokens per sampled completion."})
    temperature: float = field(default=0.9, metadata={"help": "Sampling temperature of the completions."})
    missing_eos_penalty: float | None = field(default=None, metadata={
        "help": "Subtracted from the reward-model score of a completion without an EOS token (TRL's)."})
    beta: list[float] = field(default_factory=lambda: [0.1], metadata={
        "help": "β of the DPO loss; several values: β[epoch] per epoch, the last one beyond the list (TRL's)."})
    learning_rate: float = field(default=5e-7, metadata={"help": "The initial learning rate for AdamW (TRL's)."})

    def __post_init__(self):
        self.beta = [float(self.beta)] if isinstance(self.beta, (int, float)) else [float(b) for b in self.beta]
        if not self.beta or min(self.beta) <= 0:
            raise ValueError(f"beta must be a positive float or a non-empty list of them, got {self.beta}")
        if self.precompute_ref_log_probs:
            raise ValueError("precompute_ref_log_probs is impossible online: the completions are sampled during "
                             "training, so their reference log-probs are computed each step")
        if not self.loss_spec().needs_reference:
            raise ValueError("online DPO needs a reference model (its objective and objective/kl are relative to "
                             "it): reference_free and the losses cpo, simpo, orpo are not supported")
        if self.ld_alpha is not None:
            raise ValueError("ld_alpha is not supported online: objective/kl and objective/entropy are over whole "
                             "completions")
        if self.reward_model_path is not None and self.judge is not None:
            raise ValueError("give reward_model_path or judge, not both")
        if self.max_new_tokens < 1 or self.judge_max_new_tokens < 1:
            raise ValueError(f"max_new_tokens and judge_max_new_tokens must be at least 1, got "
                             f"{self.max_new_tokens} and {self.judge_max_new_tokens}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        if self.missing_eos_penalty is not None and self.missing_eos_penalty < 0:
            raise ValueError(f"missing_eos_penalty must be non-negative, got {self.missing_eos_penalty}")
        if self.max_length is not None and self.max_length <= self.max_new_tokens:
            raise ValueError(f"max_length={self.max_length} leaves no room for a prompt before "
                             f"max_new_tokens={self.max_new_tokens} completion tokens")
        super().__post_init__()

    def loss_spec(self, **overrides) -> LossSpec:
        """The loss configuration with the first epoch's β unless ``beta`` is given."""
        return super().loss_spec(**{"beta": self.beta[0], **overrides})

    @property
    def prompt_limit(self) -> int | None:
        """The most prompt tokens kept: ``min(max_prompt_length, max_length - max_new_tokens)`` (None: no limit)."""
        limits = [n for n in (self.max_prompt_length,
                              None if self.max_length is None else self.max_length - self.max_new_tokens) if n]
        return min(limits) if limits else None
