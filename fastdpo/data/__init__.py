"""Layer 2, data: load preference rows (local files, Hub names), find their prompts, tokenise them and pack them into
padding-free micro-batches (``PackedBatch``). Imports torch, datasets and ``fastdpo.ops`` only, never transformers."""

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
