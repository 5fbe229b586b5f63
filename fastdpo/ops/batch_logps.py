"""TRL's legacy ``get_batch_logps`` (TRL <= 0.9) as drop-ins: from logits, or from hidden states without them."""

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
