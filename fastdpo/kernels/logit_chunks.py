"""Row steps of the vocabulary-chunked path (``fastdpo.ops.chunked``): memory-bound passes over one fp32 logit chunk.

The chunk ``z`` [n, v_c] holds raw logits ``h·W_cᵀ`` for vocabulary rows [v0, v0 + v_c), written by a cuBLAS GEMM.

* ``update_lse``: folds the chunk into each row's running max, sum of exponentials and statistic sums (online
  logsumexp across chunks), and picks the label logit where the label falls in the chunk.
* ``logits_grad_``: overwrites the chunk with ``dz = g·(onehot − exp(z − lse))·dtransform`` in the GEMM operand
  dtype, in place: row r of a 16-bit ``dz`` (row stride 2·v_c) lies inside row r's own fp32 bytes, so only the
  program that owns the row touches them, and a barrier after each block's loads keeps a 16-bit store from
  landing on fp32 values another warp of the program has not read yet (store j writes the bytes of fp32 block
  j // 2, read in an earlier iteration or, for j = 0, this one).

Both apply the bias and the logit transform (``tiles.apply_transform``) to the raw chunk, as the fused kernels do.
"""

import torch
import triton
import triton.language as tl

from .launch import interpreting, transform_args
from .tiles import apply_transform, fold_lse, transform_grad_scale


