"""``KTOTrainer``: KTO on ``PackedTrainer``: unpaired rows packed with each row's KL completion as a second branch off
its prompt, the fused LM head, the reference live or precomputed."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import NamedTuple

import torch
from tqdm.auto import tqdm

from ..data import PackedBatch
from ..data.unpaired import KL_COLUMN, UNPAIRED_COLUMNS, GroupBatchSampler, UnpairedGrouping, tokenize_unpaired
from ..losses import kto_kl, kto_loss
from ..ops import sequence_logps
from ..train.forward import label_logps
from ..train.metrics import Mean, Metrics, metric, total
from ..train.packed_trainer import PackedTrainer
from ..train.reference import AdapterReference, PrecomputedReference, ReferenceModel, resolve_reference
from ..train.reference_cache import ReferenceKey, with_cached_ref_logps
from ..train.trainer import use_prefix_sharing
from .config import KTOConfig

logger = logging.getLogger(__name__)


@dataclass
class KTOMetrics(Metrics):
    """TRL 1.16's KTO metrics: ``loss`` and the rewards and log-probs are means over rows (of their class), ``kl`` over
    micro-batches, ``logits/*`` and ``entropy`` over completion tokens."""

    loss: Mean | None = None
    kl: Mean | None = None
    rewards_chosen: Mean | None = metric("rewards/chosen")
    rewards_rejected: Mean | None = metric("rewards/rejected")
    logps_chosen: Mean | None = metric("logps/chosen")
    logps_rejected: Mean | None = metric("logps/rejected")
    logits_chosen: Mean | None = metric("logits/chosen")
    logits_rejected: Mean | None = metric("logits/rejected")
    entropy: Mean | None = None
    skipped_rows: torch.Tensor | None = total()   # with a non-finite loss (training)


class StepRows(NamedTuple):
    """What a step's KTO loss divides by (its rows), and its prompt + completion tokens (TRL's ``num_tokens``)."""

    rows: torch.Tensor
    tokens: torch.Tensor


@dataclass
class UnpairedLogps:
    """Summed log-probs of one packed micro-batch of R unpaired rows (``unpaired_logps``)."""

    completion: torch.Tensor           # [R] fp32, of each row's completion
    kl: torch.Tensor | None            # [R] fp32, of its KL completion (None: a batch without them)
    stats: dict[str, torch.Tensor]     # the requested per-token statistics, over every scored token of the batch


def unpaired_logps(model: torch.nn.Module, batch: PackedBatch, stats: tuple[str, ...] = ()) -> UnpairedLogps:
    """One forward of a batch of ``UnpairedGrouping`` rows (``fastdpo.train.label_logps``): each row's completion and
    KL completion log-probs, differentiable, and the requested ``stats``."""
    out = label_logps(model, batch, stats=stats)
    sums = sequence_logps(out.logps, batch.label_cu_seqlens).view(batch.num_rows, batch.group_size)
    return UnpairedLogps(sums[:, 0], sums[:, 1] if batch.group_size == 2 else None, out.stats)


class KTOTrainer(PackedTrainer):
    """Kahneman-Tversky Optimisation (Ethayarajh et al. 2024) and unpaired APO-zero on ``transformers.Trainer``, with
    TRL 1.16 KTOTrainer's data, loss and metrics. Each row is packed as ``[prompt][completion][KL completion]``: its
    KL completion (another row's, ``fastdpo.data.tokenize_unpaired``) a branch off its prompt where the attention
    supports it, so one forward gives the completion's log-probs and the KL term's. The README's "KTO" section
    describes the modes; ``KTOConfig`` documents every option.

    The loss (``fastdpo.losses.kto_loss``) is averaged over the rows of the effective batch; z₀ (``kto_kl``) is the
    mean over a micro-batch's rows on every process. Metrics (TRL's names): ``loss``, ``kl``, ``rewards/chosen``,
    ``rewards/rejected``, ``rewards/margins``, ``logps/*``, ``logits/*``, ``entropy``, ``num_tokens``, and the base's
    ``tokens_per_second`` and ``packing_efficiency``.

    Args:
        model: the policy, a causal LM or ``peft.PeftModel`` (with ``peft_config`` it is wrapped here).
        ref_model: a frozen reference model; None: a PEFT policy with its adapters disabled, else a frozen copy of
            the policy.
        args: a ``KTOConfig``.
        train_dataset, eval_dataset: unpaired or paired rows in TRL's formats (``tokenize_unpaired``), or rows
            tokenised by it; ``ref_logps``/``ref_KL_logps`` columns are taken as the reference where present.
        processing_class: the tokenizer (required for raw rows; saved with the model).

    Raises:
        ValueError: raw rows without a tokenizer; a training set with one label class; the errors of
            ``tokenize_unpaired``, of ``KTOConfig`` and of the sampler (a KL group over ``max_tokens_per_batch``).
        FloatingPointError: a non-finite row loss in training without ``skip_nonfinite_losses`` (on every process).
    """

    Counts = StepRows
    loss_name, item_name = "KTO", "row"

    def __init__(self, model, ref_model=None, args: KTOConfig | None = None, train_dataset=None, eval_dataset=None,
                 processing_class=None, peft_config=None, **kwargs):
        args = args or KTOConfig(output_dir="fastdpo-kto")
        sharing = args.kl and use_prefix_sharing(model, args, ("completion", "KL completion"))
        self.grouping = UnpairedGrouping(prefix_sharing=sharing, kl=args.kl)
        self.tokenized_columns = UNPAIRED_COLUMNS + ((KL_COLUMN,) if args.kl else ())
        super().__init__(model, args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                         processing_class=processing_class, peft_config=peft_config, **kwargs)
        if self.train_dataset is not None:
            _check_labels(self.train_dataset["label"], args)
        self.num_tokens = 0
        self.reference = resolve_reference(self.model, ref_model, self.accelerator.unwrap_model)
        if isinstance(self.reference, ReferenceModel):
            self.reference.model = self.prepare_reference_model(self.reference.model)
        if args.precompute_ref_log_probs:
            self.train_dataset = self._with_reference(self.train_dataset, "train")
            if self.eval_dataset is not None:
                self.eval_dataset = self._with_reference(self.eval_dataset, "eval")
            self.reference = PrecomputedReference()   # the reference model is released: training never needs it

    # ------------------------------------------------------------------ data
    def tokenize(self, dataset, tokenizer, args: KTOConfig):
        return tokenize_unpaired(dataset, tokenizer, max_length=args.max_length,
                                 kl_group_size=args.per_device_train_batch_size if args.kl else None,
                                 num_proc=args.dataset_num_proc)

    def batch_sampler(self, dataset, *, shuffle: bool, seed: int, batch_size: int):
        return GroupBatchSampler(self.row_lengths(dataset), self.args.per_device_train_batch_size if self.args.kl else 1,
                                 self.args.max_tokens_per_batch, seed=seed,
                                 shuffle=shuffle and self.args.train_sampling_strategy == "random")

    def count(self, batch: PackedBatch) -> StepRows:
        lengths = batch.cu_seqlens.diff()
        return StepRows(batch.num_rows, int(lengths[::batch.group_size].sum()))   # each row's prompt + completion

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batches, rows = super().get_batch_samples(epoch_iterator, num_batches, device)
        self.num_tokens += int(self.step_counts.tokens)
        return batches, rows

    # ------------------------------------------------------- reference
    def reference_logps(self, model: torch.nn.Module, batch: PackedBatch) -> UnpairedLogps:
        """The reference's log-probs of the batch, without gradient: its precomputed columns where it has them."""
        columns = self.grouping.ref_columns
        if set(columns) <= set(batch.row_values):
            values = [batch.row_values[c] for c in columns]
            return UnpairedLogps(values[0], values[1] if len(values) == 2 else None, {})
        with torch.no_grad():
            return self.reference.run(model, lambda m: unpaired_logps(m, batch))

    def _with_reference(self, dataset, split: str):
        """The dataset with the reference log-prob columns (unless it has them), computed once per ``ReferenceKey``
        (data, reference weights and config, layout, packing, precision) and cached on disk as DPO's are
        (``fastdpo.train.reference_cache``): each machine's main process computes or loads them first, the other
        processes then load its file. The cache holds two [N] columns: the completions' and the KL completions'
        (zeros without the KL term, which reads only the first)."""
        if set(self.grouping.ref_columns) <= set(dataset.column_names):
            return dataset
        adapters_off = isinstance(self.reference, AdapterReference)   # the policy, its adapters disabled
        module = self.accelerator.unwrap_model(self.model) if adapters_off else self.reference.model
        key = ReferenceKey.of(module, self.args, data=dataset._fingerprint,
                              prefix_sharing=self.grouping.prefix_sharing, adapter=False)
        return with_cached_ref_logps(dataset, key, self.grouping.ref_columns,
                                     lambda: self._compute_reference(dataset, split), self.accelerator,
                                     f"reference log-probs ({split})")

    def _compute_reference(self, dataset, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """([N] float32 completion, [N] float32 KL completion or zeros) reference log-probs of ``dataset``'s rows,
        in micro-batches of whole KL groups."""
        rows = dataset.select_columns(list(self.tokenized_columns))
        values = torch.zeros(len(rows), 2)
        self.model.eval()   # training mode is set again when training starts
        sampler = self.batch_sampler(rows, shuffle=False, seed=0, batch_size=self.args.per_device_eval_batch_size)
        for idx in tqdm(sampler, desc=f"reference log-probs ({split})", disable=self.args.disable_tqdm):
            batch = self._prepare_inputs(self.data_collator([rows[i] for i in idx]))
            with self.compute_loss_context_manager():
                ref = self.reference_logps(self.model, batch)
            values[idx, 0] = ref.completion.float().cpu()
            if ref.kl is not None:
                values[idx, 1] = ref.kl.float().cpu()
        return values[:, 0].contiguous(), values[:, 1].contiguous()

    # ------------------------------------------------------------------ loss
    def compute_loss(self, model, inputs: PackedBatch, return_outputs=False, num_items_in_batch=None):
        """Mean loss over the rows of the effective batch (``num_items_in_batch`` rows over all processes; scaled by
        the process count because DDP averages gradients), or over this micro-batch when no count is given.

        A training micro-batch with a non-finite row loss (a NaN z₀ makes every process's) is left out of the step
        with a zero loss, or stops training (``PackedTrainer.nonfinite``). Every process runs the same forwards and
        the same collectives (z₀'s, the metrics'), in the same order, whatever its rows."""
        args = self.args
        policy = unpaired_logps(model, inputs, stats=("entropy", "mean_logit"))
        ref = self.reference_logps(model, inputs)
        labels = inputs.row_values["label"].bool()
        kl = kto_kl(policy.kl, ref.kl, self.metrics.reduce) if args.kl else policy.completion.new_zeros(())
        losses, rewards = kto_loss(policy.completion, ref.completion, labels, kl, loss_type=args.loss_type,
                                   beta=args.beta, desirable_weight=args.desirable_weight,
                                   undesirable_weight=args.undesirable_weight)
        nonfinite = model.training and not bool(torch.isfinite(losses).all())
        metrics = self.loss_metrics(inputs, policy, losses, rewards, labels, kl, kept=not nonfinite)
        self.add_loss_metrics(model, inputs, metrics, losses, nonfinite)
        if nonfinite:
            loss = self.nonfinite_loss(model, policy.completion)
        elif num_items_in_batch is None:
            loss = losses.mean()
        else:
            loss = losses.sum() / num_items_in_batch * self.accelerator.num_processes
        return (loss, {"rewards": rewards}) if return_outputs else loss

    # --------------------------------------------------------------- metrics
    def loss_metrics(self, batch: PackedBatch, policy: UnpairedLogps, losses, rewards, labels, kl, *,
                     kept: bool = True) -> KTOMetrics:
        """TRL's metrics of one micro-batch; ``logits/*`` and ``entropy`` over its completions' tokens (not the KL
        completions'). ``kept`` False: the micro-batch is left out of the loss, and its metrics are means of nothing
        (NaN where the whole window has none, as TRL logs the mean of nothing)."""
        keep = torch.full_like(labels, kept)
        lengths = batch.label_cu_seqlens.diff().to(labels.device)
        segment = torch.repeat_interleave(torch.arange(lengths.numel(), device=labels.device), lengths)
        row = segment // batch.group_size
        completion = (segment % batch.group_size == 0) & keep[row]
        desirable = labels[row]
        chosen, rejected = labels & keep, ~labels & keep
        logits, logps = policy.stats["mean_logit"], policy.completion.detach()
        return KTOMetrics(
            loss=Mean.of(losses[keep]), kl=Mean.of(kl.reshape(1)[keep[:1]]),
            rewards_chosen=Mean.of(rewards[chosen]), rewards_rejected=Mean.of(rewards[rejected]),
            logps_chosen=Mean.of(logps[chosen]), logps_rejected=Mean.of(logps[rejected]),
            logits_chosen=Mean.of(logits[completion & desirable]), logits_rejected=Mean.of(logits[completion & ~desirable]),
            entropy=Mean.of(policy.stats["entropy"][completion]),
        )

    def extra_logs(self, mode: str, means: dict[str, float]) -> dict[str, float]:
        margins = {"rewards/margins": means["rewards/chosen"] - means["rewards/rejected"]} \
            if {"rewards/chosen", "rewards/rejected"} <= set(means) else {}
        return {**margins, "num_tokens": float(self.num_tokens)}


def _check_labels(labels: list, args: KTOConfig) -> None:
    """A training set needs both label classes; with unequal counts, TRL's warning on the class weights (KTO Eq. 8)."""
    desirable = sum(bool(label) for label in labels)
    undesirable = len(labels) - desirable
    if not desirable or not undesirable:
        raise ValueError(
            f"the training set has only {'undesirable' if undesirable else 'desirable'} rows ({len(labels)}): KTO "
            "learns from both desirable (label true) and undesirable (false) completions, measured against the "
            "same KL reference point. Check the label column; for desirable rows alone, train with fastdpo sft.")
    if desirable == undesirable:
        return
    low_d, high_d = round(undesirable * args.undesirable_weight / desirable, 2), \
        round(undesirable * args.undesirable_weight / desirable * 1.33, 2)
    low_u, high_u = round(desirable * args.desirable_weight / undesirable / 1.33, 2), \
        round(desirable * args.desirable_weight / undesirable, 2)
    if not (low_d <= args.desirable_weight <= high_d or low_u <= args.undesirable_weight <= high_u):
        logger.warning(
            "You have different amounts of desirable/positive and undesirable/negative examples but the weights on "
            "the desirable and undesirable losses don't seem to be in an ideal range. Based on your data, we recommend "
            f"EITHER desirable_weight in [{low_d}, {high_d}] or undesirable_weight in [{low_u}, {high_u}] (but NOT "
            "BOTH). See the documentation on how to optimally set these weights.")
