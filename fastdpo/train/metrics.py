"""A logging window of metric sums and counts, reduced over processes, divided when the Trainer logs."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable

import torch

from ..data import PackedBatch

MODES = ("train", "eval")


class MetricWindow:
    """Means over pairs (``per_pair``: [B] values) or over tokens (``per_token``: (sum, token count)) since the
    last log, and in training ``tokens_per_second`` and ``packing_efficiency`` (real / processed tokens).

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

    def add(self, mode: str, batch: PackedBatch, per_pair: dict[str, torch.Tensor],
            per_token: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Adds one micro-batch; every process must add the same keys (one collective for all of them)."""
        device = batch.input_ids.device
        pairs = torch.tensor(float(batch.num_pairs), device=device)
        entries = {k: (v.float().sum(), pairs) for k, v in per_pair.items()}
        entries.update({k: (total.float().to(device), count.float().to(device)) for k, (total, count) in
                        per_token.items()})
        tokens = [torch.tensor(float(batch.input_ids.numel()), device=device),
                  torch.tensor(float(int(batch.cu_seqlens[-1])), device=device)]
        sums = torch.stack([x for pair in entries.values() for x in pair] + tokens)
        if self.reduce is not None:
            sums = self.reduce(sums)
        values = sums.tolist()
        for i, key in enumerate(entries):
            self._sums[mode][key][0] += values[2 * i]
            self._sums[mode][key][1] += values[2 * i + 1]
        self._tokens[mode][0] += values[-2]
        self._tokens[mode][1] += values[-1]

    def add_total(self, mode: str, key: str, value: float) -> None:
        """A metric logged as a total over the window (e.g. ``skipped_pairs``), not a mean."""
        self._sums[mode][key][0] += value
        self._sums[mode][key][1] = 1.0

    def pop(self, mode: str, *, skip: tuple[str, ...] = ()) -> dict[str, float]:
        """The window's means, then a new window."""
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
