"""Triton helpers shared by the kernels: the logit transform and the projection of one tile.

The transform follows ``fastdpo.ops.transform.LogitTransform`` step for step (scale, soft-cap,
temperature), so both backends compute the same function.
"""

import triton
import triton.language as tl


@triton.jit
def tanh(x):
    # libdevice.tanh does not run under TRITON_INTERPRET; this form has absolute error ~eps(fp32),
    # and exp overflow at large |x| saturates to the right limit (+1 / -1).
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def apply_transform(z, logit_scale, softcap, inv_temperature, HAS_SOFTCAP: tl.constexpr):
    z = z * logit_scale
    if HAS_SOFTCAP:
        z = softcap * tanh(z / softcap)
    return z * inv_temperature


@triton.jit
def transform_grad_scale(z_out, logit_scale, softcap, inv_temperature, HAS_SOFTCAP: tl.constexpr):
    """d(transformed)/d(raw) recovered from the transformed logits ``z_out``."""
    scale = logit_scale * inv_temperature
    if HAS_SOFTCAP:
        t = z_out / (softcap * inv_temperature)
        return (1.0 - t * t) * scale
    return scale + tl.zeros_like(z_out)     # a tile either way: Triton 3.9 rejects mixed return types


@triton.jit
def logit_tile(
    H, W, B, offs_n, offs_v, row_ok, col_ok, D, stride_hn, stride_hd, stride_wv, stride_wd,
    logit_scale, softcap, inv_temperature,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """Transformed fp32 logits ``transform(H[offs_n] @ W[offs_v].T + B[offs_v])``, [BLOCK_N, BLOCK_V]."""
    z = project_tile(H, W, offs_n, offs_v, row_ok, col_ok, D, stride_hn, stride_hd, stride_wv, stride_wd,
                     BLOCK_N, BLOCK_V, BLOCK_D, DOT_PRECISION, UPCAST)
    if HAS_BIAS:
        z += tl.load(B + offs_v, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return apply_transform(z, logit_scale, softcap, inv_temperature, HAS_SOFTCAP)


@triton.jit
def project_tile(
    H, W, offs_n, offs_v, row_ok, col_ok, D, stride_hn, stride_hd, stride_wv, stride_wd,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """fp32 tile ``H[offs_n] @ W[offs_v].T`` of shape [BLOCK_N, BLOCK_V]; masked rows/cols are 0."""
    acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    h_rows = H + offs_n.to(tl.int64)[:, None] * stride_hn
    w_rows = W + offs_v.to(tl.int64)[:, None] * stride_wv
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        h = tl.load(h_rows + offs_d[None, :] * stride_hd, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        w = tl.load(w_rows + offs_d[None, :] * stride_wd, mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=DOT_PRECISION)
    return acc
