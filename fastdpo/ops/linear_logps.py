"""``linear_logps``: per-token label log-probabilities through an LM head, without the logits."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from . import dispatch
from .dispatch import Backend
from .transform import LogitTransform
from .validation import check_device, check_float, check_labels, valid_positions

#: Statistic name -> the primitive the backends accumulate for it in the forward sweep.
STATS = {
    "entropy": "expected_logit",      # H = lse - sum_v p_v z_v
    "log_sum_p2": "lse_2z",           # log sum_v p_v^2 = logsumexp(2z) - 2 lse (WPO weights)
    "mean_logit": "sum_logit",        # sum_v z_v / V
    "is_argmax": "max_other",         # z_label >= max over v != label
}


def _finalize_stats(names, label_logit, lse, prims, vocab_size):
    out = {}
    for name in names:
        if name == "entropy":
            out[name] = lse - prims["expected_logit"]
        elif name == "log_sum_p2":
            out[name] = prims["lse_2z"] - 2 * lse
        elif name == "mean_logit":
            out[name] = prims["sum_logit"] / vocab_size
        else:
            out[name] = label_logit >= prims["max_other"]
    return out


def _scatter(n: int, rows: torch.Tensor, values: torch.Tensor, all_rows: bool) -> torch.Tensor:
    if all_rows:
        return values
    return torch.zeros(n, device=values.device, dtype=values.dtype).index_copy_(0, rows, values)


def resolve_filter_eps(filter_eps: float | str | None, dtype: torch.dtype) -> float | None:
    """The gradient-filtering threshold of ``linear_logps``'s ``filter_eps`` for ``dtype``; None means exact.

    Raises:
        ValueError: not ``"auto"``, None or a finite number >= 0.
    """
    if filter_eps == "auto":
        return torch.finfo(dtype).eps / 32 if dtype in (torch.bfloat16, torch.float16) else None
    if filter_eps is None:
        return None
    if isinstance(filter_eps, (int, float)) and not isinstance(filter_eps, bool) and math.isfinite(filter_eps) \
            and filter_eps >= 0:
        return float(filter_eps) or None
    raise ValueError(f"filter_eps must be 'auto', None or a finite number >= 0, got {filter_eps!r}")


class _LinearLogps(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, rows, transform, stats, impl: Backend, filter_eps, deterministic):
        n = hidden.shape[0]
        all_rows = rows.numel() == n
        h = hidden if all_rows else hidden.index_select(0, rows)
        lbl = labels if all_rows else labels.index_select(0, rows)
        if rows.numel():
            prims = tuple(STATS[s] for s in stats)
            with torch.autocast(hidden.device.type, enabled=False):   # the backends pick their own precision
                label_logit, lse, acc = impl.linear_forward(h, weight, bias, lbl, transform, prims, deterministic)
            # The label logit and the lse come from different dot products: clamp their rounding
            # so a log-probability is never positive (V = 1 gives exactly 0).
            logp = (label_logit - lse).clamp_max_(0.0)
            stat_values = _finalize_stats(stats, label_logit, lse, acc, weight.shape[0])
        else:
            lse = logp = hidden.new_zeros(0, dtype=torch.float32)
            stat_values = {s: logp.bool() if s == "is_argmax" else logp for s in stats}
        ctx.save_for_backward(hidden, weight, bias, rows, lbl, lse)
        ctx.transform = transform
        ctx.impl = impl
        ctx.filter_eps, ctx.deterministic = filter_eps, deterministic
        outs = [_scatter(n, rows, logp, all_rows)]
        outs += [_scatter(n, rows, stat_values[s], all_rows) for s in stats]
        ctx.mark_non_differentiable(*outs[1:])
        return tuple(outs)

    @staticmethod
    def backward(ctx, grad_logp, *_stat_grads):
        hidden, weight, bias, rows, labels, lse = ctx.saved_tensors
        needs = ctx.needs_input_grad[:3]
        n = hidden.shape[0]
        all_rows = rows.numel() == n
        if not rows.numel():
            return (torch.zeros_like(hidden) if needs[0] else None,
                    torch.zeros_like(weight) if needs[1] else None,
                    torch.zeros_like(bias) if needs[2] else None, *[None] * 7)
        h = hidden if all_rows else hidden.index_select(0, rows)
        g = (grad_logp if all_rows else grad_logp.index_select(0, rows)).float().contiguous()
        with torch.autocast(hidden.device.type, enabled=False):
            dh, dw, db = ctx.impl.linear_backward(
                h, weight, bias, labels, lse, g, ctx.transform, (needs[0], needs[1], needs[2] and bias is not None),
                ctx.filter_eps, ctx.deterministic,
            )
        if dh is not None and not all_rows:
            dh = torch.zeros_like(hidden).index_copy_(0, rows, dh)
        return dh, dw, db, *[None] * 7


class LogpsWithStats(NamedTuple):
    """``linear_logps_with_stats``' result: ``logps`` [N] fp32 as ``linear_logps`` returns them, and ``stats``,
    {name: [N] tensor} for each statistic asked for (not differentiable)."""

    logps: torch.Tensor
    stats: dict[str, torch.Tensor]


def linear_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    temperature: float = 1.0,
    backend: str | None = None,
    deterministic: bool = False,
    filter_eps: float | str | None = None,
) -> torch.Tensor:
    """Per-token ``log softmax(transform(hidden @ weight.T + bias))[label]`` without the [N, V] logits.

    The logit transform is applied in transformers' order: ``* logit_scale`` (Cohere), then
    ``softcap * tanh(z / softcap)`` (Gemma-2 ``final_logit_softcapping``), then ``/ temperature``
    (see ``fastdpo.ops.transform``). The per-sequence DPO terms (Rafailov et al. 2023) are sums of these
    values, as TRL's ``get_batch_logps`` takes them from materialised logits.

    Args:
        hidden: [N, H] float32, bfloat16 or float16 final hidden states.
        weight: [V, H] LM-head weight (tied input embeddings work), same dtype and device as hidden.
        labels: [N] int64 (or int32) target token ids in [0, V), or ``ignore_index``.
        bias: [V] LM-head bias, same dtype as weight, or None.
        ignore_index: label of positions that are skipped (no FLOPs) and get log-prob exactly 0.0.
        logit_scale, softcap, temperature: the logit transform (identity by default).
        backend: ``"auto"`` (CUDA: ``"chunked"``, or ``"triton"`` when filtering; PyTorch elsewhere),
            ``"chunked"``, ``"triton"`` or ``"torch"``; default from ``FASTDPO_BACKEND``. See
            ``fastdpo.ops.dispatch``.
        deterministic: bitwise reproducible results. Every backend is (fixed reduction orders, no
            atomics); this also keeps the Triton launch configs fixed (no ``FASTDPO_AUTOTUNE``). The
            backend choice is unchanged.
        filter_eps: gradient filtering (Cut Cross-Entropy's argument, Wijmans et al. 2025), on the
            ``"triton"`` backend only (``"auto"`` picks it on CUDA): its backward drops the softmax part
            of a [tokens x vocabulary] tile whose probabilities are all below it and skips the tile's
            products when it holds no label; the label (one-hot) part stays exact. ``"auto"``:
            ``finfo(dtype).eps / 32`` for bf16/fp16 (CCE's value), exact for fp32; ``None`` (the
            default; CCE's is ``"auto"``) or 0: exact. The other backends always compute exactly.

    Returns:
        [N] float32 log-probabilities (<= 0), exactly 0.0 where ``labels == ignore_index``.
        Differentiable w.r.t. hidden, weight and bias under any upstream gradient. NaN or inf in a row
        of ``hidden`` gives NaN in that row only; NaN or inf in ``weight`` or ``bias`` reaches every row.

    Raises:
        ValueError: wrong rank, dtype, shape or device of any input; an empty weight; a label outside
            [0, V) other than ``ignore_index``; an unknown backend; an invalid transform;
            ``filter_eps`` not ``"auto"``, None or a finite number >= 0.
    """
    return _linear_logps(hidden, weight, labels, bias, (), ignore_index=ignore_index, logit_scale=logit_scale,
                         softcap=softcap, temperature=temperature, backend=backend, deterministic=deterministic,
                         filter_eps=filter_eps).logps


def linear_logps_with_stats(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                            stats: tuple[str, ...] | list[str], bias: torch.Tensor | None = None,
                            **options) -> LogpsWithStats:
    """``linear_logps`` and per-token statistics of the same distributions, from the same forward sweep.

    Args:
        stats: any of ``"entropy"`` (nats), ``"log_sum_p2"`` (log sum_v p_v^2, for WPO weights),
            ``"mean_logit"`` (mean transformed logit over the vocabulary) and ``"is_argmax"`` (bool: the
            label's logit is the largest); each [N], 0 / False at ignored positions, not differentiable.
        hidden, weight, labels, bias, options: as ``linear_logps`` and its keyword arguments.

    Raises:
        ValueError: an unknown statistic, or as ``linear_logps``.
    """
    return _linear_logps(hidden, weight, labels, bias, tuple(stats), **options)


def _linear_logps(hidden, weight, labels, bias, stats: tuple[str, ...], *, ignore_index=-100, logit_scale=1.0,
                  softcap=None, temperature=1.0, backend=None, deterministic=False, filter_eps=None) -> LogpsWithStats:
    check_float("hidden", hidden, 2)
    check_float("weight", weight, 2)
    if weight.shape[0] == 0 or weight.shape[1] == 0:
        raise ValueError(f"weight must be non-empty [V, H], got shape {tuple(weight.shape)}")
    check_device("weight", weight, hidden.device)
    if torch.is_autocast_enabled(hidden.device.type):
        # Under autocast the LM head would run in the autocast dtype; so does the fused op.
        dtype = torch.get_autocast_dtype(hidden.device.type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden has {hidden.shape[1]} features but weight has {weight.shape[1]} (shapes "
                         f"{tuple(hidden.shape)} and {tuple(weight.shape)})")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight dtype {weight.dtype} differs from hidden dtype {hidden.dtype}")
    if bias is not None:
        check_float("bias", bias, 1)
        check_device("bias", bias, hidden.device)
        if bias.shape[0] != weight.shape[0] or bias.dtype != weight.dtype:
            raise ValueError(f"bias must be [{weight.shape[0]}] {weight.dtype}, got {tuple(bias.shape)} {bias.dtype}")
    check_labels(labels, (hidden.shape[0],), hidden.device)
    unknown = [s for s in stats if s not in STATS]
    if unknown:
        raise ValueError(f"unknown stats {unknown}; choose from {list(STATS)}")
    transform = LogitTransform(logit_scale, softcap, temperature)
    eps = resolve_filter_eps(filter_eps, hidden.dtype)
    impl = dispatch.select(hidden.device, backend, filtering=eps is not None)
    rows = valid_positions(labels, ignore_index, weight.shape[0])

    outs = _LinearLogps.apply(
        hidden, weight, bias, labels.long(), rows, transform, stats, impl, eps, deterministic
    )
    return LogpsWithStats(outs[0], dict(zip(stats, outs[1:])))
