"""Triton helpers shared by the kernels: the logit transform, the projection of one tile, the online logsumexp.

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


@triton.jit
def fold_lse(z, ok, hit, m, s, sum_ez, sum_e2, sum_z, max_other,
             EXP_LOGIT: tl.constexpr, LSE_2Z: tl.constexpr, SUM_LOGIT: tl.constexpr, MAX_OTHER: tl.constexpr):
    """A [rows, columns] tile of transformed logits folded into its rows' running logsumexp state (online softmax,
    Milakov & Gimelshein 2018): max ``m``, ``s = Σ exp(z − m)`` and, as asked, ``Σ exp(z − m)·z``,
    ``Σ exp(2 (z − m))``, ``Σ z`` and the max over non-label logits. ``ok`` masks the tile's valid entries, ``hit``
    its label entries. Returns the updated (m, s, sum_ez, sum_e2, sum_z, max_other)."""
    z_or_zero = tl.where(ok, z, 0.0)     # keeps 0 * -inf out of the sums
    z = tl.where(ok, z, float("-inf"))
    m_new = tl.maximum(m, tl.max(z, 1))
    alpha = tl.exp(m - m_new)
    e = tl.exp(z - m_new[:, None])
    s = s * alpha + tl.sum(e, 1)
    if EXP_LOGIT:
        sum_ez = sum_ez * alpha + tl.sum(e * z_or_zero, 1)
    if LSE_2Z:
        sum_e2 = sum_e2 * alpha * alpha + tl.sum(e * e, 1)
    if SUM_LOGIT:
        sum_z += tl.sum(z_or_zero, 1)
    if MAX_OTHER:
        max_other = tl.maximum(max_other, tl.max(tl.where(hit, float("-inf"), z), 1))
    return m_new, s, sum_ez, sum_e2, sum_z, max_other
