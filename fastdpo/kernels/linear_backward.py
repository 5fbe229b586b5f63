"""Backward stage of the fused linear log-probs: no atomics, a fixed reduction order, gradient filtering.

For upstream gradient ``g`` [N] and transformed logits ``z``: ``dz = g * (onehot(label) - exp(z - lse)) * dtransform``.
Two kernels recompute the logit tiles, and each owns its output rows, so every sum runs in one fixed order
(bitwise reproducible, with no [N, V] tensor):

* ``_dh_kernel``: one program per token tile sweeps the vocabulary, ``dH[tile] += dz @ W_v`` into rows only it
  touches (fp32, read-modify-write of the [BLOCK_N, BLOCK_D] slices).
* ``_dw_kernel``: one program per vocabulary tile sweeps the tokens, ``dW[tile] += dz.T @ H_n`` likewise, and
  ``db[tile]`` in registers.

FLOP with the forward: 2 (forward) + 2 + 2 (recompute in each kernel) + 2 + 2 (the two products) = 10·N·H·V
(8 for the atomic design it replaces). Bytes: each (token tile, vocabulary tile) pair reads its W and H tiles
(16-bit, mostly from L2: concurrent programs sweep the same tiles) and reads and writes the owned fp32 slice, so
the slices move 8·N·V·H·(1/BLOCK_V of the d hidden kernel + 1/BLOCK_N of the d weight kernel) bytes in all: at
N 8192, H 4096, V 128256 with the 16-bit defaults, 1.08 TB on sm_80 (64 and 64) and 0.81 TB on sm_90 (128 and 64);
the atomics moved 8·N·V·H/BLOCK ≈ 270 GB at 128 x 128 tiles, through contended L2 atomics. Gradient filtering
removes that traffic for every filtered tile; whether the unfiltered rest beats materialising dz in bf16 chunks
for cuBLAS (6·N·V bytes) is for the GPU benchmark to say.

Gradient filtering (Cut Cross-Entropy, Wijmans et al. 2025, ``filter_eps``): where every probability of a tile is
below ``filter_eps`` its softmax part is dropped; the one-hot (label) part stays exact, and a tile left with no
label is skipped entirely (neither product nor slice traffic). The decision depends on values only, so a
filtered run is deterministic too.

A 16-bit weight's gradient is accumulated in fp32 one vocabulary chunk at a time (``scratch_bytes`` of fp32 at
most), so no fp32 [V, H] buffer exists beside the gradient itself.
"""

import torch
import triton
import triton.language as tl

from .launch import dot_precision, tile_config, transform_args, upcast_dot
from .tiles import logit_tile, transform_grad_scale


