"""``DPOTrainer``: ``transformers.Trainer`` with packed pairs, fused log-probs and TRL's metrics.

The loop, optimiser, schedules, checkpoints, logging, gradient accumulation/checkpointing, mixed
precision and ``accelerate launch`` are transformers'; this class supplies the data path
(tokenised pairs -> packed micro-batches), the reference log-probs and the loss.
"""

from __future__ import annotations

import copy
import itertools
import logging
import os
import shutil
import time
from collections import defaultdict

import datasets
import torch
from datasets.fingerprint import Hasher
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import Trainer
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

try:   # a function since transformers 5.x, a Trainer method before
    from transformers.trainer_utils import rotate_checkpoints
except ImportError:
    rotate_checkpoints = None

from .config import DPOConfig
from .data import tokenize_pairs
from .losses import (CONFIG_OPTIONS, LENGTH_NORMALISED_LOSSES, REFERENCE_FREE_LOSSES, dpo_loss, loss_terms,
                     orpo_log_odds, uses_nll)
from .modeling import _causal_lm, chosen_nll_tokens, packed_sequence_logps, pair_logps
from .packing import REF_COLUMNS, IndexedPairs, TokenBudgetBatchSampler, num_pairs, pack_pairs, pair_length
from .reference import SyncRefModelCallback, check_sync_compatible, reference_adapter
from .reference_cache import cache_path, load_ref_logps, model_fingerprint, save_ref_logps

logger = logging.getLogger(__name__)

TOKENIZED_COLUMNS = ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")


def _is_peft(model) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


def zero_loss(model: torch.nn.Module) -> torch.Tensor:
    """A zero loss whose backward reaches every trainable parameter through no activation: a micro-batch left
    out of a step still gives DDP a gradient (of zeros) for each parameter."""
    return sum(p.sum() * 0.0 for p in model.parameters() if p.requires_grad)


def _rotate(trainer: Trainer, run_dir: str) -> None:
    """The Trainer's own deletion of checkpoints beyond ``save_total_limit``."""
    if rotate_checkpoints is None:
        trainer._rotate_checkpoints(use_mtime=True, output_dir=run_dir)
    else:
        rotate_checkpoints(output_dir=run_dir, save_total_limit=trainer.args.save_total_limit,
                           best_model_checkpoint=trainer.state.best_model_checkpoint, use_mtime=True)


