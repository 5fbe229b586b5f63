"""Padding-free micro-batches: tokenised pairs -> one flat token stream under a token budget.

Each pair contributes two sequences, ``prompt + chosen`` then ``prompt + rejected``, back to back;
a pair never splits across micro-batches and no pad token exists. Only the positions that predict a
completion token are sent to the LM head.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import torch
from torch.utils.data import Sampler

REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")


def pair_length(row: dict) -> int:
    """Tokens a pair occupies in a packed stream: its prompt twice plus both completions."""
    return 2 * len(row["prompt_input_ids"]) + len(row["chosen_input_ids"]) + len(row["rejected_input_ids"])


@dataclass(frozen=True)
class PackedBatch:
    """One packed micro-batch of B pairs: 2B sequences, ``prompt + chosen`` then ``prompt + rejected`` per pair.

    Attributes:
        input_ids: [1, T] int64, the token stream. position_ids: [1, T] int64, restarting at 0 per sequence.
        cu_seqlens: [2B + 1] int32 sequence boundaries in the stream (chosen_0, rejected_0, chosen_1, ...).
        logit_index: [N] int64 stream positions whose next token is a completion token; targets: [N] int64,
            those tokens; label_cu_seqlens: [2B + 1] int32, each sequence's span in ``targets``.
        pair_index: [B] int64 dataset row of each pair (to name a failing pair), or None.
        ref_chosen_logps, ref_rejected_logps: [B] float32 precomputed reference log-probs, or None.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    logit_index: torch.Tensor
    targets: torch.Tensor
    label_cu_seqlens: torch.Tensor
    pair_index: torch.Tensor | None = None
    ref_chosen_logps: torch.Tensor | None = None
    ref_rejected_logps: torch.Tensor | None = None

    @property
    def num_pairs(self) -> int:
        return (self.cu_seqlens.numel() - 1) // 2

    @property
    def ref_logps(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The precomputed (chosen, rejected) reference log-probs, or None."""
        return None if self.ref_chosen_logps is None else (self.ref_chosen_logps, self.ref_rejected_logps)

    def to(self, device, non_blocking: bool = False) -> PackedBatch:
        """The batch on ``device`` (accelerate's ``send_to_device`` and the trainers call this)."""
        tensors = {f.name: getattr(self, f.name) for f in fields(self)}
        return replace(self, **{k: v.to(device, non_blocking=non_blocking) for k, v in tensors.items()
                                if isinstance(v, torch.Tensor)})

    # transformers.Trainer counts input tokens and FLOPs by reading batch["input_ids"]; nothing else is a key.
    def __contains__(self, key: str) -> bool:
        return key in _MODEL_INPUTS

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in _MODEL_INPUTS:
            raise KeyError(key)
        return getattr(self, key)


_MODEL_INPUTS = ("input_ids", "position_ids")


def pack_pairs(rows: list[dict]) -> PackedBatch:
    """Collate tokenised pairs into one packed micro-batch.

    Args:
        rows: dicts with ``prompt_input_ids``, ``chosen_input_ids``, ``rejected_input_ids`` (lists of
            int, completions non-empty) and optionally ``pair_index`` and ``ref_chosen_logps`` /
            ``ref_rejected_logps`` (taken when every row has them).

    Returns:
        a ``PackedBatch``.
    """
    input_ids, position_ids, logit_index, targets = [], [], [], []
    cu_seqlens, label_cu_seqlens = [0], [0]
    for row in rows:
        prompt = row["prompt_input_ids"]
        for completion in (row["chosen_input_ids"], row["rejected_input_ids"]):
            start = cu_seqlens[-1]
            seq = prompt + completion
            input_ids += seq
            position_ids += range(len(seq))
            # position t predicts token t + 1: the last prompt token predicts the first completion token
            logit_index += range(start + len(prompt) - 1, start + len(seq) - 1)
            targets += completion
            cu_seqlens.append(start + len(seq))
            label_cu_seqlens.append(label_cu_seqlens[-1] + len(completion))
    optional = {}
    if rows and all("pair_index" in row for row in rows):
        optional["pair_index"] = torch.tensor([row["pair_index"] for row in rows], dtype=torch.long)
    if rows and all(col in row for row in rows for col in REF_COLUMNS):
        for col in REF_COLUMNS:
            optional[col] = torch.tensor([row[col] for row in rows], dtype=torch.float32)
    return PackedBatch(
        input_ids=torch.tensor([input_ids], dtype=torch.long),
        position_ids=torch.tensor([position_ids], dtype=torch.long),
        cu_seqlens=torch.tensor(cu_seqlens, dtype=torch.int32),
        logit_index=torch.tensor(logit_index, dtype=torch.long),
        targets=torch.tensor(targets, dtype=torch.long),
        label_cu_seqlens=torch.tensor(label_cu_seqlens, dtype=torch.int32),
        **optional,
    )


class IndexedPairs(torch.utils.data.Dataset):
    """A tokenised dataset whose rows also carry their index (``pair_index``), so that a failing pair
    can be named."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        return {**self.dataset[index], "pair_index": index}


class TokenBudgetBatchSampler(Sampler[list[int]]):
    """Groups pair indices into micro-batches of at most ``max_tokens`` packed tokens.

    Batches are formed once, greedily, over a seeded permutation of the pairs (or in order when
    ``shuffle`` is False), so their number is fixed; each epoch then visits them in a new seeded
    order (``set_epoch``, as the Trainer calls it).

    Raises:
        ValueError: a pair longer than ``max_tokens`` (named by index), or no pairs.
    """

    def __init__(self, lengths: list[int], max_tokens: int, *, shuffle: bool = True, seed: int = 0):
        if not lengths:
            raise ValueError("no pairs to batch")
        too_long = [(i, n) for i, n in enumerate(lengths) if n > max_tokens]
        if too_long:
            i, n = max(too_long, key=lambda x: x[1])
            raise ValueError(
                f"max_tokens_per_batch={max_tokens} is smaller than {len(too_long)} pair(s); the longest, "
                f"pair {i}, needs {n} tokens (prompt twice + both completions). Raise the budget or lower max_length."
            )
        self.shuffle, self.seed, self.epoch = shuffle, seed, 0
        order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(seed)).tolist() if shuffle \
            else range(len(lengths))
        self.batches: list[list[int]] = []
        used = math.inf
        for i in order:
            if used + lengths[i] > max_tokens:
                self.batches.append([])
                used = 0
            self.batches[-1].append(i)
            used += lengths[i]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        if not self.shuffle:
            return iter(self.batches)
        g = torch.Generator().manual_seed(self.seed + 1 + self.epoch)
        return iter([self.batches[i] for i in torch.randperm(len(self.batches), generator=g).tolist()])

    def __len__(self) -> int:
        return len(self.batches)
