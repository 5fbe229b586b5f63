"""``sequence_logps``: per-sequence sums of packed per-token log-probs (the packed counterpart of TRL's
``get_batch_logps`` reduction)."""

from __future__ import annotations

import torch


def sequence_logps(token_logps: torch.Tensor, cu_seqlens: torch.Tensor, average: bool = False) -> torch.Tensor:
    """Per-sequence sums (or means) of packed per-token log-probs.

    Args:
        token_logps: [N] float, the tokens of S sequences back to back (in fastdpo's packed batches,
            each sequence's label tokens).
        cu_seqlens: [S + 1] int32 (or int64) cumulative lengths, ``cu_seqlens[0] == 0`` and
            ``cu_seqlens[-1] == N``, non-decreasing (flash-attention's varlen convention).
        average: divide each sum by its sequence's length (NaN for an empty sequence, as TRL's 0/0).

    Returns:
        [S] in ``token_logps``' dtype (accumulated in float64), differentiable w.r.t. ``token_logps``.

    Raises:
        ValueError: wrong ranks or dtypes, or cu_seqlens that do not delimit N tokens.
    """
    if not isinstance(token_logps, torch.Tensor) or token_logps.dim() != 1 or not token_logps.is_floating_point():
        raise ValueError(f"token_logps must be a 1-D float tensor, got {getattr(token_logps, 'shape', type(token_logps))}")
    if (not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1
            or cu_seqlens.dtype not in (torch.int32, torch.int64)):
        raise ValueError("cu_seqlens must be a 1-D int32/int64 tensor of S + 1 cumulative lengths")
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(token_logps.device)
    first, last = cu_seqlens[0].item(), cu_seqlens[-1].item()
    if first != 0 or last != token_logps.numel() or bool((lengths < 0).any()):
        raise ValueError(
            f"cu_seqlens must start at 0, never decrease and end at N={token_logps.numel()}; "
            f"got start {first}, end {last}"
        )
    seq_ids = torch.repeat_interleave(torch.arange(lengths.numel(), device=token_logps.device), lengths)
    # index_add adds one token at a time: in fp32 its error grows with the sequence length (4e-6 relative at
    # 16k tokens), while fp64 accumulation keeps a 32k-token sum as exact as torch.sum's pairwise one.
    sums = token_logps.new_zeros(lengths.numel(), dtype=torch.float64).index_add(0, seq_ids, token_logps.double())
    sums = sums.to(token_logps.dtype)
    return sums / lengths if average else sums
