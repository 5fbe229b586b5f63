"""Label logit by an indexed dot: ``transform(hidden[i] . weight[labels[i]] + bias[labels[i]])``.

Reads one weight row per token instead of a vocabulary sweep (Cut Cross-Entropy's indexed_dot).
"""

import torch
import triton
import triton.language as tl

from .launch import transform_args
from .tiles import apply_transform


@triton.jit
def _indexed_dot_kernel(
    H, W, B, Labels, Out,
    N, D,
    stride_hn, stride_hd, stride_wv, stride_wd,
    logit_scale, softcap, inv_temperature,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = offs_n < N
    labels = tl.load(Labels + offs_n, mask=row_ok, other=0).to(tl.int64)
    h_rows = H + offs_n.to(tl.int64)[:, None] * stride_hn
    w_rows = W + labels[:, None] * stride_wv
    acc = tl.zeros([BLOCK_N], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask = row_ok[:, None] & (offs_d < D)[None, :]
        h = tl.load(h_rows + offs_d[None, :] * stride_hd, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(w_rows + offs_d[None, :] * stride_wd, mask=mask, other=0.0).to(tl.float32)
        acc += tl.sum(h * w, 1)
    if HAS_BIAS:
        acc += tl.load(B + labels, mask=row_ok, other=0.0).to(tl.float32)
    z = apply_transform(acc, logit_scale, softcap, inv_temperature, HAS_SOFTCAP)
    tl.store(Out + offs_n, z, mask=row_ok)


def indexed_dot(hidden, weight, bias, labels, transform, block_n: int = 16, block_d: int = 128):
    """[N] fp32 transformed label logits; ``labels`` must already be in [0, V)."""
    n, d = hidden.shape
    out = torch.empty(n, device=hidden.device, dtype=torch.float32)
    scale, softcap, inv_t, has_softcap = transform_args(transform)
    _indexed_dot_kernel[(triton.cdiv(n, block_n),)](
        hidden, weight, bias if bias is not None else out, labels, out,
        n, d,
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
        scale, softcap, inv_t,
        HAS_BIAS=bias is not None, HAS_SOFTCAP=has_softcap,
        BLOCK_N=block_n, BLOCK_D=block_d,
    )
    return out
