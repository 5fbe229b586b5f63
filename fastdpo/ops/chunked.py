"""Vocabulary-chunked linear log-probs: the LM head's logits one [tokens × vocabulary] chunk at a time.

Per chunk of ``v_chunk`` vocabulary rows (and ``n_tile`` tokens where N is too large for one tile: ``chunk_plan``), the raw
logits ``z = h·W_cᵀ`` are one GEMM written in fp32 into a reused scratch tile; a row step turns the tile into the
running logsumexp (forward) or, in place, into ``dz`` in the GEMM operand dtype (backward); then ``dH += dz·W_c``
into an fp32 running sum and ``dW_c = dzᵀ·h`` are two more GEMMs. 8·N·H·V FLOP with the forward (one recompute),
6·N·H·V without d weight; beyond the inputs and gradients, the scratch tile plus, for 16-bit hidden states, one fp32
[N, H] running sum of d hidden. The fixed chunk order makes every result bitwise reproducible.

Precision (measured on the CPU against float64, peaked logits up to |z| 31): logits rounded to bf16 before the
softmax put d hidden 2e-2 from float64, over the bf16 bound, hence fp32 logit tiles; a bf16 running sum of d hidden
misses it too (1.1e-2 in ``shared/DESIGN.md``'s emulation), hence the fp32 one.

Where the GEMMs run: on CUDA with the inputs' dtype as operands (tensor cores; fp32 outputs through ``out_dtype``);
elsewhere in fp32 (these CPUs have no 16-bit units). The row steps are PyTorch ops (``torch_backend.STEPS``) or Triton
kernels (``fastdpo.kernels.logit_chunks``), the only difference between the ``torch`` and ``chunked`` backends.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .transform import LogitTransform

SCRATCH_BYTES = {"cuda": 64 << 20, "cpu": 32 << 20}   # the CPU row steps allocate one more tile under a transform
ALIGN = 128     # vocabulary rows per chunk in multiples of a GEMM tile
#: Fewest vocabulary rows per chunk: below it the d hidden GEMM (K = the chunk) moves its fp32 running sum in and
#: out (8·N·H bytes a chunk) in more time than its 2·N·H·v_chunk FLOP take (``benchmarks/results/roofline.md``).
MIN_CHUNK = 1024


@dataclass(frozen=True)
class ChunkPlan:
    """Tokens per tile and vocabulary rows per chunk: ``n_tile · v_chunk`` fp32 values fit ``scratch_bytes``."""

    n_tile: int
    v_chunk: int


def chunk_plan(n: int, v: int, h: int, scratch_bytes: int) -> ChunkPlan:
    """All N tokens in one tile while that leaves at least ``MIN_CHUNK`` vocabulary rows a chunk (the d weight GEMM
    then writes each chunk once); beyond that, token tiles, and the fp32 d weight chunk that sums them takes its
    share of ``scratch_bytes``."""
    v_chunk = min(v, max(MIN_CHUNK, scratch_bytes // (4 * max(n, 1)) // ALIGN * ALIGN))
    if n * v_chunk * 4 <= scratch_bytes:
        return ChunkPlan(n, v_chunk)
    logits = max(scratch_bytes - 4 * v_chunk * h, scratch_bytes // 2)
    return ChunkPlan(max(1, min(n, logits // (4 * v_chunk))), v_chunk)


@dataclass
class LseState:
    """Per-row running state of the forward sweep, [N] fp32 each: max ``m``, ``s = Σ exp(z − m)``, the label logit
    and the statistic primitives' running sums (see ``fastdpo.ops.linear_logps.STATS``)."""

    m: torch.Tensor
    s: torch.Tensor
    label_logit: torch.Tensor
    primitives: dict[str, torch.Tensor]

    @classmethod
    def start(cls, n: int, primitives: tuple[str, ...], device) -> LseState:
        def full(value):
            return torch.full((n,), value, device=device, dtype=torch.float32)

        return cls(full(float("-inf")), full(0.0), full(0.0),
                   {p: full(float("-inf") if p == "max_other" else 0.0) for p in primitives})

    def rows(self, n0: int, n1: int) -> LseState:
        """A view of rows [n0, n1): the row steps update it in place."""
        return LseState(self.m[n0:n1], self.s[n0:n1], self.label_logit[n0:n1],
                        {k: t[n0:n1] for k, t in self.primitives.items()})

    def finish(self) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """(label_logit, lse, {primitive: [N]}) in the backends' ``linear_forward`` form."""
        lse = self.m + torch.log(self.s)
        out = dict(self.primitives)
        if "expected_logit" in out:
            out["expected_logit"] = out["expected_logit"] / self.s
        if "lse_2z" in out:
            out["lse_2z"] = torch.log(out["lse_2z"]) + 2 * self.m
        return self.label_logit, lse, out


@dataclass(frozen=True)
class RowSteps:
    """The two memory-bound passes over a raw fp32 logit tile (signatures in ``fastdpo.kernels.logit_chunks``):
    ``update_lse(z, bias, labels, v0, transform, state)`` and
    ``logits_grad_(z, bias, labels, v0, lse, grad, transform, dtype) -> dz``."""

    update_lse: Callable[..., None]
    logits_grad_: Callable[..., torch.Tensor]


