"""``linear_cross_entropy``: the fused LM-head cross-entropy (the SFT loss), on ``linear_logps``' kernels.

Named and shaped like Apple Cut Cross-Entropy's ``linear_cross_entropy`` (``e`` → ``hidden``, ``c`` → ``weight``);
the README's "SFT, then DPO" section maps CCE's and Liger-Kernel's options onto these.
"""

from __future__ import annotations

import torch

from .linear_logps import linear_logps
from .validation import check_labels

REDUCTIONS = ("mean", "sum", "none")


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    shift: bool | int = False,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    filter_eps: float | str | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Cross-entropy ``-log softmax(transform(hidden @ weight.T + bias))[target]`` without the [N, V] logits:
    ``-linear_logps`` reduced (CCE ``linear_cross_entropy``; ``F.cross_entropy`` on materialised logits).

    Args:
        hidden: [..., H] float32/bfloat16/float16 (CCE's ``e``); weight: [V, H], same dtype (CCE's ``c``).
        targets: [...] int64/int32 (``hidden.shape[:-1]``) in [0, V) or ``ignore_index``; bias: [V] or None.
        reduction: ``"mean"`` over the non-ignored tokens (0.0 with zero gradients when every token is ignored,
            where CCE and ``F.cross_entropy`` give NaN), ``"sum"``, or ``"none"``: per-token losses shaped like
            ``targets`` (0.0 at ignored tokens; ``[..., T - shift]`` with ``shift``).
        shift: as CCE: an int k in [0, T) (True = 1) pairs ``hidden[..., :-k, :]`` with ``targets[..., k:]``
            (next-token prediction from unshifted labels); needs ``hidden`` of shape [..., T, H].
        logit_scale, softcap: the logit transform, as ``linear_logps`` (softcap is CCE's).
        filter_eps: CCE's gradient filtering, passed to ``linear_logps``: ``"auto"`` (bf16/fp16: dtype eps / 32;
            fp32: exact), a float threshold, or None (exact; CCE's default is ``"auto"``, here exact because the
            default CUDA backend cannot skip the work filtering drops).
        backend: as ``linear_logps``.

    Returns:
        fp32: a scalar for ``"mean"``/``"sum"``, else per-token losses (>= 0); differentiable w.r.t. hidden, weight
        and bias.

    Raises:
        ValueError: an unknown reduction, ``targets`` not shaped like ``hidden.shape[:-1]``, a shift outside
            [0, T), a bad ``filter_eps``, and every error of ``linear_logps`` (labels outside the vocabulary, ...).
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not isinstance(hidden, torch.Tensor) or hidden.dim() < 1:
        raise ValueError(f"hidden must be a tensor of shape [..., H], got {getattr(hidden, 'shape', type(hidden))}")
    if isinstance(targets, torch.Tensor) and targets.shape != hidden.shape[:-1]:
        raise ValueError(f"targets must have shape hidden.shape[:-1] = {tuple(hidden.shape[:-1])}, got "
                         f"{tuple(targets.shape)}")
    check_labels(targets, tuple(hidden.shape[:-1]), hidden.device)
    k = int(shift)
    if k and (hidden.dim() < 2 or not 0 <= k < targets.shape[-1]):
        raise ValueError(f"shift={shift!r} needs hidden [..., T, H] and 0 <= shift < T; got hidden shape "
                         f"{tuple(hidden.shape)}")
    labels = targets
    if k:   # position t predicts targets[t + k]; the last k positions predict nothing
        labels = torch.full_like(targets, ignore_index)
        labels[..., :-k] = targets[..., k:]
    flat = labels.reshape(-1)
    loss = -linear_logps(hidden.reshape(-1, hidden.shape[-1]), weight, flat, bias, ignore_index=ignore_index,
                         logit_scale=logit_scale, softcap=softcap, backend=backend, filter_eps=filter_eps)
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.sum() / (flat != ignore_index).sum().clamp_min(1)
    loss = loss.view(labels.shape)
    return loss[..., :-k] if k else loss
