"""``SFTTrainer``: supervised fine-tuning on ``PackedTrainer`` with packed sequences and the fused LM head."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from ..data import PackedBatch
from ..data.sft import SEQUENCES, BestFitBatchSampler, tokenize_sft
from ..train.forward import label_logps
from ..train.metrics import Mean, Metrics
from ..train.packed_trainer import PackedTrainer
from .config import SFTConfig


@dataclass
class SFTMetrics(Metrics):
    """TRL's SFT metrics, means over the loss tokens."""

    loss: Mean | None = None
    mean_token_accuracy: Mean | None = None


class StepTokens(NamedTuple):
    """What a step's SFT loss divides by (its loss tokens), and the tokens it trains on (``num_tokens``)."""

    loss_tokens: torch.Tensor
    tokens: torch.Tensor


class SFTTrainer(PackedTrainer):
    """Supervised fine-tuning (TRL 1.16 ``SFTTrainer``'s data formats, masks, loss and metrics) on packed,
    padding-free micro-batches (``fastdpo.data.sft``) whose loss tokens alone reach the LM head, through
    ``fastdpo.linear_logps`` (the model's own forward with ``logits_to_keep=1``, as DPO: ``label_logps``).

    The loss is ``Σ NLL / loss tokens`` over the effective batch (every micro-batch of an optimiser step, on
    every process), whatever its split; evaluation averages over the eval set's loss tokens. Metrics (TRL's names):
    ``loss``, ``mean_token_accuracy`` (share of loss tokens whose label is the argmax), ``num_tokens`` (tokens
    trained on so far), ``tokens_per_second``, ``packing_efficiency``; ``eval_`` prefixed in evaluation.

    Args:
        model: a causal LM or ``peft.PeftModel`` (with ``peft_config`` it is wrapped here).
        args: an ``SFTConfig``.
        train_dataset, eval_dataset: SFT rows in any format of ``fastdpo.data.sft.tokenize_sft`` (tokenised here)
            or already tokenised (``input_ids``, optional ``labels``).
        processing_class: the tokenizer (required for raw rows; saved with the model).

    Raises:
        ValueError: raw rows without a tokenizer; the errors of ``tokenize_sft`` and of the samplers (a sequence
            longer than ``max_tokens_per_batch``).
    """

    tokenized_columns = ("input_ids",)
    grouping = SEQUENCES
    Counts = StepTokens

    def __init__(self, model, args: SFTConfig | None = None, data_collator=None, train_dataset=None, eval_dataset=None,
                 processing_class=None, peft_config=None, **kwargs):
        super().__init__(model, args or SFTConfig(output_dir="fastdpo-sft"), data_collator=data_collator,
                         train_dataset=train_dataset, eval_dataset=eval_dataset, processing_class=processing_class,
                         peft_config=peft_config, **kwargs)
        self.num_tokens = 0

    # ------------------------------------------------------------------ data
    def tokenize(self, dataset, tokenizer, args: SFTConfig):
        return tokenize_sft(dataset, tokenizer, dataset_text_field=args.dataset_text_field,
                            completion_only_loss=args.completion_only_loss, assistant_only_loss=args.assistant_only_loss,
                            max_length=args.max_length, truncation_mode=args.truncation_mode, eos_token=args.eos_token,
                            num_proc=args.dataset_num_proc)

    def batch_sampler(self, dataset, *, shuffle: bool, seed: int, batch_size: int):
        if not self.args.packing:
            return self.row_batches(dataset, shuffle=shuffle, seed=seed, batch_size=batch_size)
        return BestFitBatchSampler(self.row_lengths(dataset), self.args.max_tokens_per_batch, shuffle=shuffle, seed=seed)

    def count(self, batch: PackedBatch) -> StepTokens:
        return StepTokens(batch.targets.numel(), batch.input_ids.numel())

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batches, loss_tokens = super().get_batch_samples(epoch_iterator, num_batches, device)
        self.num_tokens += int(self.step_counts.tokens)
        return batches, loss_tokens

    # ------------------------------------------------------------------ loss
    def compute_loss(self, model, inputs: PackedBatch, return_outputs=False, num_items_in_batch=None):
        """``Σ NLL`` of this micro-batch's loss tokens over the effective batch's (``num_items_in_batch``, all
        processes; scaled by the process count because DDP averages gradients), or its own mean without a count."""
        out = label_logps(model, inputs, stats=("is_argmax",))
        logps = out.logps
        nll = -logps
        if self.args.loss_type == "dft":   # Dynamic Fine-Tuning: NLL weighted by the token's detached probability
            nll = nll * logps.detach().exp()
        tokens = torch.tensor(float(inputs.targets.numel()), device=nll.device)
        if num_items_in_batch is None:
            loss = nll.sum() / tokens.clamp_min(1)
        else:
            loss = nll.sum() / num_items_in_batch * self.accelerator.num_processes
        self.metrics.add("train" if model.training else "eval", inputs, SFTMetrics(
            loss=Mean(nll.detach().sum(), tokens), mean_token_accuracy=Mean(out.stats["is_argmax"].sum(), tokens)))
        return (loss, {"per_token_nll": nll.detach()}) if return_outputs else loss

    def extra_logs(self, mode: str, means: dict[str, float]) -> dict[str, float]:
        return {"num_tokens": float(self.num_tokens)} if mode == "train" else {}
