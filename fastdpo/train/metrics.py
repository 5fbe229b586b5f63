"""Metrics as named fields (``Metrics``), summed over a logging window and over processes, divided when logged (a
mean) or logged as summed (a total)."""

from __future__ import annotations

import math
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


def total():
    """A ``Metrics`` field holding a count (a scalar tensor, e.g. ``skipped_pairs``), logged as its sum over the
    window and the processes, and only where that sum is not 0."""
    return field(default=None, metadata={"total": True})


@dataclass
class Metrics:
    """The metrics of one micro-batch. A trainer declares its own as a subclass whose fields are ``Mean | None``
    or ``total()`` counts. None: the metric does not apply to this run (its configuration has no such term); a
    ``Mean`` of no values (a micro-batch whose items were left out) is logged as NaN when the whole window has
    none, as TRL logs the mean of nothing. The window sums the fields in declaration order, so every process
    reduces the same entries in the same order whichever values its micro-batch has."""

    def items(self) -> Iterator[tuple[str, Mean | torch.Tensor | None]]:
        """(logged name, value) per field, in declaration order."""
        for f in fields(self):
            yield f.metadata.get("name", f.name), getattr(self, f.name)

    @classmethod
    def totals(cls) -> set[str]:
        """The logged names of the ``total()`` fields."""
        return {f.metadata.get("name", f.name) for f in fields(cls) if f.metadata.get("total")}


class MetricWindow:
    """Means of ``Metrics`` since the last log (sum / count over the window), and in training ``tokens_per_second``
    and ``packing_efficiency`` (real / processed tokens).

    Args:
        reduce: sums a 1-D tensor over processes (``accelerator.reduce(..., "sum")``), or None on one process.
    """

    def __init__(self, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.reduce = reduce
        self._sums = {mode: defaultdict(lambda: [0.0, 0.0]) for mode in MODES}
        self._present = {mode: set() for mode in MODES}   # names with a value (a Mean, maybe of nothing)
        self._totals: set[str] = set()
        self._tokens = {mode: [0.0, 0.0] for mode in MODES}
        self.restart_clock()

    def restart_clock(self) -> None:
        """Start timing tokens/s now (training time, not setup)."""
        self._last_log_time = time.perf_counter()

    def exclude(self, seconds: float) -> None:
        """Leave ``seconds`` (an evaluation inside training) out of the tokens/s time."""
        self._last_log_time += seconds

    def add(self, mode: str, batch: PackedBatch, metrics: Metrics) -> dict[str, float]:
        """Adds one micro-batch: one collective over every process, which must all pass the same ``Metrics`` class.
        Returns the micro-batch's ``total()`` counts summed over the processes (the same on every process)."""
        device = batch.input_ids.device
        zero = torch.zeros((), device=device)
        entries = list(metrics.items())
        totals = metrics.totals()
        pairs = [(zero, zero) if value is None else (value, zero) if name in totals else value
                 for name, value in entries]
        sums = torch.stack([torch.as_tensor(x).float().to(device) for pair in pairs for x in pair]
                           + [torch.tensor(float(batch.input_ids.numel()), device=device),
                              torch.tensor(float(int(batch.cu_seqlens[-1])), device=device)])
        if self.reduce is not None:
            sums = self.reduce(sums)
        values = sums.tolist()
        self._totals |= totals
        for i, (name, value) in enumerate(entries):
            self._sums[mode][name][0] += values[2 * i]
            self._sums[mode][name][1] += values[2 * i + 1]
            if value is not None:
                self._present[mode].add(name)
        self._tokens[mode][0] += values[-2]
        self._tokens[mode][1] += values[-1]
        return {name: values[2 * i] for i, (name, _) in enumerate(entries) if name in totals}

    def pop(self, mode: str) -> dict[str, float]:
        """The window's means (NaN for a metric whose values were all left out; metrics that do not apply left
        out) and its non-zero totals, then a new window."""
        sums = self._sums[mode]
        if not sums:
            return {}
        logs = {}
        for key, (total, count) in sums.items():
            if key in self._totals:
                if total:
                    logs[key] = total
            elif key in self._present[mode]:
                logs[key] = total / count if count else math.nan
        processed, real = self._tokens[mode]
        if mode == "train" and processed:
            now = time.perf_counter()
            logs["tokens_per_second"] = processed / (now - self._last_log_time)
            logs["packing_efficiency"] = real / processed
            self._last_log_time = now
        sums.clear()
        self._present[mode].clear()
        self._tokens[mode] = [0.0, 0.0]
        return logs