@triton.jit
def _grad_logits(
    H, W, B, Labels, Lse, Grad, offs_n, offs_v, row_ok, col_ok, D, label_offset,
    stride_hn, stride_hd, stride_wv, stride_wd, logit_scale, softcap, inv_temperature, filter_eps,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, FILTER: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """(dz [BLOCK_N, BLOCK_V] fp32, live): ``live`` is False for a filtered tile that holds no label (dz = 0)."""
    z = logit_tile(H, W, B, offs_n, offs_v, row_ok, col_ok, D, stride_hn, stride_hd, stride_wv, stride_wd,
                   logit_scale, softcap, inv_temperature, HAS_BIAS, HAS_SOFTCAP,
                   BLOCK_N, BLOCK_V, BLOCK_D, DOT_PRECISION, UPCAST)
    lse = tl.load(Lse + offs_n, mask=row_ok, other=0.0)
    g = tl.load(Grad + offs_n, mask=row_ok, other=0.0)
    labels = tl.load(Labels + offs_n, mask=row_ok, other=-1) - label_offset
    p = tl.where(row_ok[:, None] & col_ok[None, :], tl.exp(z - lse[:, None]), 0.0)
    onehot = offs_v[None, :] == labels[:, None]
    live = True
    if FILTER:
        keep = tl.max(tl.max(p, 1), 0) >= filter_eps
        p = tl.where(keep, p, 0.0)
        live = keep | (tl.max(tl.max(onehot.to(tl.int32), 1), 0) > 0)
    dz = g[:, None] * (tl.where(onehot, 1.0, 0.0) - p)
    return dz * transform_grad_scale(z, logit_scale, softcap, inv_temperature, HAS_SOFTCAP), live


@triton.jit
def _dh_kernel(
    H, W, B, Labels, Lse, Grad, DH, Skipped,
    N, V, D,
    stride_hn, stride_hd, stride_wv, stride_wd, stride_dhn,
    logit_scale, softcap, inv_temperature, filter_eps,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, FILTER: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = offs_n < N
    dh_rows = DH + offs_n.to(tl.int64)[:, None] * stride_dhn
    skipped = 0
    for v0 in range(0, V, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        col_ok = offs_v < V
        dz, live = _grad_logits(H, W, B, Labels, Lse, Grad, offs_n, offs_v, row_ok, col_ok, D, 0,
                                stride_hn, stride_hd, stride_wv, stride_wd, logit_scale, softcap, inv_temperature,
                                filter_eps, HAS_BIAS, HAS_SOFTCAP, FILTER, BLOCK_N, BLOCK_V, BLOCK_D,
                                DOT_PRECISION, UPCAST)
        if live:
            dz_op = dz if UPCAST else dz.to(W.dtype.element_ty)
            w_rows = W + offs_v.to(tl.int64)[:, None] * stride_wv
            for d0 in range(0, D, BLOCK_D):
                offs_d = d0 + tl.arange(0, BLOCK_D)
                d_ok = offs_d < D
                w = tl.load(w_rows + offs_d[None, :] * stride_wd, mask=col_ok[:, None] & d_ok[None, :], other=0.0)
                if UPCAST:
                    w = w.to(tl.float32)
                out = dh_rows + offs_d[None, :]
                out_ok = row_ok[:, None] & d_ok[None, :]
                acc = tl.dot(dz_op, w, tl.load(out, mask=out_ok, other=0.0), input_precision=DOT_PRECISION)
                tl.store(out, acc, mask=out_ok)
        else:
            skipped += 1
    if FILTER:
        tl.store(Skipped + pid, skipped)


@triton.jit
def _dw_kernel(
    H, W, B, Labels, Lse, Grad, DW, DB, Skipped,
    N, V, D, label_offset,
    stride_hn, stride_hd, stride_wv, stride_wd, stride_dwv,
    logit_scale, softcap, inv_temperature, filter_eps,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, FILTER: tl.constexpr,
    COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_v = pid * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = offs_v < V
    dw_rows = DW + offs_v.to(tl.int64)[:, None] * stride_dwv
    db = tl.zeros([BLOCK_V], tl.float32)
    skipped = 0
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        row_ok = offs_n < N
        dz, live = _grad_logits(H, W, B, Labels, Lse, Grad, offs_n, offs_v, row_ok, col_ok, D, label_offset,
                                stride_hn, stride_hd, stride_wv, stride_wd, logit_scale, softcap, inv_temperature,
                                filter_eps, HAS_BIAS, HAS_SOFTCAP, FILTER, BLOCK_N, BLOCK_V, BLOCK_D,
                                DOT_PRECISION, UPCAST)
        if COMPUTE_DB:
            db += tl.sum(dz, 0)
        if COMPUTE_DW and live:
            dz_t = tl.trans(dz if UPCAST else dz.to(W.dtype.element_ty))
            h_rows = H + offs_n.to(tl.int64)[:, None] * stride_hn
            for d0 in range(0, D, BLOCK_D):
                offs_d = d0 + tl.arange(0, BLOCK_D)
                d_ok = offs_d < D
                h = tl.load(h_rows + offs_d[None, :] * stride_hd, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
                if UPCAST:
                    h = h.to(tl.float32)
                out = dw_rows + offs_d[None, :]
                out_ok = col_ok[:, None] & d_ok[None, :]
                acc = tl.dot(dz_t, h, tl.load(out, mask=out_ok, other=0.0), input_precision=DOT_PRECISION)
                tl.store(out, acc, mask=out_ok)
        if not live:
            skipped += 1
    if COMPUTE_DB:
        tl.store(DB + offs_v, db, mask=col_ok)
    if FILTER:
        tl.store(Skipped + pid, skipped)


def linear_backward(hidden, weight, bias, labels, lse, grad, transform, needs, filter_eps=None,
                    deterministic=False, scratch_bytes=64 << 20, tile_counts=None):
    """Gradients of ``sum(grad * logp)`` w.r.t. hidden, weight and bias, deterministic (no atomics).

    Args:
        hidden [N, D], weight [V, D], bias [V] or None, labels [N] in [0, V), lse [N] fp32 from the
        forward, grad [N] fp32 upstream gradient, transform a ``LogitTransform``,
        needs (hidden, weight, bias) booleans; filter_eps: drop the softmax part of tiles whose
        probabilities are all below it (None or 0: exact); tile_counts: a dict that receives
        {"dh_tiles", "dh_skipped", "dw_tiles", "dw_skipped"} (ints) when filtering; deterministic is
        accepted for the backend contract (this backward is always deterministic, its configs fixed).
    Returns:
        (d_hidden [N, D] in hidden's dtype, d_weight [V, D] in weight's dtype, d_bias [V] in bias's
        dtype), None where not needed.
    """
    n, d = hidden.shape
    v = weight.shape[0]
    need_dh, need_dw, need_db = needs
    dev = hidden.device
    filtering = bool(filter_eps)
    scale, softcap, inv_t, has_softcap = transform_args(transform)
    common = dict(HAS_BIAS=bias is not None, HAS_SOFTCAP=has_softcap, FILTER=filtering,
                  DOT_PRECISION=dot_precision(hidden.dtype), UPCAST=upcast_dot(hidden.dtype))
    scalars = (scale, softcap, inv_t, float(filter_eps or 0.0))
    strides = (hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1))
    counts = {}
    dh = None
    if need_dh:
        cfg = tile_config("backward_dh", hidden.dtype, n, d)
        dh = torch.zeros(n, d, device=dev, dtype=torch.float32) if hidden.dtype != torch.float32 else \
            torch.zeros_like(hidden)
        skipped = torch.zeros(triton.cdiv(n, cfg.block_n), device=dev, dtype=torch.int32)
        _dh_kernel[(triton.cdiv(n, cfg.block_n),)](
            hidden, weight, bias if bias is not None else lse, labels, lse, grad, dh, skipped,
            n, v, d, *strides, dh.stride(0), *scalars, **common,
            BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        counts.update(dh_tiles=skipped.numel() * triton.cdiv(v, cfg.block_v), dh_skipped=skipped)
        dh = dh.to(hidden.dtype)
    dw = torch.zeros(v, d, device=dev, dtype=weight.dtype) if need_dw else None
    db = torch.zeros(v, device=dev, dtype=torch.float32) if need_db else None
    if need_dw or need_db:
        cfg = tile_config("backward_dw", hidden.dtype, n, d)
        fp32_weight = weight.dtype == torch.float32
        chunk = v if fp32_weight or not need_dw else max(cfg.block_v, scratch_bytes // (4 * d) // cfg.block_v
                                                         * cfg.block_v)
        skipped = torch.zeros(triton.cdiv(v, cfg.block_v), device=dev, dtype=torch.int32)
        for v0 in range(0, v, chunk):
            vc = min(chunk, v - v0)
            acc = None
            if need_dw:
                acc = dw[v0:v0 + vc] if fp32_weight else torch.zeros(vc, d, device=dev, dtype=torch.float32)
            tiles = triton.cdiv(vc, cfg.block_v)
            first = triton.cdiv(v0, cfg.block_v)
            _dw_kernel[(tiles,)](
                hidden, weight[v0:v0 + vc], bias[v0:v0 + vc] if bias is not None else lse, labels, lse, grad,
                acc if need_dw else lse, db[v0:v0 + vc] if need_db else lse, skipped[first:first + tiles],
                n, vc, d, v0, *strides, acc.stride(0) if need_dw else 0, *scalars, **common,
                COMPUTE_DW=need_dw, COMPUTE_DB=need_db,
                BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            )
            if need_dw and not fp32_weight:
                dw[v0:v0 + vc].copy_(acc)
        counts.update(dw_tiles=triton.cdiv(v, cfg.block_v) * triton.cdiv(n, cfg.block_n), dw_skipped=skipped)
    if tile_counts is not None and filtering:
        tile_counts.update({k: int(c.sum()) if torch.is_tensor(c) else c for k, c in counts.items()})
    return dh, dw, db.to(bias.dtype) if need_db else None
