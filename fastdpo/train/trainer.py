"""``PreferenceTrainer``: what offline and online DPO share on ``PackedTrainer`` — the pair layout, the reference
strategy and the loss over the pairs of the effective batch."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import NamedTuple

import torch

from ..data import PackedBatch, PairGrouping, pack
from ..losses import LossSpec, orpo_log_odds, preference_loss
from ..models import causal_lm, is_peft
from ..models.prefix_attention import unsupported_reason
from .config import DPOConfig
from .forward import PairLogps, chosen_nll_tokens, pair_logps
from .metrics import Mean, Metrics, metric, total
from .packed_trainer import PackedTrainer
from .ref_sync import SyncRefModelCallback, check_sync_compatible
from .reference import AdapterReference, ReferenceModel, reference_logps, resolve_reference

logger = logging.getLogger(__name__)


#: what a micro-batch without pairs runs instead, so that its process runs the forwards and the backward of the others
PLACEHOLDER_PAIR = {"prompt_input_ids": [0], "chosen_input_ids": [0], "rejected_input_ids": [0]}


@dataclass
class PreferenceMetrics(Metrics):
    """TRL's DPO metrics: means over pairs, ``nll_loss`` over the chosen NLL tokens (with an NLL term)."""

    loss: Mean | None = None
    rewards_chosen: Mean | None = metric("rewards/chosen")
    rewards_rejected: Mean | None = metric("rewards/rejected")
    rewards_accuracies: Mean | None = metric("rewards/accuracies")
    rewards_margins: Mean | None = metric("rewards/margins")
    logps_chosen: Mean | None = metric("logps/chosen")
    logps_rejected: Mean | None = metric("logps/rejected")
    log_odds_ratio: Mean | None = None      # ORPO's
    log_odds_chosen: Mean | None = None
    aux_loss: Mean | None = None            # MoE router load balancing
    nll_loss: Mean | None = None
    skipped_pairs: torch.Tensor | None = total()   # with a non-finite loss (training)


class StepPairs(NamedTuple):
    """What a step's DPO loss divides by: its pairs, and its chosen NLL tokens (the NLL term is their mean)."""

    pairs: torch.Tensor
    nll_tokens: torch.Tensor


