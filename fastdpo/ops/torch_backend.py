"""The PyTorch backend: the vocabulary-chunked path (``fastdpo.ops.chunked``) with its row steps as PyTorch ops,
for CPUs and devices without Triton, and the row-wise log-softmax over given logits.

Same interface as ``fastdpo.kernels``. The [N, V] logits are never built: ``chunked`` walks them in tiles of at most
``chunked.SCRATCH_BYTES`` (32 MiB of fp32 on the CPU). The reduction order is fixed, so results are bitwise
reproducible run to run.
"""

from __future__ import annotations

import torch

from . import chunked
from .transform import LogitTransform

# 8 Mi fp32 values = 32 MiB per tile of ``logits_forward``/``logits_backward``.
TILE_ELEMENTS = 8 << 20


def _local_labels(labels: torch.Tensor, v0: int, v1: int):
    """Rows whose label falls in [v0, v1) and those labels shifted to the chunk."""
    rows = ((labels >= v0) & (labels < v1)).nonzero().squeeze(1)
    return rows, labels[rows] - v0


def _transformed(z: torch.Tensor, bias, transform: LogitTransform) -> torch.Tensor:
    if bias is not None:
        z += bias.float()
    return transform.apply(z)


def update_lse(z, bias, labels, v0, transform: LogitTransform, state: chunked.LseState) -> None:
    """See ``fastdpo.kernels.logit_chunks.update_lse``."""
    z = _transformed(z, bias, transform)
    hit, local = _local_labels(labels, v0, v0 + z.shape[1])
    state.label_logit[hit] = z[hit, local]
    m_new = torch.maximum(state.m, z.amax(1))
    alpha = torch.exp(state.m - m_new)
    p = state.primitives
    # exp in place unless a statistic still needs z after this point
    keep_z = p.keys() & {"expected_logit", "sum_logit", "max_other"}
    e = (z.sub(m_new[:, None]) if keep_z else z.sub_(m_new[:, None])).exp_()
    state.s.mul_(alpha).add_(e.sum(1))
    if "expected_logit" in p:     # sum exp(z - m) * z, normalised by s at the end
        p["expected_logit"].mul_(alpha).add_(torch.linalg.vecdot(e, z))
    if "lse_2z" in p:             # sum exp(2 (z - m)), turned into log sum exp(2z) at the end
        p["lse_2z"].mul_(alpha * alpha).add_(e.square_().sum(1))
    if "sum_logit" in p:
        p["sum_logit"].add_(z.sum(1))
    if "max_other" in p:
        z[hit, local] = float("-inf")
        torch.maximum(p["max_other"], z.amax(1), out=p["max_other"])
    state.m.copy_(m_new)


def logits_grad_(z, bias, labels, v0, lse, grad, transform: LogitTransform, dtype: torch.dtype) -> torch.Tensor:
    """See ``fastdpo.kernels.logit_chunks.logits_grad_``; a 16-bit ``dtype`` gets its own tensor (PyTorch copies
    cannot narrow a tensor over its own memory)."""
    z = _transformed(z, bias, transform)
    scale = transform.grad_scale(z)
    dz = z.sub_(lse[:, None]).exp_().mul_(-grad[:, None])      # -g * softmax, in place
    hit, local = _local_labels(labels, v0, v0 + z.shape[1])
    dz[hit, local] += grad[hit]
    if not (isinstance(scale, float) and scale == 1.0):   # the identity transform needs no pass
        dz.mul_(scale)
    return dz.to(dtype)


STEPS = chunked.RowSteps(update_lse, logits_grad_)


def linear_forward(hidden, weight, bias, labels, transform, primitives, deterministic=False):
    """See ``fastdpo.kernels.linear_forward``: (label_logit, lse, {primitive: [N] fp32}); always deterministic."""
    return chunked.linear_forward(hidden, weight, bias, labels, transform, primitives, STEPS)


def linear_backward(hidden, weight, bias, labels, lse, grad, transform, needs, filter_eps=None, deterministic=False):
    """See ``fastdpo.kernels.linear_backward``: (d_hidden, d_weight, d_bias), None where not needed.

    Always exact and deterministic: ``filter_eps`` is ignored (a whole tile goes through one GEMM, so skipping
    parts of it would save nothing).
    """
    return chunked.linear_backward(hidden, weight, bias, labels, lse, grad.float(), transform, needs,
                                   STEPS)


def _row_tile(v: int) -> int:
    return max(1, TILE_ELEMENTS // v)


def _gather_rows(logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    t = logits.shape[1]
    return logits[rows // t, rows % t].float()


def logits_forward(logits, rows, labels):
    """See ``fastdpo.kernels.logits_forward``: (logps [R] fp32, lse [R] fp32)."""
    r = rows.numel()
    logp = torch.empty(r, device=logits.device)
    lse = torch.empty(r, device=logits.device)
    step = _row_tile(logits.shape[-1])
    for i in range(0, r, step):
        x = _gather_rows(logits, rows[i:i + step])
        lse[i:i + step] = torch.logsumexp(x, 1)
        logp[i:i + step] = x.gather(1, labels[i:i + step, None]).squeeze(1) - lse[i:i + step]
    return logp, lse


def logits_backward(logits, rows, labels, lse, grad):
    """See ``fastdpo.kernels.logits_backward``: gradient shaped and typed like ``logits``."""
    b, t, v = logits.shape
    dx = torch.zeros(b, t, v, device=logits.device, dtype=logits.dtype)
    step = _row_tile(v)
    for i in range(0, rows.numel(), step):
        sel = rows[i:i + step]
        g = grad[i:i + step, None].float()
        dz = _gather_rows(logits, sel).sub_(lse[i:i + step, None]).exp_().mul_(-g)
        dz.scatter_add_(1, labels[i:i + step, None], g)
        dx[sel // t, sel % t] = dz.to(dx.dtype)
    return dx
