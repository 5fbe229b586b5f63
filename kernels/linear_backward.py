"""Backward stage of the fused linear log-probs: recompute each logit tile, never store it.

For upstream gradient ``g`` [N] and transformed logits ``z``:
``dz = g * (onehot(label) - exp(z - lse)) * dtransform``; then ``dH += dz @ W_tile``,
``dW_tile += dz.T @ H`` and ``db_tile += dz.sum(0)``, accumulated in fp32 with atomics.
One program per (token tile, vocabulary tile): 8*N*D*V FLOP with the forward.

A 16-bit weight's gradient is accumulated in fp32 one vocabulary chunk at a time
(``scratch_bytes`` of fp32 at most), so no fp32 [V, D] buffer exists beside the gradient itself.
"""

import torch
import triton
import triton.language as tl

from .launch import dot_precision, tile_config, transform_args, upcast_dot
from .tiles import logit_tile, transform_grad_scale


@triton.jit
def _linear_backward_kernel(
    H, W, B, Labels, Lse, Grad, DH, DW, DB,
    N, V, D, label_offset,
    stride_hn, stride_hd, stride_wv, stride_wd, stride_dhn, stride_dwv,
    logit_scale, softcap, inv_temperature,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    COMPUTE_DH: tl.constexpr, COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Token tiles vary fastest so consecutive programs share one weight tile in cache.
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    pid_n = pid % num_n
    pid_v = pid // num_n
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = offs_n < N
    col_ok = offs_v < V

    z = logit_tile(H, W, B, offs_n, offs_v, row_ok, col_ok, D, stride_hn, stride_hd, stride_wv, stride_wd,
                   logit_scale, softcap, inv_temperature, HAS_BIAS, HAS_SOFTCAP,
                   BLOCK_N, BLOCK_V, BLOCK_D, DOT_PRECISION, UPCAST)

    lse = tl.load(Lse + offs_n, mask=row_ok, other=0.0)
    g = tl.load(Grad + offs_n, mask=row_ok, other=0.0)
    labels = tl.load(Labels + offs_n, mask=row_ok, other=-1) - label_offset
    p = tl.where(row_ok[:, None] & col_ok[None, :], tl.exp(z - lse[:, None]), 0.0)
    onehot = tl.where(offs_v[None, :] == labels[:, None], 1.0, 0.0)
    dz = g[:, None] * (onehot - p)
    dz = dz * transform_grad_scale(z, logit_scale, softcap, inv_temperature, HAS_SOFTCAP)

    if COMPUTE_DB:
        tl.atomic_add(DB + offs_v, tl.sum(dz, 0), mask=col_ok)
    if UPCAST:
        dz_op = dz
    else:
        dz_op = dz.to(W.dtype.element_ty)
    h_rows = H + offs_n.to(tl.int64)[:, None] * stride_hn
    w_rows = W + offs_v.to(tl.int64)[:, None] * stride_wv
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        if COMPUTE_DH:
            w = tl.load(w_rows + offs_d[None, :] * stride_wd, mask=col_ok[:, None] & d_ok[None, :], other=0.0)
            if UPCAST:
                w = w.to(tl.float32)
            dh = tl.dot(dz_op, w, input_precision=DOT_PRECISION)
            tl.atomic_add(DH + offs_n.to(tl.int64)[:, None] * stride_dhn + offs_d[None, :], dh,
                          mask=row_ok[:, None] & d_ok[None, :])
        if COMPUTE_DW:
            h = tl.load(h_rows + offs_d[None, :] * stride_hd, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            if UPCAST:
                h = h.to(tl.float32)
            dw = tl.dot(tl.trans(dz_op), h, input_precision=DOT_PRECISION)
            tl.atomic_add(DW + offs_v.to(tl.int64)[:, None] * stride_dwv + offs_d[None, :], dw,
                          mask=col_ok[:, None] & d_ok[None, :])


def linear_backward(hidden, weight, bias, labels, lse, grad, transform, needs, scratch_bytes=64 << 20):
    """Gradients of ``sum(grad * logp)`` w.r.t. hidden, weight and bias.

    Args:
        hidden [N, D], weight [V, D], bias [V] or None, labels [N] in [0, V), lse [N] fp32 from the
        forward, grad [N] fp32 upstream gradient, transform a ``LogitTransform``,
        needs (hidden, weight, bias) booleans.
    Returns:
        (d_hidden [N, D] in hidden's dtype, d_weight [V, D] in weight's dtype, d_bias [V] in bias's
        dtype), None where not needed.
    """
    n, d = hidden.shape
    v = weight.shape[0]
    need_dh, need_dw, need_db = needs
    cfg = tile_config(hidden.dtype)
    dev = hidden.device
    dh = torch.zeros(n, d, device=dev, dtype=torch.float32) if need_dh else None
    db = torch.zeros(v, device=dev, dtype=torch.float32) if need_db else None
    dw = torch.zeros(v, d, device=dev, dtype=weight.dtype) if need_dw else None
    fp32_weight = weight.dtype == torch.float32
    chunk = v if fp32_weight or not need_dw else max(cfg.block_v, scratch_bytes // (4 * d) // cfg.block_v * cfg.block_v)
    scale, softcap, inv_t, has_softcap = transform_args(transform)
    for v0 in range(0, v, chunk):
        vc = min(chunk, v - v0)
        dw_acc = None
        if need_dw:
            dw_acc = dw[v0:v0 + vc] if fp32_weight else torch.zeros(vc, d, device=dev, dtype=torch.float32)
        dummy = lse
        grid = (triton.cdiv(n, cfg.block_n) * triton.cdiv(vc, cfg.block_v),)
        _linear_backward_kernel[grid](
            hidden, weight[v0:v0 + vc], bias[v0:v0 + vc] if bias is not None else dummy, labels, lse, grad,
            dh if need_dh else dummy, dw_acc if need_dw else dummy, db[v0:v0 + vc] if need_db else dummy,
            n, vc, d, v0,
            hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
            dh.stride(0) if need_dh else 0, dw_acc.stride(0) if need_dw else 0,
            scale, softcap, inv_t,
            HAS_BIAS=bias is not None, HAS_SOFTCAP=has_softcap,
            COMPUTE_DH=need_dh, COMPUTE_DW=need_dw, COMPUTE_DB=need_db,
            DOT_PRECISION=dot_precision(hidden.dtype), UPCAST=upcast_dot(hidden.dtype),
            BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        if need_dw and not fp32_weight:
            dw[v0:v0 + vc].copy_(dw_acc)
    return (
        dh.to(hidden.dtype) if need_dh else None,
        dw,
        db.to(bias.dtype) if need_db else None,
    )