class PreferenceTrainer(PackedTrainer):
    """The DPO-family loss on packed pairs (``fastdpo.data.PairGrouping``, with a shared prefix where the model's
    attention supports it and ``args.prefix_sharing`` asks for it); subclasses supply the data.

    The loss is ``fastdpo.losses.preference_loss`` with ``args``' ``LossSpec``, averaged over the pairs of the
    effective batch (all micro-batches of one optimiser step, over all processes); the README's "Training"
    section gives the normalisation of the NLL and MoE terms under accumulation and the logged metrics.

    Raises:
        ValueError: a PEFT policy with ``ref_model`` but without ``force_use_ref_model``; adapter names on a
            policy that is not a PeftModel, not loaded in it, or naming the trained adapter as the reference;
            ``ref_adapter_name`` together with ``ref_model``; ``sync_ref_model`` with a reference whose parameter
            names or shapes differ from the policy's; ``router_aux_loss_coef`` on a model without router logits.
            Under FSDP: ``precompute_ref_log_probs`` with the PEFT policy as its own reference, and ``sync_ref_model``.
        NotImplementedError: ``sync_ref_model`` with a PEFT policy (TRL 1.16's check).
    """

    Counts = StepPairs
    loss_name, item_name = "DPO", "pair"

    def __init__(self, model, ref_model=None, args: DPOConfig | None = None, **kwargs):
        self.grouping = self.pair_grouping(use_prefix_sharing(model, args))
        super().__init__(model, args, **kwargs)
        model = self.model
        _check_reference_options(model, ref_model, args)
        model_adapter = _set_up_adapters(model, args)
        self.loss_spec = args.loss_spec()
        self.aux_loss_enabled, self.router_aux_loss_coef = _router_aux_loss(model, args)
        self.reference = resolve_reference(
            model, ref_model, self.accelerator.unwrap_model, ld_alpha=args.ld_alpha,
            ref_adapter_name=args.ref_adapter_name, model_adapter_name=model_adapter,
        ) if self.loss_spec.needs_reference else None
        if self.is_fsdp_enabled:
            _check_fsdp(args, self.reference)
        if isinstance(self.reference, ReferenceModel):
            if args.sync_ref_model:
                check_sync_compatible(causal_lm(model), self.reference.model)
            self.reference.model = self.prepare_reference_model(self.reference.model)
            if args.sync_ref_model:
                self.add_callback(SyncRefModelCallback(
                    self.reference.model, lambda m: causal_lm(self.accelerator.unwrap_model(m))))

    @property
    def prefix_sharing(self) -> bool:
        """Whether pairs are packed ``[prompt][chosen][rejected]`` (``use_prefix_sharing``)."""
        return self.grouping.prefix_sharing

    @property
    def ref_model(self) -> torch.nn.Module | None:
        """The separate reference model, or None (no reference, adapters, or released after precomputing)."""
        return getattr(self.reference, "model", None)

    def pair_grouping(self, prefix_sharing: bool) -> PairGrouping:
        """How a pair is packed (a subclass whose rows carry more, e.g. images, packs them too)."""
        return PairGrouping(prefix_sharing)

    def step_loss_spec(self) -> LossSpec:
        """The loss of the current step (a subclass may vary one field, e.g. β per epoch)."""
        return self.loss_spec

    # ------------------------------------------------------------------ data
    def count(self, batch: PackedBatch) -> StepPairs:
        """The pairs of ``batch`` and, with an NLL term, its chosen NLL tokens, which each micro-batch's NLL mean
        divides by."""
        spec = self.loss_spec
        return StepPairs(batch.num_rows,
                         int(chosen_nll_tokens(batch, with_prompt=spec.prompt_nll).sum()) if spec.uses_nll else 0)

    # ------------------------------------------------------------------ loss
    def compute_loss(self, model, inputs: PackedBatch, return_outputs=False, num_items_in_batch=None):
        """Mean loss over the pairs of the effective batch (``num_items_in_batch`` pairs over all processes;
        scaled by the process count because DDP averages gradients), or over this micro-batch when no count
        is given (evaluation).

        A training micro-batch without pairs (online DPO: the judge ranked none) or with a non-finite pair loss is
        left out of the step with a zero loss (``nonfinite`` says what happens to the latter). Every process still
        runs the forwards, the metrics' reduction and the backward that the others run, in the same order."""
        spec = self.step_loss_spec()
        batch = inputs if inputs.num_rows else pack([PLACEHOLDER_PAIR], self.grouping).to(inputs.input_ids.device)
        policy = pair_logps(model, batch, ld_alpha=spec.ld_alpha, wpo=spec.use_weighting,
                            prompt_nll=spec.prompt_nll)
        ref = reference_logps(self.reference, model, batch)
        nll_tokens = policy.nll_tokens.sum()
        if inputs.num_rows and num_items_in_batch is not None and spec.uses_nll and self.step_counts is not None:
            nll_tokens = self.step_counts.nll_tokens * inputs.num_rows / num_items_in_batch
        losses, chosen_rewards, rejected_rewards = preference_loss(
            spec, policy.chosen, policy.rejected, *(ref or (None, None)),
            chosen_lengths=policy.chosen_lengths, rejected_lengths=policy.rejected_lengths,
            chosen_nll=policy.chosen_nll, nll_tokens=nll_tokens, pair_weights=policy.wpo_weights,
        )
        aux = policy.aux_loss if self.aux_loss_enabled else None
        nonfinite = model.training and inputs.num_rows > 0 and not bool(torch.isfinite(losses).all())
        kept = slice(0, 0) if nonfinite or not inputs.num_rows else slice(None)   # logged: the pairs in the loss
        metrics = self.loss_metrics(inputs, policy.rows(kept), None if ref is None else (ref[0][kept], ref[1][kept]),
                                    losses[kept], chosen_rewards[kept], rejected_rewards[kept], aux)
        self.add_loss_metrics(model, inputs, metrics, losses, nonfinite)
        if not inputs.num_rows:   # the placeholder pair: a finite graph, backpropagated as the other processes do
            loss = losses.sum() * 0.0
        elif nonfinite:
            loss = self.nonfinite_loss(model, policy.chosen, policy.rejected)
        else:
            if num_items_in_batch is None:
                loss, share = losses.mean(), 1.0
            else:
                loss = losses.sum() / num_items_in_batch * self.accelerator.num_processes
                share = inputs.num_rows / num_items_in_batch * self.accelerator.num_processes
            if aux is not None:   # a mean over this micro-batch's tokens, weighted by its share of the pairs
                loss = loss + self.router_aux_loss_coef * aux * share
        return (loss, {"chosen_rewards": chosen_rewards[kept], "rejected_rewards": rejected_rewards[kept]}) \
            if return_outputs else loss

    # --------------------------------------------------------------- metrics
    def loss_metrics(self, batch: PackedBatch, policy: PairLogps, ref, losses, chosen_rewards, rejected_rewards,
                     aux=None) -> PreferenceMetrics:
        """TRL's metrics of one micro-batch: means over its pairs, and ``nll_loss`` over its chosen NLL tokens."""
        spec = self.step_loss_spec()
        chosen, rejected = policy.chosen.detach(), policy.rejected.detach()
        losses = losses.detach()
        if aux is not None:   # eval_loss is the mean of these: the optimised loss, aux term included
            losses = losses + self.router_aux_loss_coef * aux.detach()
        if spec.length_normalised:
            chosen, rejected = chosen / policy.chosen_lengths, rejected / policy.rejected_lengths
        log_odds = orpo_log_odds(chosen, rejected) if spec.prompt_nll else None
        return PreferenceMetrics(
            loss=Mean.of(losses), rewards_chosen=Mean.of(chosen_rewards), rewards_rejected=Mean.of(rejected_rewards),
            rewards_accuracies=Mean.of((chosen_rewards > rejected_rewards).float()),
            rewards_margins=Mean.of(chosen_rewards - rejected_rewards),
            logps_chosen=Mean.of(chosen), logps_rejected=Mean.of(rejected),
            log_odds_ratio=None if log_odds is None else Mean.of(torch.nn.functional.logsigmoid(log_odds)),
            log_odds_chosen=None if log_odds is None else Mean.of(log_odds),
            # weighted by pairs, as in the loss
            aux_loss=None if aux is None else Mean.of(aux.detach().expand(losses.numel())),
            nll_loss=Mean(policy.chosen_nll.detach().sum(), policy.nll_tokens.sum()) if spec.uses_nll else None,
        )


