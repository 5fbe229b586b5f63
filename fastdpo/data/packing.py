"""Padding-free micro-batches: tokenised rows -> one flat token stream of segments, under a token budget.

A ``Grouping`` says how one row becomes segments (a trainer adds one; ``pack`` does the rest): a segment is a
document of its own, its positions starting at 0, or a branch off the first p tokens of its row's first segment
(a shared prefix), its positions running on from p. The position ids alone carry the layout: a drop to 0 starts a
new document, a drop to p > 0 starts a branch that attends to its document's first p tokens and to itself, never to
the tokens between; ``SegmentLayout`` spells that out for the attention kernels. Only the positions that predict a
scored token are sent to the LM head. No pad token, and a row never splits across micro-batches.

Preference pairs (``PairGrouping``, ``pack_pairs``) have two layouts:

- unshared: ``[prompt + chosen][prompt + rejected]``, two documents;
- shared prefix (Wang & Hegde 2024, arXiv 2410.20305): ``[prompt][chosen][rejected]``, the prompt once: rejected is
  a branch off the prompt, so RoPE sees each completion as in ``prompt + completion``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace

import torch
from torch.utils.data import Sampler

IGNORE_INDEX = -100
REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")


@dataclass(frozen=True)
class Segment:
    """One segment of a row in a packed stream.

    Attributes:
        ids: its token ids (non-empty).
        labels: one per token: the id whose log-prob is scored there, or ``IGNORE_INDEX``. A document's first token
            is never scored (nothing before it predicts it); a branch's first token is predicted from the last
            token of its prefix.
        prefix: 0 for a document of its own; p > 0 for a branch off the first p tokens of the row's first segment.
        images: the images whose placeholder tokens are among ``ids``, in their order (as the row holds them: paths,
            PIL images or ``datasets.Image`` dicts; ``Grouping.pixels`` turns them into model inputs).
    """

    ids: list[int]
    labels: list[int]
    prefix: int = 0
    images: tuple = ()


class Grouping:
    """How a tokenised row becomes ``size`` segments of a packed stream; what a new trainer adds to pack its rows.

    Attributes:
        size: segments per row (2: a DPO pair; 1: an SFT sequence).
        columns: per-row float columns a packed batch carries (``PackedBatch.row_values``) when every row has them.
    """

    size: int = 1
    columns: tuple[str, ...] = ()

    def segments(self, row: dict, index: int) -> list[Segment]:
        """The ``size`` segments of ``row`` (``index``: the row's number, to name it in an error)."""
        raise NotImplementedError

    def length(self, row: dict) -> int:
        """Tokens the row occupies in a packed stream."""
        return sum(len(s.ids) for s in self.segments(row, 0))

    def pixels(self, images: list) -> ImageBatch:
        """The model inputs of a stream's images, in stream order (for a grouping whose segments hold images)."""
        raise NotImplementedError(f"{type(self).__name__} packs no images")


@dataclass(frozen=True)
class ImageBatch:
    """The images of a packed stream, in the order of their placeholder tokens, as the model's image processor makes
    them.

    Attributes:
        pixel_values: float32, per image (LLaVA: [I, C, H, W]) or per patch (Qwen2-VL: [patches, C·T·P·P]).
        image_grid_thw: [I, 3] int64 patch grid (time, height, width) of each image (Qwen2-VL), or None.
    """

    pixel_values: torch.Tensor
    image_grid_thw: torch.Tensor | None = None

    def to(self, device, non_blocking: bool = False) -> ImageBatch:
        return _moved(self, device, non_blocking)


def _moved(batch, device, non_blocking: bool):
    """A dataclass of tensors (and host values) with its tensors on ``device``."""
    return replace(batch, **{f.name: getattr(batch, f.name).to(device, non_blocking=non_blocking)
                             for f in fields(batch) if isinstance(getattr(batch, f.name), torch.Tensor)})


@dataclass(frozen=True)
class SegmentLayout:
    """The keys of each segment of a stream with branches, in flash-attention's varlen terms: queries in stream order,
    keys gathered by ``kv_index`` (a document's own tokens; a branch's prefix, then its own tokens), causal aligned
    bottom-right.

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
        return _moved(self, device, non_blocking)


@dataclass(frozen=True)
class PackedBatch:
    """One packed micro-batch: R rows of ``group_size`` segments each, S = R · group_size segments in one stream.

    Attributes:
        input_ids: [1, T] int64, the token stream. position_ids: [1, T] int64 (the module docstring's layout).
        cu_seqlens: [S + 1] int32 segment boundaries in the stream, row by row (a pair: chosen_0, rejected_0,
            chosen_1, ...); a branch's segment holds only its own tokens.
        logit_index: [N] int64 stream positions whose next token is scored (a position predicting the first token
            of several branches is listed once for each); targets: [N] int64, those tokens;
            label_cu_seqlens: [S + 1] int32, each segment's span in ``targets``.
        group_size: segments per row.
        row_index: [R] int64 dataset index of each row (to name a failing row), or None.
        row_values: {column: [R] float32} the grouping's per-row columns (e.g. precomputed reference log-probs).
        segments: the ``SegmentLayout`` of a stream with branches, or None (documents only).
        images: the segments' images (``Segment.images``) as model inputs, or None (no images).
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    logit_index: torch.Tensor
    targets: torch.Tensor
    label_cu_seqlens: torch.Tensor
    group_size: int = 1
    row_index: torch.Tensor | None = None
    row_values: dict[str, torch.Tensor] = field(default_factory=dict)
    segments: SegmentLayout | None = None
    images: ImageBatch | None = None

    @property
    def num_rows(self) -> int:
        return (self.cu_seqlens.numel() - 1) // self.group_size

    def to(self, device, non_blocking: bool = False) -> PackedBatch:
        """The batch on ``device`` (accelerate's ``send_to_device`` and the trainers call this)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        moved = {k: v.to(device, non_blocking=non_blocking) for k, v in values.items()
                 if isinstance(v, (torch.Tensor, SegmentLayout, ImageBatch))}
        row_values = {k: v.to(device, non_blocking=non_blocking) for k, v in self.row_values.items()}
        return replace(self, **moved, row_values=row_values)

    # transformers.Trainer counts input tokens and FLOPs by reading batch["input_ids"], as do collator wrappers
    # (the step benchmarks); the model inputs are the only keys.
    def __contains__(self, key: str) -> bool:
        return key in _MODEL_INPUTS

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in _MODEL_INPUTS:
            raise KeyError(key)
        return getattr(self, key)


_MODEL_INPUTS = ("input_ids", "position_ids")


def pack(rows: list[dict], grouping: Grouping) -> PackedBatch:
    """Collate tokenised rows into one packed micro-batch, each row as ``grouping`` makes it segments.

    Args:
        rows: dicts the grouping reads, optionally with ``row_index`` (the row's dataset index) and the grouping's
            ``columns``.

    Raises:
        ValueError: the grouping's errors for a malformed row (and its ``pixels``' for an unreadable image).
    """
    input_ids, position_ids, logit_index, targets, kv_index, images = [], [], [], [], [], []
    cu_seqlens, label_cu_seqlens, cu_seqlens_k = [0], [0], [0]
    branched = False
    for i, row in enumerate(rows):
        root = len(input_ids)
        for segment in grouping.segments(row, row.get("row_index", i)):
            start, p = len(input_ids), segment.prefix
            input_ids += segment.ids
            images += segment.images
            position_ids += range(p, p + len(segment.ids))
            keys = [*range(root, root + p), *range(start, start + len(segment.ids))]
            kv_index += keys
            branched |= p > 0
            for t, label in enumerate(segment.labels):
                # position t - 1 predicts token t; a branch's first token is predicted by its prefix's last token
                if label != IGNORE_INDEX and (t > 0 or p > 0):
                    logit_index.append(start + t - 1 if t > 0 else root + p - 1)
                    targets.append(label)
            cu_seqlens.append(len(input_ids))
            cu_seqlens_k.append(cu_seqlens_k[-1] + len(keys))
            label_cu_seqlens.append(len(targets))
    optional = {}
    if rows and all("row_index" in row for row in rows):
        optional["row_index"] = torch.tensor([row["row_index"] for row in rows], dtype=torch.long)
    if images:
        optional["images"] = grouping.pixels(images)
    cu = torch.tensor(cu_seqlens, dtype=torch.int32)
    if branched:
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
        group_size=grouping.size,
        row_values={col: torch.tensor([row[col] for row in rows], dtype=torch.float32) for col in grouping.columns
                    if rows and all(col in row for row in rows)},
        **optional,
    )


def pair_length(row: dict, prefix_sharing: bool = False) -> int:
    """Tokens a pair occupies in a packed stream: P + C + R with ``prefix_sharing``, else 2P + C + R."""
    prompts = 1 if prefix_sharing else 2
    return prompts * len(row["prompt_input_ids"]) + len(row["chosen_input_ids"]) + len(row["rejected_input_ids"])


@dataclass(frozen=True)
class PairGrouping(Grouping):
    """A preference pair as two segments, ``prompt + chosen`` then ``prompt + rejected`` (or, with ``prefix_sharing``,
    ``rejected`` as a branch off the prompt); rows hold ``prompt_input_ids``, ``chosen_input_ids``,
    ``rejected_input_ids`` (non-empty lists of int) and optionally ``REF_COLUMNS``.

    Raises:
        ValueError: an empty prompt or completion (named by its pair): the first completion token is predicted
            from the last prompt position, and an empty segment has nothing to attend.
    """

    prefix_sharing: bool = False
    size: int = 2
    columns: tuple[str, ...] = REF_COLUMNS

    def segments(self, row: dict, index: int) -> list[Segment]:
        prompt, chosen, rejected = row["prompt_input_ids"], row["chosen_input_ids"], row["rejected_input_ids"]
        empty = [name for name, ids in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)) if not ids]
        if empty:
            raise ValueError(f"pair {index}: empty {' and '.join(empty)} token list; every pair needs a prompt and "
                             "two completions of at least one token (tokenize_pairs ensures it)")
        unscored = [IGNORE_INDEX] * len(prompt)
        if self.prefix_sharing:
            return [Segment(prompt + chosen, unscored + chosen), Segment(rejected, rejected, prefix=len(prompt))]
        return [Segment(prompt + chosen, unscored + chosen), Segment(prompt + rejected, unscored + rejected)]

    def length(self, row: dict) -> int:
        return pair_length(row, self.prefix_sharing)


def pack_pairs(rows: list[dict], *, prefix_sharing: bool = False) -> PackedBatch:
    """``pack`` with ``PairGrouping``: B pairs in 2B segments (chosen_0, rejected_0, chosen_1, ...)."""
    return pack(rows, PairGrouping(prefix_sharing))


class IndexedRows(torch.utils.data.Dataset):
    """A tokenised dataset whose rows also carry their index (``row_index``), so that a failing row can be named."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        return {**self.dataset[index], "row_index": index}


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
