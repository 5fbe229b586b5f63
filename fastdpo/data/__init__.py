"""Layer 3, data: load rows (local files, Hub names), find the prompts of preference rows, tokenise them and pack them
into padding-free micro-batches (``pack``: a ``Grouping`` per kind of row, segments in a ``PackedBatch``). Imports torch
and datasets only: no other fastdpo layer, never transformers."""

from .formats import extract_prompt
from .loading import load_rows
from .packing import (
    Grouping,
    PackedBatch,
    PairGrouping,
    Segment,
    SegmentLayout,
    TokenBudgetBatchSampler,
    pack,
    pack_pairs,
    pair_length,
)
from .tokenization import tokenize_pairs, tokenize_prompts

__all__ = ["Grouping", "PackedBatch", "PairGrouping", "Segment", "SegmentLayout", "TokenBudgetBatchSampler",
           "extract_prompt", "load_rows", "pack", "pack_pairs", "pair_length", "tokenize_pairs",
           "tokenize_prompts"]
