"""Layer 3, data: load rows (local files, Hub names), find the prompts of preference rows, tokenise them (pairs, SFT
sequences, unpaired KTO rows with their KL completions) and pack them into padding-free micro-batches (``pack``: a
``Grouping`` per kind of row, segments in a ``PackedBatch``); vision rows (``vision``) are tokenised with a processor
and packed with their images. Imports torch and datasets only: no other fastdpo layer, never transformers."""

from .formats import extract_prompt
from .loading import load_rows
from .packing import (
    Grouping,
    ImageBatch,
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
from .unpaired import GroupBatchSampler, UnpairedGrouping, tokenize_unpaired, unpair_preference_rows
from .vision import VisionPairGrouping, first_row_with_images, images_fingerprint, tokenize_vision_pairs

__all__ = ["GroupBatchSampler", "Grouping", "ImageBatch", "PackedBatch", "PairGrouping", "Segment", "SegmentLayout",
           "TokenBudgetBatchSampler", "UnpairedGrouping", "VisionPairGrouping", "extract_prompt", "first_row_with_images",
           "images_fingerprint", "load_rows", "pack", "pack_pairs", "pair_length", "tokenize_pairs", "tokenize_prompts",
           "tokenize_unpaired", "tokenize_vision_pairs", "unpair_preference_rows"]