class DPOTrainer(Trainer):
    """Direct Preference Optimisation (Rafailov et al. 2023) on ``transformers.Trainer``.

    Args:
        model: the policy, a causal LM (or a ``peft.PeftModel``; with ``peft_config`` it is wrapped here).
        ref_model: a frozen reference model (with a PEFT policy only with ``args.force_use_ref_model``).
        args: a ``DPOConfig``.
        train_dataset, eval_dataset: raw preference rows in any of TRL's formats (tokenised here
            with ``fastdpo.data.tokenize_pairs``) or already tokenised pairs.
        processing_class: the tokenizer (required for raw rows; saved with the model).
        peft_config: a ``peft`` config to wrap ``model`` with.

    The reference, in order of precedence (the PEFT options follow TRL's PEFT docs and TRL <= 0.28):

    - nothing with ``args.reference_free`` or a reference-free loss (cpo, simpo, orpo);
    - ``ref_model``, frozen. With a PEFT policy this raises unless ``args.force_use_ref_model`` (no reference
      model is needed: disabling the adapter gives one);
    - ``args.ref_adapter_name``: a second, frozen copy of the trained adapter loaded into the PEFT policy under
      that name (``PeftModel.load_adapter(path, adapter_name=...)``); the reference pass switches to it with
      ``set_adapter`` and back to ``args.model_adapter_name`` (default: the active adapter), so there is no
      second base model. peft's ``set_adapter`` makes the activated adapter trainable and freezes the others:
      the trainer activates the train adapter at construction (freezing the reference copy even if it was
      loaded trainable) and the reference with ``inference_mode=True``, so the reference copy never has
      ``requires_grad`` and never enters the optimiser. Note that peft cannot name an adapter "train" (an
      ``nn.Module`` attribute).
    - the PEFT policy with its adapters disabled;
    - a frozen copy of the policy (full fine-tuning).

    With ``args.precompute_ref_log_probs`` the reference log-probs are computed once before training (any of
    the modes above) and the reference model is released. With ``args.sync_ref_model`` (TR-DPO, full
    fine-tuning only) ``fastdpo.reference.SyncRefModelCallback`` moves the reference model toward the policy
    every ``ref_model_sync_steps`` optimiser steps. The reference weights are not saved in checkpoints: a
    resumed TR-DPO run restarts from a fresh reference.

    The loss is ``fastdpo.dpo_loss`` with ``args``' loss options (every loss of TRL 1.16's DPOTrainer, RPO,
    and CPO/SimPO/ORPO, which need no reference model), averaged over the pairs of the effective batch (all
    micro-batches of one optimiser step, over all processes), however it is split into micro-batches. The
    inputs each loss needs come from the same forward (``fastdpo.modeling.pair_logps``): completion token
    counts from ``label_cu_seqlens``, LD-DPO's split before the sums, the ``log_sum_p2`` statistic only with
    ``use_weighting``, the chosen prompts' log-probs only for ORPO.

    Batch-level terms under gradient accumulation:

    - The NLL term (sft, rpo_alpha, cpo_alpha, orpo) is the mean NLL over all chosen NLL tokens of the
      effective batch: ``get_batch_samples`` counts them with the pairs, and each micro-batch passes
      ``dpo_loss`` its share of that count (effective tokens × its pairs / effective pairs), so the micro-batches
      add up to ``Σ NLL / Σ tokens`` exactly. With one micro-batch this is TRL's per-batch mean. With WPO
      weights, each micro-batch's NLL part is scaled by its own pairs' weights (TRL scales the batch's by its
      pairs' weights); evaluation uses each micro-batch's own token count.
    - aot and aot_unpaired sort within each micro-batch (TRL sorts within its per-device batch too), so they,
      and the MoE term below, depend on the split.
    - MoE router load-balancing loss (a model whose config sets ``output_router_logits``; TRL 1.16
      ``DPOTrainer._compute_loss``): the policy forward's ``aux_loss`` (transformers'
      ``load_balancing_loss_func`` over all tokens of the packed micro-batch: no padding, so no mask) times
      ``router_aux_loss_coef`` (``args.router_aux_loss_coef``, else the model config's) is added to the loss.
      It is a mean over one micro-batch's tokens and not additive over micro-batches (a product of two means),
      so each micro-batch adds it weighted by its share of the effective batch's pairs, like its DPO losses:
      the step optimises ``Σ DPO losses / pairs + coef · Σ_mb (pairs_mb / pairs) · aux_mb``. With one
      micro-batch on one process that is TRL's ``losses.mean() + coef · aux``. The reference forward's
      aux loss is discarded.

    Logged every logging step with TRL's names (and the ``eval_`` prefix on evaluation): loss,
    rewards/chosen, rewards/rejected, rewards/accuracies, rewards/margins, logps/chosen, logps/rejected
    (means over pairs; per-token means for simpo and orpo, as their TRL trainers log), nll_loss with an NLL
    term (mean over its tokens), log_odds_ratio and log_odds_chosen for orpo, aux_loss with the MoE term
    (pair-weighted mean over micro-batches, unscaled by the coefficient; eval_loss includes the weighted
    term, as the training loss does); in training also
    tokens_per_second and packing_efficiency (real / processed tokens).

    Raises:
        ValueError: raw rows without a tokenizer, or the errors of tokenisation and packing
            (malformed rows, pairs longer than the token budget), or of the loss options (``DPOConfig``);
            a PEFT policy with ``ref_model`` but without ``force_use_ref_model``; adapter names on a policy
            that is not a PeftModel, not loaded in it, or naming the trained adapter as the reference;
            ``ref_adapter_name`` together with ``ref_model``; ``sync_ref_model`` with a reference whose
            parameter names or shapes differ from the policy's; ``router_aux_loss_coef`` on a model that
            returns no router logits.
        NotImplementedError: ``sync_ref_model`` with a PEFT policy (TRL 1.16's check).
    """

    # compute_loss already divides by the pairs of the whole effective batch
    loss_is_scaled_for_ga = True

    def __init__(self, model, ref_model=None, args: DPOConfig | None = None, train_dataset=None, eval_dataset=None,
                 processing_class=None, peft_config=None, **kwargs):
        args = args or DPOConfig(output_dir="fastdpo-output")
        if peft_config is not None and not _is_peft(model):
            from peft import get_peft_model

            model = get_peft_model(model, peft_config)
        self._check_reference_options(model, ref_model, args)
        self._model_adapter = self._set_up_adapters(model, args)
        self.drop_reports: dict[str, dict] = {}
        train_dataset = self._tokenized(train_dataset, processing_class, args, "train")
        eval_dataset = self._tokenized(eval_dataset, processing_class, args, "eval")
        super().__init__(model=model, args=args, data_collator=pack_pairs, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class, **kwargs)
        self._metric_sums = {mode: defaultdict(lambda: [0.0, 0.0]) for mode in ("train", "eval")}
        self._token_sums = {mode: [0.0, 0.0] for mode in ("train", "eval")}
        self._last_log_time = time.perf_counter()
        # β is validated by the config (OnlineDPOConfig's is a per-epoch list)
        terms = loss_terms(args.loss_type, args.loss_weights, label_smoothing=args.label_smoothing,
                           f_divergence_type=args.f_divergence_type, discopop_tau=args.discopop_tau,
                           rpo_alpha=args.rpo_alpha, weighted=args.use_weighting, ld_alpha=args.ld_alpha)
        self._nll = uses_nll(terms, args.cpo_alpha)
        self._orpo = args.loss_type == ["orpo"]
        self._length_normalised = bool(LENGTH_NORMALISED_LOSSES & set(args.loss_type))
        self._uses_reference = not (args.reference_free or REFERENCE_FREE_LOSSES & set(args.loss_type))
        self.aux_loss_enabled, self.router_aux_loss_coef = self._router_aux_loss(model, args)

        self.ref_model = None
        if self._uses_reference:
            if ref_model is not None:
                self.ref_model = ref_model
            elif not _is_peft(model):
                self.ref_model = copy.deepcopy(_causal_lm(model))
            if self.ref_model is not None:
                self.ref_model.requires_grad_(False).eval()
                if args.sync_ref_model:
                    check_sync_compatible(_causal_lm(model), self.ref_model)
                self.ref_model = self.accelerator.prepare_model(self.ref_model, evaluation_mode=True)
        if args.sync_ref_model:
            self.add_callback(SyncRefModelCallback(
                self.ref_model, lambda m: _causal_lm(self.accelerator.unwrap_model(m))))
        if args.precompute_ref_log_probs and self._uses_reference:
            self.train_dataset = self._with_reference(self.train_dataset, "train")
            if self.eval_dataset is not None:
                self.eval_dataset = self._with_reference(self.eval_dataset, "eval")
            self.ref_model = None   # released: training never needs it again

    # ------------------------------------------------------- reference options
    @staticmethod
    def _check_reference_options(model, ref_model, args: DPOConfig) -> None:
        if _is_peft(model) and ref_model is not None and not args.force_use_ref_model:
            raise ValueError(
                "You passed both a ref_model and a PEFT model. For training PEFT adapters with DPO there is no need to "
                "pass a reference model. Please pass `ref_model=None` in case you want to train PEFT adapters, or pass "
                "a ref_model with `force_use_ref_model=True` if you want to use a different ref_model."
            )
        if args.sync_ref_model and _is_peft(model):
            raise NotImplementedError(
                "You passed `sync_ref_model=True` while using a PEFT model, which is currently not supported. "
                "With PEFT, DPOTrainer does not keep a separate reference model in memory; instead, it recovers "
                "reference behavior by temporarily disabling the adapter (or switching to `ref_adapter_name`), and a "
                "forced `ref_model` has none of the policy's adapter weights. As a result, there is no standalone "
                "`ref_model` instance to synchronize. Use `sync_ref_model=False`, or opt for full fine-tuning if you "
                "need a synced reference model."
            )
        if (args.model_adapter_name or args.ref_adapter_name) and not _is_peft(model):
            raise ValueError("model_adapter_name/ref_adapter_name name PEFT adapters, but the policy is not a "
                             "peft.PeftModel (load it with PeftModel.from_pretrained or pass peft_config)")
        if args.ref_adapter_name and ref_model is not None:
            raise ValueError("pass either a ref_model (with force_use_ref_model) or ref_adapter_name, not both: "
                             "each is a whole reference")

    @staticmethod
    def _set_up_adapters(model, args: DPOConfig) -> str | None:
        """Activates the adapter to train and freezes the reference adapter; returns the train adapter's name."""
        if not _is_peft(model):
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

    @staticmethod
    def _router_aux_loss(model, args: DPOConfig) -> tuple[bool, float]:
        """(enabled, coefficient) of the MoE router load-balancing loss; the coefficient is
        ``args.router_aux_loss_coef`` or else the config's (TRL 1.16 ``DPOTrainer.__init__``)."""
        config = _causal_lm(model).config.get_text_config()
        returns_router_logits = bool(getattr(config, "output_router_logits", False))
        coef = args.router_aux_loss_coef
        if coef and not returns_router_logits:
            raise ValueError(
                f"router_aux_loss_coef is set to {coef} but {type(_causal_lm(model)).__name__} returns no router logits "
                f"(its config's output_router_logits is {getattr(config, 'output_router_logits', 'absent')}), so "
                "there is no auxiliary loss to weight: set output_router_logits=True on a Mixture-of-Experts model's "
                "config, or leave router_aux_loss_coef unset."
            )
        coef = getattr(config, "router_aux_loss_coef", 0.0) if coef is None else coef
        return returns_router_logits and coef != 0.0, float(coef)

    # ------------------------------------------------------------------ data
    def _tokenized(self, dataset, tokenizer, args: DPOConfig, split: str):
        if dataset is None or set(TOKENIZED_COLUMNS) <= set(dataset.column_names):
            return dataset
        if tokenizer is None:
            raise ValueError(f"the {split} dataset holds raw rows: pass the tokenizer as processing_class")
        tokenized, report = tokenize_pairs(
            dataset, tokenizer, max_length=args.max_length, max_prompt_length=args.max_prompt_length,
            truncation_mode=args.truncation_mode, num_proc=args.dataset_num_proc,
        )
        self.drop_reports[split] = report
        return tokenized

    def _packed_loader(self, dataset, *, shuffle: bool) -> DataLoader:
        lengths = [pair_length(row) for row in dataset.select_columns(list(TOKENIZED_COLUMNS))]
        sampler = TokenBudgetBatchSampler(lengths, self.args.max_tokens_per_batch, shuffle=shuffle,
                                          seed=self.args.data_seed if self.args.data_seed is not None else self.args.seed)
        loader = DataLoader(IndexedPairs(dataset), batch_sampler=sampler, collate_fn=self.data_collator,
                            num_workers=self.args.dataloader_num_workers, pin_memory=self.args.dataloader_pin_memory)
        return self.accelerator.prepare(loader)

    def get_train_dataloader(self) -> DataLoader:
        self._last_log_time = time.perf_counter()   # tokens/s counts training time, not setup
        return self._packed_loader(self.train_dataset, shuffle=True)

    def get_eval_dataloader(self, eval_dataset=None) -> DataLoader:
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if isinstance(dataset, str):
            dataset = self.eval_dataset[dataset]
        return self._packed_loader(dataset, shuffle=False)

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """The micro-batches of one optimiser step and their number of pairs, over all processes; with an NLL
        term each micro-batch also gets ``effective_nll_tokens``, the effective batch's chosen NLL tokens."""
        batch_samples = list(itertools.islice(epoch_iterator, num_batches))
        nll_tokens = sum(int(chosen_nll_tokens(b, with_prompt=self._orpo).sum()) for b in batch_samples) \
            if self._nll else 0
        counts = torch.tensor([[sum(num_pairs(b) for b in batch_samples), nll_tokens]], device=device)
        if self.args.world_size > 1:
            counts = self.accelerator.gather(counts)
        pairs, nll_tokens = counts.sum(0)
        if self._nll:
            for batch in batch_samples:
                batch["effective_nll_tokens"] = nll_tokens
        return batch_samples, pairs

    # ------------------------------------------------------------- reference
    def _reference_logps(self, model, batch) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Reference log-probs (LD-DPO-weighted with ``ld_alpha``, as TRL), or (None, None) without a reference."""
        if not self._uses_reference:
            return None, None
        if REF_COLUMNS[0] in batch:
            return batch[REF_COLUMNS[0]], batch[REF_COLUMNS[1]]
        with torch.no_grad():
            if self.ref_model is not None:
                chosen, rejected = packed_sequence_logps(self.ref_model, batch, ld_alpha=self.args.ld_alpha)
            elif self.args.ref_adapter_name is not None:
                with reference_adapter(self.accelerator.unwrap_model(model), self.args.ref_adapter_name,
                                       self._model_adapter):
                    chosen, rejected = packed_sequence_logps(model, batch, ld_alpha=self.args.ld_alpha)
            else:
                with self.accelerator.unwrap_model(model).disable_adapter():
                    chosen, rejected = packed_sequence_logps(model, batch, ld_alpha=self.args.ld_alpha)
        return chosen, rejected

    def _with_reference(self, dataset: datasets.Dataset, split: str) -> datasets.Dataset:
        """The dataset with reference log-prob columns, computed once per (data, reference weights, ld_alpha)
        and cached on disk (``fastdpo.reference_cache``): each machine's main process computes or loads them
        first, the other processes then load its file."""
        ref = self.ref_model if self.ref_model is not None else self.accelerator.unwrap_model(self.model)
        # A reference adapter is part of the reference; disabled adapters are not.
        weights = model_fingerprint(ref, exclude_adapters=self.args.ref_adapter_name is None)
        fingerprint = Hasher.hash((dataset._fingerprint, weights, "ref-v2", self.args.ld_alpha))
        path = cache_path(fingerprint)
        with self.accelerator.local_main_process_first():
            cached = load_ref_logps(path, fingerprint, len(dataset))
            if cached is None:
                logger.info("reference log-probs (%s): computing %d pairs into %s", split, len(dataset), path)
                cached = self._compute_reference(dataset, split)
                save_ref_logps(path, fingerprint, *cached)
            else:
                logger.info("reference log-probs (%s): loaded from %s", split, path)
        for column, values in zip(REF_COLUMNS, cached):
            dataset = dataset.add_column(column, values.tolist(), new_fingerprint=Hasher.hash((fingerprint, column)))
        return dataset

    def _compute_reference(self, dataset: datasets.Dataset, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """[B] float32 chosen and rejected reference log-probs of every pair, in token-budget micro-batches."""
        model = self.ref_model if self.ref_model is not None else self.model
        rows = dataset.select_columns(list(TOKENIZED_COLUMNS))
        chosen, rejected = torch.empty(len(rows)), torch.empty(len(rows))
        sampler = TokenBudgetBatchSampler([pair_length(row) for row in rows], self.args.max_tokens_per_batch,
                                          shuffle=False)
        was_training = model.training
        model.eval()
        try:
            for idx in tqdm(sampler, desc=f"reference log-probs ({split})", disable=self.args.disable_tqdm):
                batch = self._prepare_inputs(pack_pairs([rows[i] for i in idx]))
                with self.compute_loss_context_manager():
                    c, r = self._reference_logps(model, batch)
                chosen[idx], rejected[idx] = c.float().cpu(), r.float().cpu()
        finally:
            model.train(was_training)
        return chosen, rejected

    # ------------------------------------------------------------ checkpoints
    def _save_checkpoint(self, model, trial):
        """Checkpoints appear whole or not at all: the Trainer writes ``checkpoint-N`` under
        ``output_dir/.staging`` and the main process moves it into place with one rename, so a process
        killed mid-save leaves no half-written ``checkpoint-N`` for ``--resume-from-checkpoint`` to pick."""
        if trial is not None:   # hyperparameter search keeps the Trainer's own layout
            return super()._save_checkpoint(model, trial)
        run_dir = self.args.output_dir
        staging = os.path.join(run_dir, ".staging")
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)   # what a killed save left behind
        self.accelerator.wait_for_everyone()
        self.args.output_dir = staging
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.output_dir = run_dir
        self.accelerator.wait_for_everyone()   # every rank has written its RNG state
        if self.args.should_save:
            final = os.path.join(run_dir, name)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(os.path.join(staging, name), final)
            best = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.best_global_step}")
            if self.state.best_global_step and os.path.isdir(best):
                self.state.best_model_checkpoint = best
                self.state.save_to_json(os.path.join(final, TRAINER_STATE_NAME))
            _rotate(self, run_dir)
        self.accelerator.wait_for_everyone()

    # ------------------------------------------------------------------ loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Mean loss over the pairs of the effective batch (``num_items_in_batch`` pairs over all processes;
        scaled by the process count because DDP averages gradients), or over this micro-batch when no count
        is given (evaluation). See the class docstring for the NLL term's normalisation."""
        args = self.args
        policy = pair_logps(model, inputs, ld_alpha=args.ld_alpha, wpo=args.use_weighting, prompt_nll=self._orpo)
        ref_chosen, ref_rejected = self._reference_logps(model, inputs)
        nll_tokens = policy.nll_tokens.sum()
        if num_items_in_batch is not None and "effective_nll_tokens" in inputs:
            nll_tokens = inputs["effective_nll_tokens"] * num_pairs(inputs) / num_items_in_batch
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            policy.chosen, policy.rejected, ref_chosen, ref_rejected,
            chosen_lengths=policy.chosen_lengths, rejected_lengths=policy.rejected_lengths,
            chosen_nll=policy.chosen_nll, nll_tokens=nll_tokens, pair_weights=policy.wpo_weights,
            **self._loss_options(),
        )
        if model.training and not bool(torch.isfinite(losses).all()):
            return self._nonfinite(model, inputs, losses)
        if num_items_in_batch is None:
            loss, share = losses.mean(), 1.0
        else:
            loss = losses.sum() / num_items_in_batch * self.accelerator.num_processes
            share = num_pairs(inputs) / num_items_in_batch * self.accelerator.num_processes
        aux = policy.aux_loss if self.aux_loss_enabled else None
        if aux is not None:   # a mean over this micro-batch's tokens, weighted by its share of the pairs
            loss = loss + self.router_aux_loss_coef * aux * share
        self._log_loss_metrics("train" if model.training else "eval", inputs, policy, losses, chosen_rewards,
                               rejected_rewards, aux)
        return (loss, {"chosen_rewards": chosen_rewards, "rejected_rewards": rejected_rewards}) if return_outputs \
            else loss

    def _loss_options(self) -> dict:
        """``dpo_loss``'s keyword options, from ``args`` (a subclass may set one per step, e.g. β per epoch)."""
        return {name: getattr(self.args, name) for name in CONFIG_OPTIONS}

    def _nonfinite(self, model, inputs, losses):
        """A NaN/inf pair loss stops training, naming the step and the pairs; with ``skip_nonfinite_losses`` the
        micro-batch is left out instead. Its backward would spread the NaN through every shared weight, so the
        skip returns a zero that reaches every trainable parameter (DDP still gets each gradient) through no
        activation at all."""
        bad = ~torch.isfinite(losses)
        pairs = (inputs["pair_index"][bad] if "pair_index" in inputs else bad.nonzero().flatten()).tolist()
        where = f"step {self.state.global_step + 1}, training pair(s) {pairs} (losses {losses[bad].tolist()})"
        if not self.args.skip_nonfinite_losses:
            raise FloatingPointError(f"non-finite DPO loss at {where}; the weights were not updated. "
                                     "Set skip_nonfinite_losses to leave such micro-batches out.")
        logger.warning("skipping a micro-batch of %d pairs: non-finite loss at %s", num_pairs(inputs), where)
        self._metric_sums["train"]["skipped_pairs"][0] += num_pairs(inputs)
        self._metric_sums["train"]["skipped_pairs"][1] = 1.0
        return zero_loss(model)

    def _log_loss_metrics(self, mode, inputs, policy, losses, chosen_rewards, rejected_rewards, aux=None) -> None:
        chosen, rejected = policy.chosen.detach(), policy.rejected.detach()
        losses = losses.detach()
        if aux is not None:   # eval_loss is the mean of these: the optimised loss, aux term included
            losses = losses + self.router_aux_loss_coef * aux.detach()
        if self._length_normalised:
            chosen, rejected = chosen / policy.chosen_lengths, rejected / policy.rejected_lengths
        per_pair = {
            "loss": losses,
            "rewards/chosen": chosen_rewards,
            "rewards/rejected": rejected_rewards,
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
            "rewards/margins": chosen_rewards - rejected_rewards,
            "logps/chosen": chosen,
            "logps/rejected": rejected,
        }
        if self._orpo:
            log_odds = orpo_log_odds(chosen, rejected)
            per_pair.update({"log_odds_ratio": torch.nn.functional.logsigmoid(log_odds), "log_odds_chosen": log_odds})
        if aux is not None:   # weighted by pairs, as in the loss
            per_pair["aux_loss"] = aux.detach().expand(losses.numel())
        per_token = {"nll_loss": (policy.chosen_nll.detach().sum(), policy.nll_tokens.sum())} if self._nll else {}
        self._accumulate_metrics(mode, inputs, per_pair, per_token)

    def evaluate(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return super().evaluate(*args, **kwargs)
        finally:   # evaluation inside training does not count as training time for tokens/s
            self._last_log_time += time.perf_counter() - start

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    # --------------------------------------------------------------- metrics
    def _accumulate_metrics(self, mode: str, batch: dict, per_pair: dict[str, torch.Tensor],
                            per_token: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Sums and counts, reduced over processes, for means over pairs (``per_pair``: [B] values) or over
        tokens (``per_token``: (sum, token count)); ``log`` divides them."""
        device = batch["input_ids"].device
        pairs = torch.tensor(float(num_pairs(batch)), device=device)
        entries = {k: (v.float().sum(), pairs) for k, v in per_pair.items()}
        entries.update({k: (total.float(), count.float()) for k, (total, count) in per_token.items()})
        tokens = [torch.tensor(float(batch["input_ids"].numel()), device=device),
                  torch.tensor(float(int(batch["cu_seqlens"][-1])), device=device)]
        sums = torch.stack([x for pair in entries.values() for x in pair] + tokens)
        if self.args.world_size > 1:
            sums = self.accelerator.reduce(sums, reduction="sum")
        values = sums.tolist()
        for i, key in enumerate(entries):
            self._metric_sums[mode][key][0] += values[2 * i]
            self._metric_sums[mode][key][1] += values[2 * i + 1]
        self._token_sums[mode][0] += values[-2]
        self._token_sums[mode][1] += values[-1]

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if "loss" in logs else "eval"
        sums = self._metric_sums[mode]
        if sums:
            prefix = "eval_" if mode == "eval" else ""
            for key, (total, count) in sums.items():
                if count and not (mode == "train" and key == "loss"):   # the Trainer's loss is the optimised one
                    logs[prefix + key] = total / count
            processed, real = self._token_sums[mode]
            if mode == "train" and processed:   # a window of skipped micro-batches processed nothing
                now = time.perf_counter()
                logs["tokens_per_second"] = processed / (now - self._last_log_time)
                logs["packing_efficiency"] = real / processed
                self._last_log_time = now
            sums.clear()
            self._token_sums[mode] = [0.0, 0.0]
        super().log(logs, start_time)