@triton.jit
def _chunk_tile(Z, B, rows, row_ok, cols, v_c, stride_z, logit_scale, softcap, inv_temperature,
                HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """Transformed fp32 logits of a [BLOCK_M, BLOCK_V] block of the chunk and its in-bounds mask."""
    ok = row_ok[:, None] & (cols < v_c)[None, :]
    z = tl.load(Z + rows.to(tl.int64)[:, None] * stride_z + cols[None, :], mask=ok, other=0.0)
    if HAS_BIAS:
        z += tl.load(B + cols, mask=cols < v_c, other=0.0).to(tl.float32)[None, :]
    return apply_transform(z, logit_scale, softcap, inv_temperature, HAS_SOFTCAP), ok


@triton.jit
def _update_lse_kernel(
    Z, B, Labels, M, S, LabelLogit, ExpLogit, Lse2z, SumLogit, MaxOther,
    n, v_c, v0, stride_z,
    logit_scale, softcap, inv_temperature,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    EXP_LOGIT: tl.constexpr, LSE_2Z: tl.constexpr, SUM_LOGIT: tl.constexpr, MAX_OTHER: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n
    local = tl.load(Labels + rows, mask=row_ok, other=-1) - v0
    m = tl.load(M + rows, mask=row_ok, other=0.0)
    s = tl.load(S + rows, mask=row_ok, other=0.0)
    # the statistic sums (unused ones stay zeros the kernel never stores)
    sum_ez = tl.load(ExpLogit + rows, mask=row_ok & EXP_LOGIT, other=0.0)
    sum_e2 = tl.load(Lse2z + rows, mask=row_ok & LSE_2Z, other=0.0)
    sum_z = tl.load(SumLogit + rows, mask=row_ok & SUM_LOGIT, other=0.0)
    max_other = tl.load(MaxOther + rows, mask=row_ok & MAX_OTHER, other=0.0)
    label_logit = tl.zeros([BLOCK_M], tl.float32)
    for c0 in range(0, v_c, BLOCK_V):
        cols = c0 + tl.arange(0, BLOCK_V)
        z, ok = _chunk_tile(Z, B, rows, row_ok, cols, v_c, stride_z, logit_scale, softcap, inv_temperature,
                            HAS_BIAS, HAS_SOFTCAP)
        hit = cols[None, :] == local[:, None]
        label_logit += tl.sum(tl.where(hit & ok, z, 0.0), 1)
        m, s, sum_ez, sum_e2, sum_z, max_other = fold_lse(z, ok, hit, m, s, sum_ez, sum_e2, sum_z, max_other,
                                                          EXP_LOGIT, LSE_2Z, SUM_LOGIT, MAX_OTHER)
    tl.store(M + rows, m, mask=row_ok)
    tl.store(S + rows, s, mask=row_ok)
    tl.store(LabelLogit + rows, label_logit, mask=row_ok & (local >= 0) & (local < v_c))
    if EXP_LOGIT:
        tl.store(ExpLogit + rows, sum_ez, mask=row_ok)
    if LSE_2Z:
        tl.store(Lse2z + rows, sum_e2, mask=row_ok)
    if SUM_LOGIT:
        tl.store(SumLogit + rows, sum_z, mask=row_ok)
    if MAX_OTHER:
        tl.store(MaxOther + rows, max_other, mask=row_ok)


@triton.jit
def _logits_grad_kernel(
    Z, DZ, B, Labels, Lse, Grad,
    n, v_c, v0, stride_z, stride_dz,
    logit_scale, softcap, inv_temperature,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n
    local = tl.load(Labels + rows, mask=row_ok, other=-1) - v0
    lse = tl.load(Lse + rows, mask=row_ok, other=0.0)
    g = tl.load(Grad + rows, mask=row_ok, other=0.0)
    dz_rows = DZ + rows.to(tl.int64)[:, None] * stride_dz
    for c0 in range(0, v_c, BLOCK_V):
        cols = c0 + tl.arange(0, BLOCK_V)
        z, ok = _chunk_tile(Z, B, rows, row_ok, cols, v_c, stride_z, logit_scale, softcap, inv_temperature,
                            HAS_BIAS, HAS_SOFTCAP)
        onehot = tl.where(cols[None, :] == local[:, None], 1.0, 0.0)
        dz = g[:, None] * (onehot - tl.exp(z - lse[:, None]))
        dz *= transform_grad_scale(z, logit_scale, softcap, inv_temperature, HAS_SOFTCAP)
        tl.debug_barrier()      # every warp has read this block's fp32 values (see the module docstring)
        tl.store(dz_rows + cols[None, :], dz.to(DZ.dtype.element_ty), mask=ok)


#: Rows per program and vocabulary columns per block; 4 rows of 1024 fp32 keep 16 KiB of loads in flight.
BLOCK_M, BLOCK_V, NUM_WARPS = 4, 1024, 4
INTERPRETER_BLOCKS = (16, 256)


def _blocks(v_c: int) -> tuple[int, int]:
    block_m, block_v = INTERPRETER_BLOCKS if interpreting() else (BLOCK_M, BLOCK_V)
    return block_m, min(block_v, triton.next_power_of_2(v_c))


def update_lse(z, bias, labels, v0, transform, state) -> None:
    """Fold the raw fp32 logit chunk ``z`` [n, v_c] (vocabulary rows from ``v0``; ``bias`` [v_c] or None) into
    ``state`` (``fastdpo.ops.chunked.LseState`` of these n rows: running max, sum, label logit, primitives)."""
    n, v_c = z.shape
    block_m, block_v = _blocks(v_c)
    scale, softcap, inv_t, has_softcap = transform_args(transform)
    p = state.primitives
    dummy = state.m
    _update_lse_kernel[(triton.cdiv(n, block_m),)](
        z, bias if bias is not None else dummy, labels, state.m, state.s, state.label_logit,
        p.get("expected_logit", dummy), p.get("lse_2z", dummy), p.get("sum_logit", dummy), p.get("max_other", dummy),
        n, v_c, v0, z.stride(0), scale, softcap, inv_t,
        HAS_BIAS=bias is not None, HAS_SOFTCAP=has_softcap,
        EXP_LOGIT="expected_logit" in p, LSE_2Z="lse_2z" in p, SUM_LOGIT="sum_logit" in p, MAX_OTHER="max_other" in p,
        BLOCK_M=block_m, BLOCK_V=block_v, num_warps=NUM_WARPS,
    )


def logits_grad_(z, bias, labels, v0, lse, grad, transform, dtype: torch.dtype) -> torch.Tensor:
    """Overwrite the raw fp32 logit chunk ``z`` [n, v_c] with its ``dz`` in ``dtype`` and return that view of the
    same memory ([n, v_c], row stride ``4 / itemsize · v_c``). lse, grad: [n] fp32; labels [n] global ids."""
    n, v_c = z.shape
    if z.stride(1) != 1 or z.stride(0) != v_c:
        raise ValueError("logits_grad_ needs a contiguous [n, v_c] chunk: dz is written over it")
    dz = z.view(dtype)[:, :v_c]
    block_m, block_v = _blocks(v_c)
    scale, softcap, inv_t, has_softcap = transform_args(transform)
    _logits_grad_kernel[(triton.cdiv(n, block_m),)](
        z, dz, bias if bias is not None else lse, labels, lse, grad,
        n, v_c, v0, z.stride(0), dz.stride(0), scale, softcap, inv_t,
        HAS_BIAS=bias is not None, HAS_SOFTCAP=has_softcap,
        BLOCK_M=block_m, BLOCK_V=block_v, num_warps=NUM_WARPS,
    )
    return dz
