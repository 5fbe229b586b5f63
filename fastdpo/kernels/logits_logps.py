"""Log-softmax + gather over given logits, forward and backward, one program per row.

Rows are read in their own dtype and upcast tile by tile in registers: no log-softmax tensor and
no fp32 copy of bf16 logits exist. Logits are addressed as [B, T, V] with arbitrary batch/time
strides, so a shifted or sliced view needs no copy.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _logits_forward_kernel(
    X, Rows, Labels, Logp, Lse,
    T, V, stride_b, stride_t,
    BLOCK_V: tl.constexpr,
):
    i = tl.program_id(0)
    row = tl.load(Rows + i)
    label = tl.load(Labels + i)
    x_row = X + (row // T) * stride_b + (row % T) * stride_t
    offs = tl.arange(0, BLOCK_V)
    m = tl.max(tl.full([BLOCK_V], float("-inf"), tl.float32), 0)
    s = tl.sum(tl.zeros([BLOCK_V], tl.float32), 0)
    for v0 in range(0, V, BLOCK_V):
        x = tl.load(x_row + v0 + offs, mask=v0 + offs < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, 0))
        # A tile (or a row prefix) of -inf logits leaves m at -inf: shift by 0 then, not by -inf.
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - shift) + tl.sum(tl.exp(x - shift), 0)
        m = m_new
    lse = m + tl.log(s)
    x_label = tl.load(x_row + label).to(tl.float32)
    tl.store(Logp + i, x_label - lse)
    tl.store(Lse + i, lse)


@triton.jit
def _logits_backward_kernel(
    X, DX, Labels, Lse, Grad,
    T, V, stride_b, stride_t, stride_db, stride_dt,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0)
    label = tl.load(Labels + row)     # -1 marks an ignored row
    lse = tl.load(Lse + row)
    g = tl.load(Grad + row)
    valid = label >= 0
    b = row // T
    t = row % T
    x_row = X + b * stride_b + t * stride_t
    dx_row = DX + b * stride_db + t * stride_dt
    offs = tl.arange(0, BLOCK_V)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + offs
        x = tl.load(x_row + cols, mask=cols < V, other=0.0).to(tl.float32)
        dz = tl.where(cols == label, g, 0.0) - g * tl.exp(x - lse)
        dz = tl.where(valid, dz, 0.0)
        tl.store(dx_row + cols, dz.to(DX.dtype.element_ty), mask=cols < V)


def _block_v(v: int) -> int:
    return min(triton.next_power_of_2(v), 4096)


def logits_forward(logits, rows, labels):
    """log p(label) and logsumexp of the rows ``rows`` (flat b*T+t indices) of ``logits`` [B, T, V].

    Returns (logps [R] fp32, lse [R] fp32) for the R selected rows.
    """
    _, t, v = logits.shape
    r = rows.numel()
    logp = torch.empty(r, device=logits.device, dtype=torch.float32)
    lse = torch.empty_like(logp)
    _logits_forward_kernel[(r,)](logits, rows, labels, logp, lse, t, v, logits.stride(0), logits.stride(1),
                                 BLOCK_V=_block_v(v), num_warps=8)
    return logp, lse


def logits_backward(logits, rows, labels, lse, grad):
    """d(sum(grad * logp))/d(logits) as a tensor shaped and typed like ``logits``; 0 on other rows."""
    b, t, v = logits.shape

    def full(fill, src):
        return torch.full((b * t,), fill, device=logits.device, dtype=src.dtype).index_copy_(0, rows, src)

    dx = torch.empty(b, t, v, device=logits.device, dtype=logits.dtype)
    _logits_backward_kernel[(b * t,)](
        logits, dx, full(-1, labels), full(0.0, lse), full(0.0, grad),
        t, v, logits.stride(0), logits.stride(1), dx.stride(0), dx.stride(1),
        BLOCK_V=_block_v(v), num_warps=16,    # 8 values a thread: at 16, ptxas spills on sm_80 (kernels.aot)
    )
    return dx
