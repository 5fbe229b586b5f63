"""``logits_logps``: log-softmax + gather over logits that already exist, fused."""

from __future__ import annotations

import torch

from . import dispatch
from .dispatch import Backend
from .validation import check_float, check_labels, valid_positions


class _LogitsLogps(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels_flat, rows, impl: Backend):
        b, t, _ = logits.shape
        lbl = labels_flat.index_select(0, rows)
        out = torch.zeros(b * t, device=logits.device, dtype=torch.float32)
        lse = out.new_zeros(0)
        if rows.numel():
            with torch.autocast(logits.device.type, enabled=False):
                logp, lse = impl.logits_forward(logits, rows, lbl)
            out.index_copy_(0, rows, logp)
        ctx.save_for_backward(logits, rows, lbl, lse)
        ctx.impl = impl
        return out.view(b, t)

    @staticmethod
    def backward(ctx, grad):
        logits, rows, lbl, lse = ctx.saved_tensors
        if not rows.numel():
            return torch.zeros_like(logits), None, None, None
        g = grad.reshape(-1).index_select(0, rows).float()
        with torch.autocast(logits.device.type, enabled=False):
            return ctx.impl.logits_backward(logits, rows, lbl, lse, g), None, None, None


def logits_logps(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    backend: str | None = None,
) -> torch.Tensor:
    """``log_softmax(logits, -1).gather(-1, labels)`` in one pass, without a log-softmax tensor.

    Rows are read in the logits' own dtype and upcast tile by tile (no fp32 copy of bf16 logits);
    rows whose label is ``ignore_index`` are never read. The same quantity as TRL's
    ``selective_log_softmax``.

    Args:
        logits: [B, T, V] or [N, V] float32, bfloat16 or float16 (any batch/time strides).
        labels: [B, T] or [N] int64 (or int32) in [0, V), or ``ignore_index``.
        ignore_index: label of skipped positions; their log-prob is exactly 0.0.
        backend: see ``fastdpo.ops.dispatch``.

    Returns:
        float32 log-probabilities shaped like ``labels``; differentiable w.r.t. ``logits`` (the
        gradient has the logits' dtype).

    Raises:
        ValueError: wrong rank or dtype, ``labels.shape != logits.shape[:-1]``, mismatched devices,
            an empty vocabulary, or a label outside [0, V) other than ``ignore_index``.
    """
    if not isinstance(logits, torch.Tensor) or logits.dim() not in (2, 3):
        raise ValueError(f"logits must be a [B, T, V] or [N, V] tensor, got {getattr(logits, 'shape', type(logits))}")
    check_float("logits", logits, logits.dim())
    check_labels(labels, logits.shape[:-1], logits.device)
    if logits.shape[-1] == 0:
        raise ValueError("logits have an empty vocabulary dimension")
    squeeze = logits.dim() == 2
    x = logits.unsqueeze(0) if squeeze else logits
    if x.stride(-1) != 1:
        x = x.contiguous()
    rows = valid_positions(labels, ignore_index, logits.shape[-1])
    impl = dispatch.select(logits.device, backend)
    out = _LogitsLogps.apply(x, labels.reshape(-1).long(), rows, impl)
    return out.squeeze(0) if squeeze else out
