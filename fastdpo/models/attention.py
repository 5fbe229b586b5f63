"""``packed_sdpa``: attention for packed streams on devices without a varlen kernel (CPUs, GPUs without
flash-attention), registered with transformers' attention and mask interfaces.

transformers' ``sdpa`` attends a packed stream through a block-diagonal causal ``[T, T]`` mask: time and
memory grow with the square of the packed length T (a 32k-token micro-batch computes 1e9 scores per head
and layer, nearly all of them masked). ``packed_sdpa`` instead splits the stream where ``position_ids``
restart and runs ``torch.nn.functional.scaled_dot_product_attention`` causally on each sequence: time
grows with Σ len², memory with T, and no mask is built. Any call that carries a padding mask or a KV
cache (generation) is handed to transformers' own ``sdpa`` unchanged.
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
                          **kwargs) -> tuple[torch.Tensor, None]:
    """Causal attention within each packed sequence.

    Args:
        query: [B, H, T, D]; key, value: [B, H_kv, T, D] (grouped-query heads are shared, as ``sdpa``).
        attention_mask: None for a packed stream (``packed_sdpa_mask`` builds none); anything else, or keys
            longer than the queries (a KV cache), goes to transformers' ``sdpa_attention_forward``.
        position_ids: [B, T] positions restarting at 0 at each sequence (``fastdpo.packing.pack_pairs``);
            without them each row is one sequence.
        sliding_window: the layer's window (Mistral, Gemma-2 local layers), applied within each sequence.

    Returns:
        ([B, T, H, D] attention output, None), the layout of transformers' attention functions.
    """
    if attention_mask is not None or key.shape[2] != query.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      sliding_window=sliding_window, **kwargs)
    batch, _, length, _ = query.shape
    if position_ids is None:
        position_ids = torch.arange(length, device=query.device).expand(batch, length)
    gqa = query.shape[1] != key.shape[1]
    rows = []
    for b in range(batch):
        bounds = sequence_starts(position_ids[b])
        rows.append(torch.cat([
            F.scaled_dot_product_attention(query[b:b + 1, :, s:e], key[b:b + 1, :, s:e], value[b:b + 1, :, s:e],
                                           dropout_p=dropout, scale=scaling, enable_gqa=gqa,
                                           **_causal(e - s, sliding_window, query.device))
            for s, e in zip(bounds[:-1], bounds[1:])
        ], dim=2))
    return torch.cat(rows).transpose(1, 2).contiguous(), None


def _causal(length: int, window: int | None, device: torch.device) -> dict:
    """sdpa's causal arguments for one sequence; with a sliding window shorter than it, the band mask of
    transformers' ``sliding_window_overlay`` (key within ``window - 1`` positions before the query)."""
    if window is None or length <= window:
        return {"is_causal": True}
    offset = torch.arange(length, device=device)[:, None] - torch.arange(length, device=device)
    return {"attn_mask": (offset >= 0) & (offset < window)}


def packed_sdpa_mask(*args, attention_mask: torch.Tensor | None = None, q_length: int | None = None,
                     kv_length: int | None = None, **kwargs) -> torch.Tensor | None:
    """No mask for an unpadded stream without a cache (``packed_sdpa_attention`` splits it by position ids);
    transformers' ``sdpa_mask`` for everything else."""
    if attention_mask is None and q_length is not None and q_length == kv_length:
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, q_length=q_length, kv_length=kv_length, **kwargs)


AttentionInterface.register(NAME, packed_sdpa_attention)
AttentionMaskInterface.register(NAME, packed_sdpa_mask)
