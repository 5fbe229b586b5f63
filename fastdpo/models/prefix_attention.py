"""Attention for shared-prefix streams (``fastdpo.data.packing``'s ``[prompt][chosen][rejected]`` layout) on every
attention implementation, or a clear refusal.

transformers derives a document mask from position-id discontinuities (``find_packed_sequence_indices``), which
would cut each rejected completion off from its prompt. So ``attention_inputs`` gives the model what the layout
needs instead, by implementation:

- ``packed_sdpa`` (``fastdpo.models.attention``) and ``flash_attention_2``: the ``SegmentLayout`` as the
  ``prefix_layout`` keyword, which reaches every attention call; both attend each segment's queries to its gathered
  keys (prompt + rejected for a branch), causal aligned bottom-right: memory linear in the stream length.
  ``flash_attention_2`` is registered over transformers' own function here, which it calls unchanged whenever no
  ``prefix_layout`` is given.
- ``sdpa``, ``eager``, ``flex_attention``: explicit masks from ``prefix_mask_function``, built by transformers' own
  mask interface (a [T, T] mask for sdpa/eager: correct but quadratic; a ``BlockMask`` for flex), one per layer
  type the model declares (``full_attention``, ``sliding_attention``), passed as the model's ``attention_mask``.
- anything else raises ``ValueError`` naming the implementation and ``prefix_sharing``.

Sliding windows apply by position within each virtual sequence (``prompt + completion``), as transformers'
``sliding_window_overlay`` applies them by position within a packed sequence.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import AttentionInterface
from transformers.integrations.flash_attention import flash_attention_forward, get_target_dtype
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

from ..data.packing import SegmentLayout
from .attention import NAME as PACKED_SDPA

LAYOUT_KWARG = "prefix_layout"
KERNEL_PATHS = (PACKED_SDPA, "flash_attention_2")
MASK_PATHS = ("sdpa", "eager", "flex_attention")
LAYER_TYPES = ("full_attention", "sliding_attention")


def unsupported_reason(config) -> str | None:
    """Why a model with this config cannot run the shared-prefix layout, or None when it can."""
    implementation = config._attn_implementation
    if implementation not in KERNEL_PATHS + MASK_PATHS:
        return (f"attention implementation {implementation!r} has no shared-prefix path (fastdpo handles "
                f"{', '.join(KERNEL_PATHS + MASK_PATHS)})")
    unknown = sorted(set(getattr(config, "layer_types", None) or ()) - set(LAYER_TYPES))
    if unknown or getattr(config, "attention_chunk_size", None):
        return f"layer types {unknown or ['chunked_attention']} have no shared-prefix mask"
    return None


def attention_inputs(config, position_ids: torch.Tensor, layout: SegmentLayout, dtype: torch.dtype) -> dict:
    """The keyword arguments that make a model's forward attend a shared-prefix stream correctly.

    Args:
        config: the causal LM's (text) config; ``config._attn_implementation`` picks the path (module docstring).
        position_ids: [1, T] int64 shared-prefix positions; layout: their ``SegmentLayout``.
        dtype: the model's activation dtype (eager's additive mask uses its minimum).

    Returns:
        ``{"prefix_layout": layout}`` or ``{"attention_mask": mask or {layer type: mask}}``.

    Raises:
        ValueError: an implementation or layer type without a shared-prefix path (``unsupported_reason``).
    """
    reason = unsupported_reason(config)
    if reason is not None:
        raise ValueError(f"{reason}. Load the model with attn_implementation='packed_sdpa' (CPU), "
                         "'flash_attention_2' or 'flex_attention' (CUDA), 'sdpa' or 'eager', or set "
                         "prefix_sharing=False (--prefix-sharing false) for the unshared layout.")
    if config._attn_implementation in KERNEL_PATHS:
        return {LAYOUT_KWARG: layout}
    declared = getattr(config, "layer_types", None)
    if declared is None:   # Mistral-style: one window (or none) for every layer
        declared = ["sliding_attention" if getattr(config, "sliding_window", None) else "full_attention"]
    build = ALL_MASK_ATTENTION_FUNCTIONS[config._attn_implementation]
    length = position_ids.shape[-1]
    masks = {kind: build(batch_size=1, q_length=length, kv_length=length, allow_is_causal_skip=False, dtype=dtype,
                         device=position_ids.device, config=config, use_vmap=False,
                         mask_function=prefix_mask_function(position_ids,
                                                            config.sliding_window if kind == LAYER_TYPES[1] else None))
             for kind in dict.fromkeys(declared)}
    # models with several layer types read a {layer type: mask} mapping; the others take one 4-D mask as it is
    return {"attention_mask": masks if len(masks) > 1 else next(iter(masks.values()))}


def prefix_mask_function(position_ids: torch.Tensor, window: int | None = None) -> Callable:
    """transformers' index-based mask function ``(batch, head, q, kv) -> bool`` for a packed stream with shared
    prefixes, read from the position ids alone: key kv is visible to query q when both are in the same segment (a
    run of consecutive positions), or kv is in q's document's root segment at a position before q's branch point,
    and ``0 <= pos[q] - pos[kv] < window`` (no window: ``pos[kv] <= pos[q]``).

    Args:
        position_ids: [B, T] int64; a drop to 0 starts a document, a drop to p > 0 a branch off its first p tokens.
        window: a sliding window in positions, or None.
    """
    pos = position_ids
    first = torch.ones_like(pos[:, :1], dtype=torch.bool)
    starts = torch.cat([first, pos[:, 1:] != pos[:, :-1] + 1], dim=1)
    segment = starts.cumsum(1)
    index = torch.arange(pos.shape[1], device=pos.device).expand_as(pos)
    segment_start = torch.where(starts, index, 0).cummax(1).values
    branch = pos.gather(1, segment_start)        # 0 in a root segment: nothing before it to share
    document = starts & (pos == 0)
    document[:, 0] = True                        # a stream's first segment is a root whatever its position
    root = torch.where(document, segment, 0).cummax(1).values

    def mask(batch_idx, head_idx, q_idx, kv_idx):
        q_pos, kv_pos = pos[batch_idx, q_idx], pos[batch_idx, kv_idx]
        kv_segment = segment[batch_idx, kv_idx]
        visible = (kv_segment == segment[batch_idx, q_idx]) | (
            (kv_segment == root[batch_idx, q_idx]) & (kv_pos < branch[batch_idx, q_idx]))
        visible = visible & (kv_pos <= q_pos)
        return visible if window is None else visible & (q_pos - kv_pos < window)

    return mask


def flash_prefix_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                           sliding_window: int | None = None, softcap: float | None = None,
                           prefix_layout: SegmentLayout | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """``flash_attention_2`` for a shared-prefix stream: ``flash_attn_varlen_func`` over the segments, queries in
    stream order against keys gathered by ``prefix_layout.kv_index``, causal aligned bottom-right (flash-attn >= 2.1),
    the window as ``(window - 1, 0)``. Without ``prefix_layout``, or for a module that is not causal (a vision
    encoder's, which the layout reaches through its model's keyword arguments), transformers' ``flash_attention_forward``.

    Args:
        query: [1, H, T, D]; key, value: [1, H_kv, T, D] (grouped-query heads as flash-attn shares them).

    Returns:
        ([1, T, H, D] in ``query``'s dtype, None).
    """
    if prefix_layout is None or not getattr(module, "is_causal", True):   # a vision encoder's attends its image
        return flash_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                       sliding_window=sliding_window, softcap=softcap, **kwargs)
    from flash_attn import flash_attn_varlen_func

    if query.shape[0] != 1:
        raise ValueError(f"a shared-prefix stream is one packed row; got a batch of {query.shape[0]}")
    target = get_target_dtype(query, module) or query.dtype   # flash-attn runs fp16/bf16 only
    q = query[0].transpose(0, 1).to(target)
    k = key[0].transpose(0, 1).index_select(0, prefix_layout.kv_index).to(target)
    v = value[0].transpose(0, 1).index_select(0, prefix_layout.kv_index).to(target)
    out = flash_attn_varlen_func(
        q, k, v, prefix_layout.cu_seqlens_q, prefix_layout.cu_seqlens_k, prefix_layout.max_seqlen_q,
        prefix_layout.max_seqlen_k, dropout_p=dropout, softmax_scale=scaling, causal=True,
        window_size=(sliding_window - 1, 0) if sliding_window else (-1, -1), softcap=softcap or 0.0)
    return out.unsqueeze(0).to(query.dtype), None


AttentionInterface.register("flash_attention_2", flash_prefix_attention)