def operand_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    return dtype if device.type == "cuda" else torch.float32


def _gemm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, accumulate: bool = False) -> torch.Tensor:
    """``out = a @ b`` or ``out += a @ b``, accumulated in ``out``'s dtype (fp32 from 16-bit operands on CUDA)."""
    cast = {} if a.dtype == out.dtype else {"out_dtype": out.dtype}
    if accumulate:
        return torch.addmm(out, a, b, out=out, **cast)
    return torch.mm(a, b, out=out, **cast)


def _tile(scratch: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    return scratch[: rows * cols].view(rows, cols)


def _chunks(n: int, v: int, plan: ChunkPlan):
    for v0 in range(0, v, plan.v_chunk):
        yield v0, min(v, v0 + plan.v_chunk), [(n0, min(n, n0 + plan.n_tile)) for n0 in range(0, n, plan.n_tile)]


def linear_forward(hidden, weight, bias, labels, transform: LogitTransform, primitives, steps: RowSteps,
                   scratch_bytes: int | None = None):
    """(label_logit [N] fp32, lse [N] fp32, {primitive: [N] fp32}) of ``transform(hidden @ weight.T + bias)``;
    hidden [N, H], weight [V, H], bias [V] or None, labels [N] in [0, V); ``steps`` supplies ``update_lse``."""
    (n, d), v, dev = hidden.shape, weight.shape[0], hidden.device
    plan = chunk_plan(n, v, d, scratch_bytes or SCRATCH_BYTES.get(dev.type, SCRATCH_BYTES["cuda"]))
    op = operand_dtype(hidden.dtype, dev)
    h = hidden.to(op)
    state = LseState.start(n, tuple(primitives), dev)
    scratch = torch.empty(plan.n_tile * plan.v_chunk, device=dev, dtype=torch.float32)
    for v0, v1, tiles in _chunks(n, v, plan):
        w = weight[v0:v1].to(op)
        b = bias[v0:v1] if bias is not None else None
        for n0, n1 in tiles:
            z = _gemm(h[n0:n1], w.T, _tile(scratch, n1 - n0, v1 - v0))
            steps.update_lse(z, b, labels[n0:n1], v0, transform, state.rows(n0, n1))
    return state.finish()


def linear_backward(hidden, weight, bias, labels, lse, grad, transform: LogitTransform, needs, steps: RowSteps,
                    scratch_bytes: int | None = None):
    """Gradients of ``sum(grad * logp)``: (d_hidden, d_weight, d_bias) in the inputs' dtypes, None where not in
    ``needs`` (hidden, weight, bias). lse, grad: [N] fp32; ``steps`` supplies ``logits_grad_``."""
    n, d = hidden.shape
    v, dev = weight.shape[0], hidden.device
    need_dh, need_dw, need_db = needs
    plan = chunk_plan(n, v, d, scratch_bytes or SCRATCH_BYTES.get(dev.type, SCRATCH_BYTES["cuda"]))
    op = operand_dtype(hidden.dtype, dev)
    h = hidden.to(op)
    scratch = torch.empty(plan.n_tile * plan.v_chunk, device=dev, dtype=torch.float32)
    dh = torch.empty(n, d, device=dev, dtype=torch.float32) if need_dh else None
    dw = torch.empty(v, d, device=dev, dtype=weight.dtype) if need_dw else None
    db = torch.zeros(v, device=dev, dtype=torch.float32) if need_db else None
    # d weight goes straight into its rows when one GEMM per chunk produces them in the operand dtype; otherwise
    # into an fp32 chunk (the gradient itself when fp32) that sums the token tiles.
    direct_dw = need_dw and plan.n_tile == n and dw.dtype == op
    dw_acc = None
    if need_dw and not direct_dw and dw.dtype != torch.float32:
        dw_acc = torch.empty(plan.v_chunk, d, device=dev, dtype=torch.float32)
    for v0, v1, tiles in _chunks(n, v, plan):
        w = weight[v0:v1].to(op)
        b = bias[v0:v1] if bias is not None else None
        dw_c = None
        if need_dw:
            dw_c = dw[v0:v1] if direct_dw or dw_acc is None else dw_acc[: v1 - v0]
        for n0, n1 in tiles:
            z = _gemm(h[n0:n1], w.T, _tile(scratch, n1 - n0, v1 - v0))
            dz = steps.logits_grad_(z, b, labels[n0:n1], v0, lse[n0:n1], grad[n0:n1], transform, op)
            if need_dh:
                _gemm(dz, w, dh[n0:n1], accumulate=v0 > 0)
            if need_dw:
                _gemm(dz.T, h[n0:n1], dw_c, accumulate=n0 > 0)
            if need_db:
                db[v0:v1] += dz.sum(0, dtype=torch.float32)
        if dw_acc is not None:
            dw[v0:v1].copy_(dw_c)
    return (
        dh.to(hidden.dtype) if need_dh else None,
        dw,
        db.to(bias.dtype) if need_db else None,
    )
