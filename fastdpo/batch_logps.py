"""Per-sequence log-probabilities: TRL's legacy ``get_batch_logps`` and its packed counterpart."""

from __future__ import annotations

import torch

from .linear_logps import linear_logps
from .logits_logps import logits_logps


def _shift_labels(labels: torch.Tensor, label_pad_token_id: int, is_encoder_decoder: bool) -> torch.Tensor:
    """Decoder-only: position t predicts token t+1, so labels move left and the last position
    (TRL drops its logit) gets the pad label."""
    if is_encoder_decoder:
        return labels
    pad = labels.new_full((labels.shape[0], 1), label_pad_token_id)
    return torch.cat([labels[:, 1:], pad], dim=1)


def _reduce(token_logps: torch.Tensor, labels: torch.Tensor, label_pad_token_id: int, average: bool):
    total = token_logps.sum(-1)
    if average:
        return total / (labels != label_pad_token_id).sum(-1)
    return total


def _check_batch_shapes(lead_shape, labels) -> None:
    if tuple(lead_shape) != tuple(labels.shape):
        raise ValueError("Logits (batch and sequence length dim) and labels must have the same shape.")
    if labels.dim() != 2:
        raise ValueError(f"labels must be [batch, sequence], got shape {tuple(labels.shape)}")


def get_batch_logps(
    logits: torch.Tensor,
    labels: torch.Tensor,
    average_log_prob: bool = False,
    label_pad_token_id: int = -100,
    is_encoder_decoder: bool = False,
) -> torch.Tensor:
    """Drop-in for TRL's legacy ``DPOTrainer.get_batch_logps`` (TRL <= 0.9), same signature.

    Semantics as TRL: for decoder-only models the labels are shifted left and the last logit is
    dropped; positions labelled ``label_pad_token_id`` are masked; the result is the per-sequence
    sum of label log-probs, or with ``average_log_prob`` their mean over unmasked tokens (NaN for a
    sequence with none, as TRL's 0/0). Computed by a fused log-softmax + gather (see
    ``fastdpo.logits_logps``), so no log-softmax tensor and no fp32 copy of bf16 logits are made,
    and the caller's ``labels`` are left untouched (TRL overwrote pad labels in place in the
    encoder-decoder case). The result is float32 whatever the logits' dtype.

    Args:
        logits: [B, T, V] float32, bfloat16 or float16.
        labels: [B, T] int64.

    Returns:
        [B] float32.

    Raises:
        ValueError: ``logits.shape[:-1] != labels.shape`` (TRL's message), or as ``logits_logps``
            for bad dtypes and out-of-range labels.
    """
    if not isinstance(logits, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise ValueError("logits and labels must be tensors")
    _check_batch_shapes(logits.shape[:-1], labels)
    labels = _shift_labels(labels, label_pad_token_id, is_encoder_decoder)
    token_logps = logits_logps(logits, labels, ignore_index=label_pad_token_id)
    return _reduce(token_logps, labels, label_pad_token_id, average_log_prob)


def get_batch_logps_from_hidden(
    hidden_states: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    average_log_prob: bool = False,
    label_pad_token_id: int = -100,
    is_encoder_decoder: bool = False,
    lm_head_bias: torch.Tensor | None = None,
    *,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """``get_batch_logps`` from the final hidden states: the logits are never built.

    Same semantics as ``get_batch_logps(hidden_states @ lm_head_weight.T + lm_head_bias, labels, ...)``;
    masked positions (pad labels and the dropped last position) cost no FLOPs.

    Args:
        hidden_states: [B, T, H] float32, bfloat16 or float16.
        lm_head_weight: [V, H], same dtype. lm_head_bias: [V] or None.
        labels: [B, T] int64.
        logit_scale, softcap, temperature: the model's logit transform (see ``linear_logps``).

    Returns:
        [B] float32, differentiable w.r.t. hidden states, weight and bias.

    Raises:
        ValueError: ``hidden_states.shape[:-1] != labels.shape``, or as ``linear_logps``.
    """
    if not isinstance(hidden_states, torch.Tensor) or hidden_states.dim() != 3:
        raise ValueError(f"hidden_states must be [B, T, H], got {getattr(hidden_states, 'shape', type(hidden_states))}")
    _check_batch_shapes(hidden_states.shape[:-1], labels)
    labels = _shift_labels(labels, label_pad_token_id, is_encoder_decoder)
    token_logps = linear_logps(
        hidden_states.reshape(-1, hidden_states.shape[-1]), lm_head_weight, labels.reshape(-1), lm_head_bias,
        ignore_index=label_pad_token_id, logit_scale=logit_scale, softcap=softcap, temperature=temperature,
    ).view(labels.shape)
    return _reduce(token_logps, labels, label_pad_token_id, average_log_prob)


def sequence_logps(token_logps: torch.Tensor, cu_seqlens: torch.Tensor, average: bool = False) -> torch.Tensor:
    """Per-sequence sums (or means) of packed per-token log-probs.

    Args:
        token_logps: [N] float, the tokens of S sequences back to back (in fastdpo's packed batches,
            each sequence's label tokens).
        cu_seqlens: [S + 1] int32 (or int64) cumulative lengths, ``cu_seqlens[0] == 0`` and
            ``cu_seqlens[-1] == N``, non-decreasing (flash-attention's varlen convention).
        average: divide each sum by its sequence's length (NaN for an empty sequence, as TRL's 0/0).

    Returns:
        [S] in ``token_logps``' dtype, differentiable w.r.t. ``token_logps``.

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
    sums = token_logps.new_zeros(lengths.numel()).index_add(0, seq_ids, token_logps)
    return sums / lengths if average else sums
