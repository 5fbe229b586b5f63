"""``DPOConfig``: ``PackedConfig`` plus TRL's DPO fields."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..losses import LOSS_TYPES, LossSpec
from .packed_config import PackedConfig


@dataclass
class DPOConfig(PackedConfig):
    """Training arguments for ``fastdpo.DPOTrainer``: ``PackedConfig`` plus DPO's fields, whose names and meanings
    follow TRL 1.16's DPOConfig (``loss_type`` a list, as there; a string is taken as a one-element list), its
    CPOConfig (``simpo_gamma``, ``cpo_alpha``) and TRL <= 0.28's DPOConfig (``rpo_alpha``, ``reference_free``).
    The losses are ``fastdpo.dpo_loss``'s.

    Micro-batches are packed token streams of at most ``max_tokens_per_batch`` tokens (whole pairs),
    so ``per_device_train_batch_size`` is not used; the effective batch is
    ``gradient_accumulation_steps`` micro-batches per device, and the loss is the mean over its pairs.

    ``learning_rate`` defaults to TRL's 1e-6; ``PackedConfig`` gives the other defaults that differ from
    TrainingArguments'.

    Reference options (the README's "Reference options"): ``model_adapter_name``/``ref_adapter_name`` and
    ``force_use_ref_model`` as TRL <= 0.28's DPOConfig; ``sync_ref_model``, ``ref_model_mixup_alpha``,
    ``ref_model_sync_steps`` (TR-DPO) and ``router_aux_loss_coef`` (MoE) as TRL 1.16's.

    Raises:
        ValueError: an invalid loss configuration (see ``fastdpo.losses.LossSpec``: unknown loss types,
            loss_weights of another length, combinations TRL rejects); ``ref_adapter_name`` equal to
            ``model_adapter_name``; ``sync_ref_model`` with ``precompute_ref_log_probs`` (TRL 1.16's check and
            message) or without a reference (``reference_free``, cpo/simpo/orpo); ``ref_model_mixup_alpha``
            outside (0, 1] or ``ref_model_sync_steps < 1``; a negative ``router_aux_loss_coef``; and those of
            ``PackedConfig``.
    """

    beta: float = field(default=0.1, metadata={
        "help": "β: the KL-penalty coefficient of the DPO losses (IPO's τ, ORPO's λ, the scale of CPO/SimPO)."})
    loss_type: list[str] = field(default_factory=lambda: ["sigmoid"], metadata={
        "help": f"Preference loss, or several combined with --loss-weights: {', '.join(LOSS_TYPES)}. cpo, simpo "
                "and orpo (TRL's CPOTrainer/ORPOTrainer losses) need no reference model and stand alone."})
    loss_weights: list[float] | None = field(default=None, metadata={
        "help": "One weight per loss type (default 1.0 each), e.g. 0.8 0.2 1.0 for MPO's sigmoid bco_pair sft."})
    label_smoothing: float = field(default=0.0, metadata={
        "help": "ε in [0, 0.5]: the label-flip probability of robust (< 0.5) and of cDPO smoothing (sigmoid, aot, "
                "aot_unpaired, cpo, simpo); exo_pair's ε (> 0, the paper suggests 1e-3)."})
    f_divergence_type: str = field(default="reverse_kl", metadata={
        "help": "f-DPO divergence: reverse_kl, forward_kl, js_divergence or alpha_divergence (non-default ones with "
                "sigmoid, sigmoid_norm, hinge, ipo, exo_pair, robust, discopop, sft only)."})
    f_alpha_divergence_coef: float = field(default=0.5, metadata={
        "help": "α of f_divergence_type=alpha_divergence."})
    use_weighting: bool = field(default=False, metadata={
        "help": "WPO: weight each pair by its completions' length-normalised, Σp²-aligned probabilities."})
    ld_alpha: float | None = field(default=None, metadata={
        "help": "LD-DPO's α in [0, 1]: weight of the log-probs beyond the shorter completion's length (None: 1)."})
    rpo_alpha: float | None = field(default=None, metadata={
        "help": "RPO: add rpo_alpha times the mean NLL of the chosen completions (TRL <= 0.28; same as adding sft "
                "to --loss-type with weight rpo_alpha)."})
    discopop_tau: float = field(default=0.05, metadata={"help": "DiscoPOP's temperature τ > 0."})
    simpo_gamma: float = field(default=0.5, metadata={"help": "SimPO's target reward margin γ (loss_type simpo)."})
    cpo_alpha: float = field(default=1.0, metadata={
        "help": "Weight of the NLL (behaviour-cloning) term of cpo and simpo (0 = the SimPO paper's loss)."})
    max_prompt_length: int | None = field(default=512, metadata={"help": "Maximum prompt tokens (truncated beyond)."})
    prefix_sharing: bool = field(default=True, metadata={
        "help": "Pack each pair as [prompt][chosen][rejected], the prompt through the model once (Wang & Hegde "
                "2024), where the attention implementation supports it (packed_sdpa, flash_attention_2, "
                "flex_attention, sdpa, eager); false: [prompt+chosen][prompt+rejected]."})
    precompute_ref_log_probs: bool = field(
        default=False,
        metadata={"help": "Compute the reference log-probs once before training, cache them with the tokenised "
                          "dataset and release the reference model."},
    )
    reference_free: bool = field(default=False, metadata={
        "help": "Ignore the reference model (log-probs taken as 0; TRL <= 0.28's reference_free)."})
    model_adapter_name: str | None = field(default=None, metadata={
        "help": "Name of the train target PEFT adapter, when using LoRA with multiple adapters (default: the "
                "policy's active adapter)."})
    ref_adapter_name: str | None = field(default=None, metadata={
        "help": "Name of the reference PEFT adapter, when using LoRA with multiple adapters: the reference pass "
                "switches to it (frozen) instead of disabling the adapters."})
    force_use_ref_model: bool = field(default=False, metadata={
        "help": "If you provide a PEFT model as the active model and wish to use a different model for the "
                "`ref_model`, set this flag to `True`."})
    sync_ref_model: bool = field(default=False, metadata={
        "help": "Whether to synchronize the reference model with the active model every `ref_model_sync_steps` "
                "steps, using the `ref_model_mixup_alpha` parameter (TR-DPO, https://huggingface.co/papers/2404.09656). "
                "Not compatible with PEFT or `precompute_ref_log_probs=True`."})
    ref_model_mixup_alpha: float = field(default=0.6, metadata={
        "help": "TR-DPO's α in (0, 1]: the reference becomes `α * π_θ + (1 - α) * π_ref_prev` at each sync "
                "(1 = hard update). Needs `sync_ref_model=True`."})
    ref_model_sync_steps: int = field(default=512, metadata={
        "help": "TR-DPO's τ: synchronize the reference every this many optimiser steps. Needs `sync_ref_model=True`."})
    router_aux_loss_coef: float | None = field(default=None, metadata={
        "help": "Coefficient of the load-balancing auxiliary loss of Mixture-of-Experts models whose config sets "
                "`output_router_logits`, added to the policy's loss with this weight. When not set, the value declared "
                "by the model config is used. Set to `0.0` to disable it. Fails with a model that returns no router "
                "logits."})
    skip_nonfinite_losses: bool = field(
        default=False,
        metadata={"help": "On a NaN/inf pair loss, leave those pairs out of the step (counted as skipped_pairs) "
                          "instead of stopping with an error naming the step and the pairs."},
    )

    learning_rate: float = field(default=1e-6, metadata={"help": "The initial learning rate for AdamW."})

    def __post_init__(self):
        if isinstance(self.loss_type, str):
            self.loss_type = [self.loss_type]
        self.loss_spec()   # validates the loss options
        if self.ref_adapter_name is not None and self.ref_adapter_name == self.model_adapter_name:
            raise ValueError(f"ref_adapter_name and model_adapter_name are both {self.ref_adapter_name!r}: the "
                             "reference adapter must be a second, frozen copy under another name")
        self._check_sync_ref_model()
        if self.router_aux_loss_coef is not None and self.router_aux_loss_coef < 0:
            raise ValueError(f"router_aux_loss_coef must be >= 0 (0 disables the MoE auxiliary loss), "
                             f"got {self.router_aux_loss_coef}")
        super().__post_init__()

    def _check_sync_ref_model(self) -> None:
        if not 0.0 < self.ref_model_mixup_alpha <= 1.0:
            raise ValueError(f"ref_model_mixup_alpha must be in (0, 1] (1 = copy the policy into the reference), "
                             f"got {self.ref_model_mixup_alpha}")
        if self.ref_model_sync_steps < 1:
            raise ValueError(f"ref_model_sync_steps must be at least 1, got {self.ref_model_sync_steps}")
        if not self.sync_ref_model:
            return
        if self.precompute_ref_log_probs:
            raise ValueError(
                "You cannot use `sync_ref_model=True` together with `precompute_ref_log_probs=True`. "
                "`precompute_ref_log_probs=True` assumes a fixed reference model, but with `sync_ref_model=True` "
                "the reference model is periodically updated during training, making any precomputed reference "
                "log-probs stale. Set `precompute_ref_log_probs=False` or disable `sync_ref_model`."
            )
        if not self.loss_spec().needs_reference:
            why = "reference_free=True" if self.reference_free else f"loss_type {self.loss_type} needs no reference model"
            raise ValueError(f"sync_ref_model=True has no reference model to synchronize: {why}")

    def loss_spec(self, **overrides) -> LossSpec:
        """The validated loss configuration of these arguments (``fastdpo.losses.LossSpec``)."""
        return LossSpec.from_config(self, **overrides)
