"""``PackedTrainerMixin``: what every fastdpo trainer on packed micro-batches shares on ``transformers.Trainer``."""

from __future__ import annotations

import time

import torch
from torch.utils.data import DataLoader

from ..data import PackedBatch
from ..data.packing import IndexedPairs
from .checkpoints import AtomicCheckpointMixin
from .metrics import MetricWindow


class PackedTrainerMixin(AtomicCheckpointMixin):
    """Mix in before ``transformers.Trainer``: loaders of whole packed micro-batches (the subclass's
    ``batch_sampler``), ``PackedBatch`` inputs moved to the device, a ``MetricWindow`` (``self.metrics``, made by
    ``init_metrics``) logged with the Trainer's logs, evaluation time left out of tokens/s, loss-only prediction
    steps, and atomic checkpoints."""

    def batch_sampler(self, dataset, *, shuffle: bool, seed: int, batch_size: int):
        """The micro-batches (lists of row indices) of ``dataset``; ``batch_size`` is the Trainer's rows per device,
        for a sampler that counts rows rather than tokens."""
        raise NotImplementedError

    def _packed_loader(self, dataset, *, shuffle: bool, batch_size: int) -> DataLoader:
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        loader = DataLoader(IndexedPairs(dataset), collate_fn=self.data_collator,
                            batch_sampler=self.batch_sampler(dataset, shuffle=shuffle, seed=seed, batch_size=batch_size),
                            num_workers=self.args.dataloader_num_workers, pin_memory=self.args.dataloader_pin_memory)
        return self.accelerator.prepare(loader)

    def get_train_dataloader(self) -> DataLoader:
        self.metrics.restart_clock()   # tokens/s counts training time, not setup
        return self._packed_loader(self.train_dataset, shuffle=True, batch_size=self.args.per_device_train_batch_size)

    def get_eval_dataloader(self, eval_dataset=None) -> DataLoader:
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if isinstance(dataset, str):
            dataset = self.eval_dataset[dataset]
        return self._packed_loader(dataset, shuffle=False, batch_size=self.args.per_device_eval_batch_size)

    def init_metrics(self) -> None:
        """Call after ``Trainer.__init__`` (the window reduces over the accelerator's processes)."""
        self.metrics = MetricWindow(
            (lambda t: self.accelerator.reduce(t, reduction="sum")) if self.args.world_size > 1 else None)

    def _prepare_inputs(self, inputs: PackedBatch) -> PackedBatch:
        return inputs.to(self.args.device)

    def evaluate(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return super().evaluate(*args, **kwargs)
        finally:   # evaluation inside training does not count as training time for tokens/s
            self.metrics.exclude(time.perf_counter() - start)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def extra_logs(self, mode: str) -> dict[str, float]:
        """Values a subclass logs beside the window's means."""
        return {}

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if "loss" in logs else "eval"
        # the Trainer's training loss is the optimised one
        logs.update(self.metrics.pop(mode, skip=("loss",) if mode == "train" else ()))
        logs.update(self.extra_logs(mode))
        super().log(logs, start_time)
