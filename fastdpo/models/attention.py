"""``packed_sdpa``: attention for packed streams on devices without a varlen kernel (CPUs, GPUs without
flash-attention), registered with transformers' attention and mask interfaces.

transformers' ``sdpa`` attends a packed stream through a block-diagonal causal ``[T, T]`` mask: time and
memory grow with the square of the packed length T (a 32k-token micro-batch computes 1e9 scores per head
and layer, nearly all of them masked). ``packed_sdpa`` instead splits the stream where ``position_ids``
restart and runs ``torch.nn.functional.scaled_dot_product_attention`` causally on each sequence: time
grows with Σ len², memory with T, and no mask is built. A shared-prefix stream (``prefix_layout``,
``fastdpo.models.prefix_attention``) attends each rejected completion's queries to its prompt's and its own keys.
Any call that carries a padding mask or a KV cache (generation) is handed to transformers' own ``sdpa`` unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "packed_sdpa"


def sequence_starts(position_ids: torch.Tensor) -> list[int]:
    """Offsets where a sequence of a packed row starts ([T] position ids restarting at 0; the row's first
    token always starts one), and T at the end."""
    starts = (position_ids == 0).nonzero().flatten().tolist()
    if not starts or starts[0] != 0:
        starts = [0, *starts]
    return [*starts, position_ids.numel()]


def packed_sdpa_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                          position_ids: torch.Tensor | None = None, sliding_window: int | None = None,
                          softcap: float | None = None, prefix_layout=None, **kwargs) -> tuple[torch.Tensor, None]:
    """Causal attention within each packed sequence, or within each virtual sequence of a shared-prefix stream.

    Args:
        query: [B, H, T, D]; key, value: [B, H_kv, T, D] (grouped-query heads are shared, as ``sdpa``).
        attention_mask: None for a packed stream (``packed_sdpa_mask`` builds none); anything else, keys longer
            than the queries (a KV cache), or a module that is not causal (a vision encoder's, which attends its own
            image) goes to transformers' ``sdpa_attention_forward``.
        position_ids: [B, T] positions restarting at 0 at each sequence (``fastdpo.data.pack_pairs``);
            without them each row is one sequence.
        sliding_window: the layer's window (Mistral, Gemma-2 local layers), by position within each sequence.
        softcap: Gemma-2's attention logit soft-capping ``softcap · tanh(s / softcap)`` (then explicit attention
            per sequence, as transformers' eager; sdpa has no soft-capping).
        prefix_layout: a shared-prefix stream's ``fastdpo.data.packing.SegmentLayout`` (B = 1): each segment's
            queries attend its gathered keys (a rejected segment: its prompt, then itself), causal bottom-right.

    Returns:
        ([B, T, H, D] attention output, None), the layout of transformers' attention functions.

    Raises:
        ValueError: attention sinks or a position bias (no packed path for them), or a ``prefix_layout`` with B > 1.
    """
    if attention_mask is not None or key.shape[2] != query.shape[2] or not getattr(module, "is_causal", True):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      sliding_window=sliding_window, softcap=softcap, **kwargs)
    unsupported = [name for name in ("s_aux", "position_bias") if kwargs.get(name) is not None]
    if unsupported:
        raise ValueError(f"packed_sdpa has no path for {unsupported[0]}: load this model with "
                         "attn_implementation='eager' or 'flex_attention'")
    batch, _, length, _ = query.shape
    if prefix_layout is not None and batch != 1:
        raise ValueError(f"a shared-prefix stream is one packed row; got a batch of {batch}")
    if position_ids is None:
        position_ids = torch.arange(length, device=query.device).expand(batch, length)
    attend = dict(dropout=dropout, scale=scaling, window=sliding_window, softcap=softcap)
    rows = []
    for b in range(batch):
        q, k, v = query[b:b + 1], key[b:b + 1], value[b:b + 1]
        rows.append(torch.cat([_attend(q[:, :, s:e], k[:, :, keys], v[:, :, keys], **attend)
                               for s, e, keys in _segments(position_ids[b], prefix_layout)], dim=2))
    return torch.cat(rows).transpose(1, 2).contiguous(), None


def _segments(position_ids: torch.Tensor, layout) -> list[tuple[int, int, slice | torch.Tensor]]:
    """(query start, query end, its keys: a slice of the stream or stream indices) per sequence or segment."""
    if layout is None:
        bounds = sequence_starts(position_ids)
        return [(s, e, slice(s, e)) for s, e in zip(bounds[:-1], bounds[1:])]
    cu_q, cu_k = layout.cu_seqlens_q.tolist(), layout.cu_seqlens_k.tolist()
    # a root segment's keys are its own queries; a branch's are its prompt's and its own, gathered
    return [(s, e, slice(s, e) if ke - ks == e - s else layout.kv_index[ks:ke])
            for s, e, ks, ke in zip(cu_q[:-1], cu_q[1:], cu_k[:-1], cu_k[1:])]


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, dropout: float, scale: float | None,
            window: int | None, softcap: float | None) -> torch.Tensor:
    """Attention of one sequence's queries [1, H, q, D] to its keys [1, H_kv, k, D], the last query aligned with the
    last key (bottom-right causal), keys within ``window - 1`` positions before the query (transformers'
    ``sliding_window_overlay``)."""
    q_len, k_len = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if softcap is None and q_len == k_len and (window is None or q_len <= window):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scale, is_causal=True, enable_gqa=gqa)
    offset = (torch.arange(q_len, device=q.device) + (k_len - q_len))[:, None] - torch.arange(k_len, device=q.device)
    allowed = (offset >= 0) if window is None else (offset >= 0) & (offset < window)
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout, scale=scale,
                                              enable_gqa=gqa)
    if gqa:
        k, v = (x.repeat_interleave(q.shape[1] // x.shape[1], dim=1) for x in (k, v))
    scores = torch.matmul(q, k.transpose(2, 3)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    scores = (softcap * torch.tanh(scores / softcap)).masked_fill(~allowed, float("-inf"))
    # fp32 softmax, as transformers' eager attention
    weights = F.dropout(torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), p=dropout)
    return torch.matmul(weights, v)


def packed_sdpa_mask(*args, attention_mask: torch.Tensor | None = None, q_length: int | None = None,
                     kv_length: int | None = None, **kwargs) -> torch.Tensor | None:
    """No mask for an unpadded stream without a cache (``packed_sdpa_attention`` splits it by position ids);
    transformers' ``sdpa_mask`` for everything else."""
    if attention_mask is None and q_length is not None and q_length == kv_length:
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, q_length=q_length, kv_length=kv_length, **kwargs)


AttentionInterface.register(NAME, packed_sdpa_attention)
AttentionMaskInterface.register(NAME, packed_sdpa_mask)