def _check_reference_options(model, ref_model, args: DPOConfig) -> None:
    if is_peft(model) and ref_model is not None and not args.force_use_ref_model:
        raise ValueError(
            "You passed both a ref_model and a PEFT model. For training PEFT adapters with DPO there is no need to "
            "pass a reference model. Please pass `ref_model=None` in case you want to train PEFT adapters, or pass "
            "a ref_model with `force_use_ref_model=True` if you want to use a different ref_model."
        )
    if args.sync_ref_model and is_peft(model):
        raise NotImplementedError(
            "You passed `sync_ref_model=True` while using a PEFT model, which is currently not supported. "
            "With PEFT, DPOTrainer does not keep a separate reference model in memory; instead, it recovers "
            "reference behavior by temporarily disabling the adapter (or switching to `ref_adapter_name`), and a "
            "forced `ref_model` has none of the policy's adapter weights. As a result, there is no standalone "
            "`ref_model` instance to synchronize. Use `sync_ref_model=False`, or opt for full fine-tuning if you "
            "need a synced reference model."
        )
    if (args.model_adapter_name or args.ref_adapter_name) and not is_peft(model):
        raise ValueError("model_adapter_name/ref_adapter_name name PEFT adapters, but the policy is not a "
                         "peft.PeftModel (load it with PeftModel.from_pretrained or pass peft_config)")
    if args.ref_adapter_name and ref_model is not None:
        raise ValueError("pass either a ref_model (with force_use_ref_model) or ref_adapter_name, not both: "
                         "each is a whole reference")


