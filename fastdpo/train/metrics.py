"""Metrics as named fields (``Metrics``), summed over a logging window and over processes, divided when logged."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from typing import NamedTuple

import torch

from ..data import PackedBatch

MODES = ("train", "eval")


class Mean(NamedTuple):
    """One micro-batch's share of a metric's mean: the sum of its values and how many values that is."""

    total: torch.Tensor
    count: torch.Tensor

    @classmethod
    def of(cls, values: torch.Tensor) -> Mean:
        """The share of a [n] tensor of per-item values (pairs, tokens): their sum and n."""
        return cls(values.detach().float().sum(), torch.tensor(float(values.numel())))


def metric(name: str):
    """A ``Metrics`` field logged as ``name`` (TRL's names hold slashes, which a field name cannot)."""
    return field(default=None, metadata={"name": name})


@dataclass
class Metrics:
    """The metrics of one micro-batch. A trainer declares its own as a subclass whose fields are ``Mean | None``
    (None: this micro-batch adds nothing to that metric); the window sums them in field order, so every process
    reduces the same entries in the same order whichever metrics its micro-batch has."""

    def items(self) -> Iterator[tuple[str, Mean | None]]:
        """(logged name, value) per field, in declaration order."""
        for f in fields(self):
            yield f.metadata.get("name", f.name), getattr(self, f.name)


class MetricWindow:
    """Means of ``Metrics`` since the last log (sum / count over the window), and in training ``tokens_per_second``
    and ``packing_efficiency`` (real / processed tokens).

    Args:
        reduce: sums a 1-D tensor over processes (``accelerator.reduce(..., "sum")``), or None on one process.
    """

    def __init__(self, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.reduce = reduce
        self._sums = {mode: defaultdict(lambda: [0.0, 0.0]) for mode in MODES}
        self._tokens = {mode: [0.0, 0.0] for mode in MODES}
        self.restart_clock()

    def restart_clock(self) -> None:
        """Start timing tokens/s now (training time, not setup)."""
        self._last_log_time = time.perf_counter()

    def exclude(self, seconds: float) -> None:
        """Leave ``seconds`` (an evaluation inside training) out of the tokens/s time."""
        self._last_log_time += seconds

    def add(self, mode: str, batch: PackedBatch, metrics: Metrics) -> None:
        """Adds one micro-batch: one collective over every process, which must all pass the same ``Metrics`` class."""
        device = batch.input_ids.device
        zero = torch.zeros((), device=device)
        entries = list(metrics.items())
        sums = torch.stack([x.float().to(device) for _, value in entries for x in (value or (zero, zero))]
                           + [torch.tensor(float(batch.input_ids.numel()), device=device),
                              torch.tensor(float(int(batch.cu_seqlens[-1])), device=device)])
        if self.reduce is not None:
            sums = self.reduce(sums)
        values = sums.tolist()
        for i, (name, _) in enumerate(entries):
            self._sums[mode][name][0] += values[2 * i]
            self._sums[mode][name][1] += values[2 * i + 1]
        self._tokens[mode][0] += values[-2]
        self._tokens[mode][1] += values[-1]

    def add_total(self, mode: str, key: str, value: float) -> None:
        """A metric logged as a total over the window (e.g. ``skipped_pairs``), not a mean."""
        self._sums[mode][key][0] += value
        self._sums[mode][key][1] = 1.0

    def pop(self, mode: str, *, skip: tuple[str, ...] = ()) -> dict[str, float]:
        """The window's means (metrics without values left out), then a new window."""
        sums = self._sums[mode]
        if not sums:
            return {}
        logs = {key: total / count for key, (total, count) in sums.items() if count and key not in skip}
        processed, real = self._tokens[mode]
        if mode == "train" and processed:   # a window of skipped micro-batches processed nothing
            now = time.perf_counter()
            logs["tokens_per_second"] = processed / (now - self._last_log_time)
            logs["packing_efficiency"] = real / processed
            self._last_log_time = now
        sums.clear()
        self._tokens[mode] = [0.0, 0.0]
        return logs
