"""Padding-free micro-batches: tokenised pairs -> one flat token stream under a token budget.

Two layouts, a pair never splitting across micro-batches and no pad token in either:

- unshared: ``[prompt + chosen][prompt + rejected]``, positions restarting at 0 per sequence;
- shared prefix (Wang & Hegde 2024, arXiv 2410.20305): ``[prompt][chosen][rejected]``, the prompt once.
  Positions run 0 … P+C−1 over prompt + chosen and P … P+R−1 over rejected, so RoPE sees each
  completion as in ``prompt + completion``. The position ids alone carry the layout: a drop to 0 starts
  a new document, a drop to p > 0 starts a branch that attends to its document's first p tokens (the
  prompt) and to itself, never to chosen. ``SegmentLayout`` spells that out for the attention kernels.

Only the positions that predict a completion token are sent to the LM head.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import torch
from torch.utils.data import Sampler

REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")


def pair_length(row: dict, prefix_sharing: bool = False) -> int:
    """Tokens a pair occupies in a packed stream: P + C + R with ``prefix_sharing``, else 2P + C + R."""
    prompts = 1 if prefix_sharing else 2
    return prompts * len(row["prompt_input_ids"]) + len(row["chosen_input_ids"]) + len(row["rejected_input_ids"])


@dataclass(frozen=True)
class SegmentLayout:
    """The keys of each segment of a shared-prefix stream, in flash-attention's varlen terms: S = 2B segments
    (``prompt + chosen``, then ``rejected``), queries in stream order, keys gathered by ``kv_index`` (a root
    segment's own tokens; a branch's prompt, then its own tokens), causal aligned bottom-right.

    Attributes:
        cu_seqlens_q: [S + 1] int32 query boundaries in the stream. cu_seqlens_k: [S + 1] int32 boundaries in
            ``kv_index``. kv_index: [K] int64 stream positions of every segment's keys. max_seqlen_q,
            max_seqlen_k: the longest segment's query and key counts (host ints: kernels size grids with them).
    """

    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor
    kv_index: torch.Tensor
    max_seqlen_q: int
    max_seqlen_k: int

    def to(self, device, non_blocking: bool = False) -> SegmentLayout:
        return replace(self, **{f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
                                for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor)})


@dataclass(frozen=True)
class PackedBatch:
    """One packed micro-batch of B pairs in 2B segments: ``prompt + chosen`` then ``prompt + rejected`` per pair
    (unshared), or ``prompt + chosen`` then ``rejected`` (shared prefix, ``segments`` set).

    Attributes:
        input_ids: [1, T] int64, the token stream. position_ids: [1, T] int64 (the module docstring's layouts).
        cu_seqlens: [2B + 1] int32 segment boundaries in the stream (chosen_0, rejected_0, chosen_1, ...); a
            chosen segment is its whole ``prompt + chosen`` sequence in both layouts.
        logit_index: [N] int64 stream positions whose next token is a completion token (shared: the last prompt
            position twice, for both first completion tokens); targets: [N] int64, those tokens;
            label_cu_seqlens: [2B + 1] int32, each completion's span in ``targets``.
        pair_index: [B] int64 dataset row of each pair (to name a failing pair), or None.
        ref_chosen_logps, ref_rejected_logps: [B] float32 precomputed reference log-probs, or None.
        segments: the ``SegmentLayout`` of a shared-prefix stream, or None (unshared).
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
    segments: SegmentLayout | None = None

    @property
    def num_pairs(self) -> int:
        return (self.cu_seqlens.numel() - 1) // 2

    @property
    def ref_logps(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The precomputed (chosen, rejected) reference log-probs, or None."""
        return None if self.ref_chosen_logps is None else (self.ref_chosen_logps, self.ref_rejected_logps)

    def to(self, device, non_blocking: bool = False) -> PackedBatch:
        """The batch on ``device`` (accelerate's ``send_to_device`` and the trainers call this)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return replace(self, **{k: v.to(device, non_blocking=non_blocking) for k, v in values.items()
                                if isinstance(v, (torch.Tensor, SegmentLayout))})

    # transformers.Trainer counts input tokens and FLOPs by reading batch["input_ids"]; nothing else is a key.
    def __contains__(self, key: str) -> bool:
        return key in _MODEL_INPUTS

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in _MODEL_INPUTS:
            raise KeyError(key)
        return getattr(self, key)


_MODEL_INPUTS = ("input_ids", "position_ids")


def pack_pairs(rows: list[dict], *, prefix_sharing: bool = False) -> PackedBatch:
    """Collate tokenised pairs into one packed micro-batch.

    Args:
        rows: dicts with ``prompt_input_ids``, ``chosen_input_ids``, ``rejected_input_ids`` (non-empty lists of
            int) and optionally ``pair_index`` and ``ref_chosen_logps`` / ``ref_rejected_logps`` (taken when every
            row has them).
        prefix_sharing: the shared-prefix layout (the prompt once), else the unshared one.

    Returns:
        a ``PackedBatch``.

    Raises:
        ValueError: an empty prompt or completion (named by its pair): the first completion token is predicted
            from the last prompt position, and an empty segment has nothing to attend.
    """
    input_ids, position_ids, logit_index, targets = [], [], [], []
    cu_seqlens, label_cu_seqlens, cu_seqlens_k, kv_index = [0], [0], [0], []
    for i, row in enumerate(rows):
        prompt, chosen, rejected = row["prompt_input_ids"], row["chosen_input_ids"], row["rejected_input_ids"]
        empty = [name for name, ids in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)) if not ids]
        if empty:
            raise ValueError(f"pair {row.get('pair_index', i)}: empty {' and '.join(empty)} token list; every pair "
                             "needs a prompt and two completions of at least one token (tokenize_pairs ensures it)")
        start, p = len(input_ids), len(prompt)
        # position t predicts token t + 1: the last prompt token predicts the first completion token
        if prefix_sharing:
            input_ids += prompt + chosen + rejected
            position_ids += [*range(p + len(chosen)), *range(p, p + len(rejected))]
            branch = start + p + len(chosen)
            logit_index += [*range(start + p - 1, branch - 1), start + p - 1, *range(branch, branch + len(rejected) - 1)]
            cu_seqlens += [branch, branch + len(rejected)]
            kv_index += [*range(start, branch), *range(start, start + p), *range(branch, branch + len(rejected))]
            cu_seqlens_k += [cu_seqlens_k[-1] + p + len(chosen), cu_seqlens_k[-1] + 2 * p + len(chosen) + len(rejected)]
        else:
            for completion in (chosen, rejected):
                begin = len(input_ids)
                input_ids += prompt + completion
                position_ids += range(p + len(completion))
                logit_index += range(begin + p - 1, begin + p + len(completion) - 1)
                cu_seqlens.append(begin + p + len(completion))
        targets += chosen + rejected
        label_cu_seqlens += [label_cu_seqlens[-1] + len(chosen), label_cu_seqlens[-1] + len(chosen) + len(rejected)]
    optional = {}
    if rows and all("pair_index" in row for row in rows):
        optional["pair_index"] = torch.tensor([row["pair_index"] for row in rows], dtype=torch.long)
    if rows and all(col in row for row in rows for col in REF_COLUMNS):
        for col in REF_COLUMNS:
            optional[col] = torch.tensor([row[col] for row in rows], dtype=torch.float32)
    cu = torch.tensor(cu_seqlens, dtype=torch.int32)
    if prefix_sharing and rows:
        cu_k = torch.tensor(cu_seqlens_k, dtype=torch.int32)
        optional["segments"] = SegmentLayout(
            cu_seqlens_q=cu, cu_seqlens_k=cu_k, kv_index=torch.tensor(kv_index, dtype=torch.long),
            max_seqlen_q=int(cu.diff().max()), max_seqlen_k=int(cu_k.diff().max()))
    return PackedBatch(
        input_ids=torch.tensor([input_ids], dtype=torch.long),
        position_ids=torch.tensor([position_ids], dtype=torch.long),
        cu_seqlens=cu,
        logit_index=torch.tensor(logit_index, dtype=torch.long),
        targets=torch.tensor(targets, dtype=torch.long),
        label_cu_seqlens=torch.tensor(label_cu_seqlens, dtype=torch.int32),
        **optional,
    )


class IndexedRows(torch.utils.data.Dataset):
    """A tokenised dataset whose rows also carry their index (``pair_index``), so that a failing row
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
                f"pair {i}, needs {n} tokens (pair_length: its prompt, once with prefix sharing or else twice, and both "
                "completions). Raise the budget or lower max_length."
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
