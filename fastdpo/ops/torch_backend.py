"""The PyTorch backend: the kernels' math over bounded tiles, for CPUs and devices without Triton.

Same interface as ``fastdpo.kernels``. The [N, V] logits are never built: tokens and vocabulary are
walked in tiles of at most ``TILE_ELEMENTS`` fp32 values (the forward keeps an online logsumexp
across vocabulary chunks; the backward recomputes each tile). Every product runs in fp32 (these
CPUs have no bf16 units, and fp32 keeps the accumulation exact enough for the 1e-5 bound). The
reduction order is fixed, so results are bitwise reproducible run to run.
"""

from __future__ import annotations

import torch

from .transform import LogitTransform

# 8 Mi fp32 values = 32 MiB per logit tile; a few such tiles are alive at once.
TILE_ELEMENTS = 8 << 20


def _tiles(n: int, v: int, d: int, weight_dtype: torch.dtype) -> tuple[int, int]:
    """(tokens, vocabulary rows) per tile. An fp32 weight is used in place, so the whole vocabulary
    fits one chunk; a 16-bit one is upcast a chunk at a time, at most a tile's worth."""
    v_chunk = v if weight_dtype == torch.float32 else min(v, max(1, TILE_ELEMENTS // d))
    return max(1, min(n, TILE_ELEMENTS // v_chunk)), v_chunk


def _weight_chunk(weight, bias, v0, v1):
    w = weight[v0:v1].float()
    return w, (bias[v0:v1].float() if bias is not None else None)


def _logit_tile(h, w, b, transform: LogitTransform, buffer: torch.Tensor) -> torch.Tensor:
    """Transformed fp32 logits of one tile, written into ``buffer``'s storage: every tile reuses one
    allocation, so no freed tile lingers in the allocator's free lists as extra resident memory."""
    z = buffer.view(-1)[: h.shape[0] * w.shape[0]].view(h.shape[0], w.shape[0])
    if b is not None:
        torch.addmm(b, h, w.T, out=z)
    else:
        torch.mm(h, w.T, out=z)
    return transform.apply(z)


def _local_labels(labels: torch.Tensor, v0: int, v1: int):
    """Rows whose label falls in [v0, v1) and those labels shifted to the chunk."""
    rows = ((labels >= v0) & (labels < v1)).nonzero().squeeze(1)
    return rows, labels[rows] - v0


def linear_forward(hidden, weight, bias, labels, transform, primitives, deterministic=False):
    """See ``fastdpo.kernels.linear_forward``: (label_logit, lse, {primitive: [N] fp32}); always deterministic."""
    n, d = hidden.shape
    v = weight.shape[0]
    n_tile, v_chunk = _tiles(n, v, d, weight.dtype)
    h32 = hidden.float()
    dev = hidden.device
    m = torch.full((n,), float("-inf"), device=dev)
    s = torch.zeros(n, device=dev)
    label_logit = torch.empty(n, device=dev)
    acc = {name: torch.zeros(n, device=dev) for name in primitives}
    buffer = torch.empty(n_tile, v_chunk, device=dev)
    if "max_other" in acc:
        acc["max_other"].fill_(float("-inf"))
    for v0 in range(0, v, v_chunk):
        v1 = min(v, v0 + v_chunk)
        w, b = _weight_chunk(weight, bias, v0, v1)
        for n0 in range(0, n, n_tile):
            n1 = min(n, n0 + n_tile)
            rows = slice(n0, n1)
            z = _logit_tile(h32[rows], w, b, transform, buffer)
            hit, local = _local_labels(labels[rows], v0, v1)
            label_logit[n0 + hit] = z[hit, local]
            m_old = m[rows]
            m_new = torch.maximum(m_old, z.amax(1))
            alpha = torch.exp(m_old - m_new)
            # exp in place unless a statistic still needs z after this point
            keep_z = acc.keys() & {"expected_logit", "sum_logit", "max_other"}
            e = (z.sub(m_new[:, None]) if keep_z else z.sub_(m_new[:, None])).exp_()
            s[rows] = s[rows] * alpha + e.sum(1)
            if "expected_logit" in acc:     # sum exp(z - m) * z, normalised by s at the end
                acc["expected_logit"][rows] = acc["expected_logit"][rows] * alpha + torch.linalg.vecdot(e, z)
            if "lse_2z" in acc:             # sum exp(2 (z - m)), turned into log sum exp(2z) at the end
                acc["lse_2z"][rows] = acc["lse_2z"][rows] * alpha * alpha + e.square_().sum(1)
            if "sum_logit" in acc:
                acc["sum_logit"][rows] += z.sum(1)
            if "max_other" in acc:
                z[hit, local] = float("-inf")
                acc["max_other"][rows] = torch.maximum(acc["max_other"][rows], z.amax(1))
            m[rows] = m_new
    lse = m + torch.log(s)
    if "expected_logit" in acc:
        acc["expected_logit"] /= s
    if "lse_2z" in acc:
        acc["lse_2z"] = torch.log(acc["lse_2z"]) + 2 * m
    return label_logit, lse, acc


def linear_backward(hidden, weight, bias, labels, lse, grad, transform, needs, filter_eps=None, deterministic=False):
    """See ``fastdpo.kernels.linear_backward``: (d_hidden, d_weight, d_bias), None where not needed.

    Always exact and deterministic: ``filter_eps`` is ignored (a whole fp32 tile goes through one GEMM, so
    skipping parts of it would save nothing).
    """
    n, d = hidden.shape
    v = weight.shape[0]
    need_dh, need_dw, need_db = needs
    n_tile, v_chunk = _tiles(n, v, d, weight.dtype)
    dev = hidden.device
    h32 = hidden.float()
    g = grad.float()
    dh = torch.zeros(n, d, device=dev) if need_dh else None
    dw = torch.zeros(v, d, device=dev, dtype=weight.dtype) if need_dw else None
    db = torch.zeros(v, device=dev) if need_db else None
    buffer = torch.empty(n_tile, v_chunk, device=dev)
    for v0 in range(0, v, v_chunk):
        v1 = min(v, v0 + v_chunk)
        w, b = _weight_chunk(weight, bias, v0, v1)
        # fp32 accumulator for this chunk of the weight gradient (the gradient itself when fp32)
        dw_acc = None
        if need_dw:
            dw_acc = dw[v0:v1] if dw.dtype == torch.float32 else torch.zeros(v1 - v0, d, device=dev)
        for n0 in range(0, n, n_tile):
            n1 = min(n, n0 + n_tile)
            rows = slice(n0, n1)
            z = _logit_tile(h32[rows], w, b, transform, buffer)
            scale = transform.grad_scale(z)
            dz = z.sub_(lse[rows, None]).exp_().mul_(-g[rows, None])      # -g * softmax, in place
            hit, local = _local_labels(labels[rows], v0, v1)
            dz[hit, local] += g[rows][hit]
            if not (isinstance(scale, float) and scale == 1.0):   # the identity transform needs no pass
                dz.mul_(scale)
            if need_dh:
                dh[rows].addmm_(dz, w)
            if need_dw:
                dw_acc.addmm_(dz.T, h32[rows])
            if need_db:
                db[v0:v1] += dz.sum(0)
        if need_dw and dw.dtype != torch.float32:
            dw[v0:v1] = dw_acc
    return (
        dh.to(hidden.dtype) if need_dh else None,
        dw,
        db.to(bias.dtype) if need_db else None,
    )


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
