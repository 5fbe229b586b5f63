"""``DPOTrainer``: ``transformers.Trainer`` with packed pairs, fused log-probs and TRL's metrics.

The loop, optimiser, schedules, checkpoints, logging, gradient accumulation/checkpointing, mixed
precision and ``accelerate launch`` are transformers'; this class supplies the data path
(tokenised pairs -> packed micro-batches), the reference log-probs and the loss.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import logging
import time
from collections import defaultdict

import datasets
import torch
from datasets.fingerprint import Hasher
from torch.utils.data import DataLoader
from transformers import Trainer

from .config import DPOConfig
from .data import tokenize_pairs
from .losses import dpo_loss
from .modeling import _causal_lm, packed_sequence_logps
from .packing import REF_COLUMNS, TokenBudgetBatchSampler, num_pairs, pack_pairs, pair_length

logger = logging.getLogger(__name__)

TOKENIZED_COLUMNS = ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")


def _is_peft(model) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


def model_fingerprint(model: torch.nn.Module, *, exclude_adapters: bool) -> str:
    """sha256 over parameter names and bytes (LoRA weights left out for an adapter-disabled reference)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        if exclude_adapters and "lora_" in name:
            continue
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class DPOTrainer(Trainer):
    """Direct Preference Optimisation (Rafailov et al. 2023) on ``transformers.Trainer``.

    Args:
        model: the policy, a causal LM (or a ``peft.PeftModel``; with ``peft_config`` it is wrapped here).
        ref_model: a frozen reference model. Without it the reference is the policy with its adapters
            disabled (PEFT), a frozen copy of the policy (full fine-tuning), or nothing with
            ``args.reference_free``.
        args: a ``DPOConfig``.
        train_dataset, eval_dataset: raw preference rows in any of TRL's formats (tokenised here
            with ``fastdpo.data.tokenize_pairs``) or already tokenised pairs.
        processing_class: the tokenizer (required for raw rows; saved with the model).
        peft_config: a ``peft`` config to wrap ``model`` with.

    Logged every logging step with TRL's names (and the ``eval_`` prefix on evaluation): loss,
    rewards/chosen, rewards/rejected, rewards/accuracies, rewards/margins, logps/chosen,
    logps/rejected; in training also tokens_per_second and packing_efficiency (real / processed tokens).

    Raises:
        ValueError: raw rows without a tokenizer, or the errors of tokenisation and packing
            (malformed rows, pairs longer than the token budget).
    """

    # compute_loss already divides by the pairs of the whole effective batch
    loss_is_scaled_for_ga = True

    def __init__(self, model, ref_model=None, args: DPOConfig | None = None, train_dataset=None, eval_dataset=None,
                 processing_class=None, peft_config=None, **kwargs):
        args = args or DPOConfig(output_dir="fastdpo-output")
        if peft_config is not None and not _is_peft(model):
            from peft import get_peft_model

            model = get_peft_model(model, peft_config)
        self.drop_reports: dict[str, dict] = {}
        train_dataset = self._tokenized(train_dataset, processing_class, args, "train")
        eval_dataset = self._tokenized(eval_dataset, processing_class, args, "eval")
        super().__init__(model=model, args=args, data_collator=pack_pairs, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class, **kwargs)
        self._metric_sums = {"train": defaultdict(float), "eval": defaultdict(float)}
        self._last_log_time = time.perf_counter()

        self.ref_model = None
        if not args.reference_free:
            if ref_model is not None:
                self.ref_model = ref_model
            elif not _is_peft(model):
                self.ref_model = copy.deepcopy(_causal_lm(model))
            if self.ref_model is not None:
                self.ref_model.requires_grad_(False).eval()
                self.ref_model = self.accelerator.prepare_model(self.ref_model, evaluation_mode=True)
        if args.precompute_ref_log_probs and not args.reference_free:
            self.train_dataset = self._with_reference(self.train_dataset, "train")
            if self.eval_dataset is not None:
                self.eval_dataset = self._with_reference(self.eval_dataset, "eval")
            self.ref_model = None   # released: training never needs it again

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
        loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=self.data_collator,
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
        """The micro-batches of one optimiser step and their number of pairs, over all processes."""
        batch_samples = list(itertools.islice(epoch_iterator, num_batches))
        pairs = torch.tensor([sum(num_pairs(b) for b in batch_samples)], device=device)
        if self.args.world_size > 1:
            pairs = self.accelerator.gather(pairs)
        return batch_samples, pairs.sum()

    # ------------------------------------------------------------- reference
    def _reference_logps(self, model, batch) -> tuple[torch.Tensor, torch.Tensor]:
        if self.args.reference_free:
            zeros = batch["input_ids"].new_zeros(num_pairs(batch), dtype=torch.float32)
            return zeros, zeros
        if REF_COLUMNS[0] in batch:
            return batch[REF_COLUMNS[0]], batch[REF_COLUMNS[1]]
        with torch.no_grad():
            if self.ref_model is not None:
                chosen, rejected, _ = packed_sequence_logps(self.ref_model, batch)
            else:
                with self.accelerator.unwrap_model(model).disable_adapter():
                    chosen, rejected, _ = packed_sequence_logps(model, batch)
        return chosen, rejected

    def _with_reference(self, dataset: datasets.Dataset, split: str) -> datasets.Dataset:
        """The dataset with reference log-prob columns, cached by datasets under a fingerprint of the
        data and the reference weights (the main process computes, the others read its cache)."""
        ref = self.ref_model if self.ref_model is not None else self.accelerator.unwrap_model(self.model)
        fingerprint = Hasher.hash((dataset._fingerprint, model_fingerprint(ref, exclude_adapters=True), "ref-v1"))
        model = self.ref_model if self.ref_model is not None else self.model

        def compute(rows: dict) -> dict:
            pairs = [dict(zip(rows, values)) for values in zip(*rows.values())]
            chosen, rejected = [0.0] * len(pairs), [0.0] * len(pairs)
            sampler = TokenBudgetBatchSampler([pair_length(p) for p in pairs], self.args.max_tokens_per_batch,
                                              shuffle=False)
            for idx in sampler:
                batch = self._prepare_inputs(pack_pairs([pairs[i] for i in idx]))
                with self.compute_loss_context_manager():
                    c, r = self._reference_logps(model, batch)
                for i, vc, vr in zip(idx, c.tolist(), r.tolist()):
                    chosen[i], rejected[i] = vc, vr
            return {REF_COLUMNS[0]: chosen, REF_COLUMNS[1]: rejected}

        was_training = model.training
        model.eval()
        try:
            with self.accelerator.main_process_first():
                return dataset.map(compute, batched=True, batch_size=512, new_fingerprint=fingerprint,
                                   desc=f"reference log-probs ({split})")
        finally:
            model.train(was_training)

    # ------------------------------------------------------------------ loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Mean DPO loss over the pairs of the effective batch (``num_items_in_batch`` pairs over all
        processes; scaled by the process count because DDP averages gradients), or over this
        micro-batch when no count is given (evaluation)."""
        policy_chosen, policy_rejected, _ = packed_sequence_logps(model, inputs)
        ref_chosen, ref_rejected = self._reference_logps(model, inputs)
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            policy_chosen, policy_rejected, ref_chosen, ref_rejected, loss_type=self.args.loss_type,
            beta=self.args.beta, label_smoothing=self.args.label_smoothing, reference_free=self.args.reference_free,
        )
        if num_items_in_batch is None:
            loss = losses.mean()
        else:
            loss = losses.sum() / num_items_in_batch * self.accelerator.num_processes
        self._accumulate_metrics("train" if model.training else "eval", inputs, {
            "loss": losses.detach(),
            "rewards/chosen": chosen_rewards,
            "rewards/rejected": rejected_rewards,
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
            "rewards/margins": chosen_rewards - rejected_rewards,
            "logps/chosen": policy_chosen.detach(),
            "logps/rejected": policy_rejected.detach(),
        })
        return (loss, {"chosen_rewards": chosen_rewards, "rejected_rewards": rejected_rewards}) if return_outputs \
            else loss

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
    def _accumulate_metrics(self, mode: str, batch: dict, per_pair: dict[str, torch.Tensor]) -> None:
        """Sums over pairs (and token counts), reduced over processes; ``log`` turns them into means."""
        tokens = batch["input_ids"].numel()
        sums = torch.stack([v.float().sum() for v in per_pair.values()] + [
            torch.tensor(float(num_pairs(batch)), device=batch["input_ids"].device),
            torch.tensor(float(tokens), device=batch["input_ids"].device),
            torch.tensor(float(int(batch["cu_seqlens"][-1])), device=batch["input_ids"].device),
        ])
        if self.args.world_size > 1:
            sums = self.accelerator.reduce(sums, reduction="sum")
        for key, value in zip([*per_pair, "pairs", "processed_tokens", "real_tokens"], sums.tolist()):
            self._metric_sums[mode][key] += value

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if "loss" in logs else "eval"
        sums = self._metric_sums[mode]
        if sums.get("pairs"):
            pairs = sums.pop("pairs")
            processed, real = sums.pop("processed_tokens"), sums.pop("real_tokens")
            prefix = "eval_" if mode == "eval" else ""
            for key, total in sums.items():
                if not (mode == "train" and key == "loss"):   # the Trainer's loss is the optimised one
                    logs[prefix + key] = total / pairs
            if mode == "train":
                now = time.perf_counter()
                logs["tokens_per_second"] = processed / (now - self._last_log_time)
                logs["packing_efficiency"] = real / processed
                self._last_log_time = now
            sums.clear()
        super().log(logs, start_time)