def _check_fsdp(args: DPOConfig, reference) -> None:
    """What cannot run under FSDP, where the policy reaches the devices only when training starts, sharded."""
    if args.precompute_ref_log_probs and isinstance(reference, AdapterReference):
        raise ValueError(
            f"precompute_ref_log_probs with {reference.description} as the reference cannot run under FSDP: that "
            "reference is the policy, which is on no device before training starts, then sharded. Give a separate "
            "reference model (ref_model, --ref-model), train data-parallel (accelerate launch --multi_gpu), or give "
            "the dataset its reference log-probs as ref_chosen_logps and ref_rejected_logps columns")
    if args.sync_ref_model:
        raise ValueError("sync_ref_model (TR-DPO) cannot run under FSDP: the policy weights it mixes into the "
                         "reference are sharded across the processes; train data-parallel (accelerate launch "
                         "--multi_gpu)")


def _set_up_adapters(model, args: DPOConfig) -> str | None:
    """Activates the adapter to train and freezes the reference adapter; returns the train adapter's name."""
    if not is_peft(model):
        return None
    loaded = sorted(model.peft_config)
    for option in ("model_adapter_name", "ref_adapter_name"):
        name = getattr(args, option)
        if name is not None and name not in model.peft_config:
            raise ValueError(f"{option}={name!r} is not loaded in the PEFT model (its adapters: {loaded}); load "
                             f"it with PeftModel.load_adapter(path, adapter_name={name!r})")
    train = args.model_adapter_name or model.active_adapter
    if args.ref_adapter_name == train:
        raise ValueError(f"ref_adapter_name={train!r} is the adapter being trained (the active one): load the "
                         "reference as a second adapter and name the trained one with model_adapter_name")
    if args.model_adapter_name is not None or args.ref_adapter_name is not None:
        # peft's set_adapter makes the named adapter trainable and freezes every other one, so a reference
        # adapter loaded with is_trainable=True never reaches the optimiser.
        model.set_adapter(train)
    return train


def use_prefix_sharing(model, args, completions: tuple[str, ...] = ("chosen", "rejected")) -> bool:
    """Whether to pack a prompt's ``completions`` with a shared prefix: ``args.prefix_sharing`` and an attention
    implementation that runs it (``fastdpo.models.prefix_attention``); logs the layout and the attention either way."""
    config = causal_lm(model).config.get_text_config()
    reason = unsupported_reason(config) if args.prefix_sharing else None
    shared = args.prefix_sharing and reason is None
    layout = (f"shared prefix [prompt]{''.join(f'[{c}]' for c in completions)}" if shared
              else f"unshared {''.join(f'[prompt+{c}]' for c in completions)}")
    why = f" ({reason}; prefix sharing is off)" if reason else ""
    logger.info("packing: %s layout, attention %s%s", layout, config._attn_implementation, why)
    return shared


def _router_aux_loss(model, args: DPOConfig) -> tuple[bool, float]:
    """(enabled, coefficient) of the MoE router load-balancing loss; the coefficient is
    ``args.router_aux_loss_coef`` or else the config's (TRL 1.16 ``DPOTrainer.__init__``)."""
    lm = causal_lm(model)
    config = lm.config.get_text_config()
    returns_router_logits = bool(getattr(config, "output_router_logits", False))
    coef = args.router_aux_loss_coef
    if coef and not returns_router_logits:
        raise ValueError(
            f"router_aux_loss_coef is set to {coef} but {type(lm).__name__} returns no router logits "
            f"(its config's output_router_logits is {getattr(config, 'output_router_logits', 'absent')}), so "
            "there is no auxiliary loss to weight: set output_router_logits=True on a Mixture-of-Experts model's "
            "config, or leave router_aux_loss_coef unset."
        )
    coef = getattr(config, "router_aux_loss_coef", 0.0) if coef is None else coef
    return returns_router_logits and coef != 0.0, float(coef)
