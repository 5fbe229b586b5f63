"""``PackedTrainer``: the base of fastdpo's trainers on ``transformers.Trainer``: what DPO, online DPO and SFT share."""

from __future__ import annotations

import itertools
import logging
import math
import time
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import torch
from accelerate.utils import gather_object
from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler
from transformers import Trainer, TrainerCallback

from ..data import Grouping, PackedBatch, TokenBudgetBatchSampler, pack
from ..data.packing import IndexedRows
from ..models import is_peft
from .checkpoints import AtomicCheckpointMixin
from .metrics import Metrics, MetricWindow
from .packed_config import PackedConfig

logger = logging.getLogger(__name__)


@dataclass
class StepTally:
    """The optimiser steps of this process's latest ``train`` call: how many ran, how many trained on at least one
    item (pair, loss token), and why the last one that did not, did not (with what to do)."""

    steps: int = 0
    trained: int = 0
    untrained_reason: str | None = None


class _StepEnd(TrainerCallback):
    def __init__(self, trainer: PackedTrainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer.end_step()


class PackedTrainer(AtomicCheckpointMixin, Trainer):
    """Training on packed micro-batches (``fastdpo.data.PackedBatch``). The base wraps ``model`` in ``peft_config``'s
    adapters, tokenises raw datasets (keeping a report of what was dropped per split, ``drop_reports``), builds the
    loaders of whole micro-batches, counts each optimiser step's items over all processes before its first
    micro-batch (``step_counts``; the loss divides by them, so the Trainer does not rescale it), keeps a
    ``MetricWindow`` (``metrics``) logged with the Trainer's training and evaluation logs, leaves evaluation time
    out of tokens/s, runs loss-only prediction steps, writes atomic checkpoints and saves and stops on SIGTERM
    (``AtomicCheckpointMixin``).

    A subclass declares what is its own:

    - ``tokenized_columns`` and ``tokenize``: when a dataset is already tokenised, and how raw rows are;
    - ``grouping``: how a tokenised row becomes segments of the packed stream (``fastdpo.data.Grouping``), set
      before this ``__init__``; the default collator packs rows with it;
    - ``batch_sampler``, where micro-batches are not whole rows under ``max_tokens_per_batch`` tokens;
    - ``Counts`` and ``count``: what one micro-batch adds to its step's totals, the first field being the items
      the step's loss is divided by (``num_items_in_batch``);
    - ``compute_loss``, adding its metrics with ``add_loss_metrics`` where a non-finite loss leaves its training
      micro-batch out (``nonfinite``, ``nonfinite_loss``);
      optionally ``extra_logs`` (values logged beside a window's means, e.g. derived from them), and ``nothing_trained``
      (why a step trained on nothing, and what to do).

    A step none of whose items reached the loss is logged as a warning saying why, and tallied (``tally``: a caller
    that finds no trained step there stops with that reason).

    Raises:
        ValueError: a dataset of raw rows without a tokenizer, and the subclass's tokenisation errors.
    """

    loss_is_scaled_for_ga = True
    #: what the non-finite-loss messages call the loss and its items (``nonfinite``)
    loss_name, item_name = "training", "item"
    tokenized_columns: tuple[str, ...] = ()
    grouping: Grouping
    Counts: type[NamedTuple]

    def __init__(self, model, args: PackedConfig, *, train_dataset=None, eval_dataset=None, processing_class=None,
                 peft_config=None, data_collator=None, **kwargs):
        if peft_config is not None and not is_peft(model):
            from peft import get_peft_model

            model = get_peft_model(model, peft_config)
        self.drop_reports: dict[str, dict] = {}
        super().__init__(model=model, args=args, processing_class=processing_class,
                         data_collator=data_collator or partial(pack, grouping=self.grouping),
                         train_dataset=self._tokenized(train_dataset, processing_class, args, "train"),
                         eval_dataset=self._tokenized(eval_dataset, processing_class, args, "eval"), **kwargs)
        self.metrics = MetricWindow(
            (lambda t: self.accelerator.reduce(t, reduction="sum")) if self.args.world_size > 1 else None)
        self.step_counts: NamedTuple | None = None
        self.step_left_out = 0.0
        self.tally = StepTally()
        self.add_callback(_StepEnd(self))

    # ------------------------------------------------------------------ data
    def tokenize(self, dataset, tokenizer, args: PackedConfig) -> tuple:
        """(tokenised dataset with ``tokenized_columns``, report of the rows dropped or cut, or None where the
        tokenisation drops nothing)."""
        raise NotImplementedError

    def _tokenized(self, dataset, tokenizer, args: PackedConfig, split: str):
        if dataset is None or set(self.tokenized_columns) <= set(dataset.column_names):
            return dataset
        if tokenizer is None:
            raise ValueError(f"the {split} dataset holds raw rows: pass the tokenizer as processing_class")
        dataset, report = self.tokenize(dataset, tokenizer, args)
        if report is not None:
            self.drop_reports[split] = report
        return dataset

    def batch_sampler(self, dataset, *, shuffle: bool, seed: int, batch_size: int):
        """The micro-batches (lists of row indices) of ``dataset``: whole rows under ``max_tokens_per_batch`` tokens
        (``TokenBudgetBatchSampler``). ``batch_size`` is the Trainer's rows per device, for a sampler that counts
        rows rather than tokens (``row_batches``)."""
        return TokenBudgetBatchSampler(self.row_lengths(dataset), self.args.max_tokens_per_batch, shuffle=shuffle,
                                       seed=seed)

    def row_lengths(self, dataset) -> list[int]:
        """Tokens each row of a tokenised dataset occupies in a packed stream (``grouping.length``)."""
        return [self.grouping.length(row) for row in dataset.select_columns(list(self.tokenized_columns))]

    @staticmethod
    def row_batches(dataset, *, shuffle: bool, seed: int, batch_size: int) -> BatchSampler:
        """Micro-batches of ``batch_size`` rows, in a seeded random order or in order."""
        order = RandomSampler(dataset, generator=torch.Generator().manual_seed(seed)) if shuffle \
            else SequentialSampler(dataset)
        return BatchSampler(order, batch_size, drop_last=False)

    def _packed_loader(self, dataset, *, shuffle: bool, batch_size: int) -> DataLoader:
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        loader = DataLoader(IndexedRows(dataset), collate_fn=self.data_collator,
                            batch_sampler=self.batch_sampler(dataset, shuffle=shuffle, seed=seed, batch_size=batch_size),
                            num_workers=self.args.dataloader_num_workers, pin_memory=self.args.dataloader_pin_memory)
        return self.accelerator.prepare(loader)

    def get_train_dataloader(self) -> DataLoader:
        # training starts: tokens/s counts training time, not setup, and the tally counts this run's steps
        self.metrics.restart_clock()
        self.tally = StepTally()
        return self._packed_loader(self.train_dataset, shuffle=True, batch_size=self.args.per_device_train_batch_size)

    def get_eval_dataloader(self, eval_dataset=None) -> DataLoader:
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if isinstance(dataset, str):
            dataset = self.eval_dataset[dataset]
        return self._packed_loader(dataset, shuffle=False, batch_size=self.args.per_device_eval_batch_size)

    def _prepare_inputs(self, inputs: PackedBatch) -> PackedBatch:
        return inputs.to(self.args.device)

    # ------------------------------------------------------------- counting
    def count(self, batch: PackedBatch) -> NamedTuple:
        """What ``batch`` adds to its optimiser step's totals, as a ``Counts``."""
        raise NotImplementedError

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """The micro-batches of one optimiser step and the items its loss divides by, over all processes; the
        step's other totals stay in ``step_counts``."""
        batches = list(itertools.islice(epoch_iterator, num_batches))
        counts = [self.count(b) for b in batches]
        totals = [sum(c) for c in zip(*counts)] if counts else [0] * len(self.Counts._fields)
        totals = torch.tensor([totals], device=device)
        if self.args.world_size > 1:
            totals = self.accelerator.gather(totals)
        self.step_counts = self.Counts(*totals.sum(0))
        self.step_left_out = 0.0
        return batches, self.step_counts[0]

    def end_step(self) -> None:
        """Tallies the optimiser step just taken; warns when none of its items reached the loss."""
        self.tally.steps += 1
        if float(self.step_counts[0]) > self.step_left_out:
            self.tally.trained += 1
            return
        self.tally.untrained_reason = self.nothing_trained()
        if self.is_world_process_zero():   # the counts are every process's: one warning
            logger.warning("step %d trained on nothing: %s", self.state.global_step, self.tally.untrained_reason)

    def nothing_trained(self) -> str:
        """Why the current step's items all stayed out of its loss, and what to do."""
        count, item = int(self.step_counts[0]), self.item_name
        if self.step_left_out:   # only ``nonfinite`` leaves items out
            return (f"all {count} {item}(s) had a non-finite loss and were skipped (skipped_{item}s; the warnings "
                    f"above name them).\nWhat to do: correct those {item}s' data or reference log-probs; if the "
                    "policy's own log-probs are not finite, lower the learning rate")
        return f"none of the {count} {self.Counts._fields[0]} reached the loss"

    # ---------------------------------------------------------- reference
    def prepare_reference_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """A separate frozen reference prepared for evaluation on this process's device, under FSDP too, where
        accelerate leaves placement to the sharding: the reference is not sharded but a whole copy on each device,
        as under DDP."""
        return self.accelerator.prepare_model(model, device_placement=True, evaluation_mode=True)

    # ---------------------------------------------------- non-finite losses
    def add_loss_metrics(self, model, inputs: PackedBatch, metrics: Metrics, losses: torch.Tensor,
                         nonfinite: bool) -> None:
        """Adds a micro-batch's ``metrics`` to its mode's window. In training they also count its items left out
        for a ``nonfinite`` loss (the ``skipped_<item_name>s`` field, a ``total()``): the metrics' one reduction
        tells every process whether any process's loss was non-finite, and each then calls ``nonfinite``."""
        field = f"skipped_{self.item_name}s"
        if model.training:
            setattr(metrics, field, torch.tensor(float(inputs.num_rows if nonfinite else 0)))
        skipped = self.metrics.add("train" if model.training else "eval", inputs, metrics).get(field)
        if skipped:
            self.nonfinite(inputs, losses, skipped)

    def nonfinite(self, inputs: PackedBatch, losses: torch.Tensor, skipped: float) -> None:
        """``skipped`` items of the processes' current training micro-batches had a NaN/inf loss (``losses``: this
        process's, [R] per item). Without ``skip_nonfinite_losses`` (an option of the subclass's config) every process
        stops with the same error naming the step and each process's items, before any update; with it, those
        micro-batches are left out of the step (``step_left_out``; each process warns about its own). The messages
        call the loss ``loss_name`` and its items ``item_name``.

        Raises:
            FloatingPointError: without ``skip_nonfinite_losses``, on every process.
        """
        bad = ~torch.isfinite(losses[:inputs.num_rows])
        items = (inputs.row_index[bad] if inputs.row_index is not None else bad.nonzero().flatten()).tolist()
        here = f"training {self.item_name}(s) {items} (losses {losses[bad].tolist()})" if items else ""
        step = self.state.global_step + 1
        if not self.args.skip_nonfinite_losses:
            if self.args.world_size > 1:   # every process learns every process's items: one message everywhere
                here = "; ".join(f"{found} on process {rank}" for rank, found in enumerate(gather_object([here]))
                                 if found)
            raise FloatingPointError(f"non-finite {self.loss_name} loss at step {step}, {here}; the weights were not "
                                     "updated. Set skip_nonfinite_losses to leave such micro-batches out.")
        if items:
            logger.warning("skipping a micro-batch of %d %ss: non-finite loss at step %d, %s", inputs.num_rows,
                           self.item_name, step, here)
        self.step_left_out += skipped

    @staticmethod
    def nonfinite_loss(model, *logps: torch.Tensor) -> torch.Tensor:
        """A zero loss for a micro-batch with a non-finite loss, its backward the one DDP or FSDP needs to stay in
        step. DDP reduces whatever gradient reaches each parameter: a zero for each trainable one, through no
        activation, so none of the micro-batch's NaNs. FSDP reduces in hooks on the forward's graph: through it, the
        micro-batch's differentiable log-probs ``logps`` zeroed (a NaN in the policy's own activations would still
        reach the gradients)."""
        if isinstance(model, (FSDPModule, FullyShardedDataParallel)):
            return sum(t.nan_to_num(0.0, 0.0, 0.0).sum() for t in logps) * 0.0
        return sum(p.sum() * 0.0 for p in model.parameters() if p.requires_grad)

    # ------------------------------------------------------------ evaluation
    def evaluate(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return super().evaluate(*args, **kwargs)
        finally:   # evaluation inside training does not count as training time for tokens/s
            self.metrics.exclude(time.perf_counter() - start)

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        # the window's means replace the Trainer's eval loss (a mean of micro-batch means)
        means = self.metrics.pop("eval")
        means.update(self.extra_logs("eval", means))
        output.metrics.update({f"{metric_key_prefix}_{k}": v for k, v in means.items()})
        return output

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    # --------------------------------------------------------------- logging
    def extra_logs(self, mode: str, means: dict[str, float]) -> dict[str, float]:
        """Values a subclass logs beside a window's ``means`` (``mode``: train or eval), e.g. derived from them."""
        return {}

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.control.should_log:   # the training step's log: the Trainer clears should_log once it is written
            window = self.metrics.pop("train")
            # The Trainer's training loss is the optimised one; but where no item reached the loss (the window's
            # mean loss is NaN) it is the left-out micro-batches' zeros, which would read as a perfect fit.
            if math.isnan(window.pop("loss", 0.0)):
                logs["loss"] = math.nan
            logs.update(window)
            logs.update(self.extra_logs("train", window))
        super().log(logs, start_time)
