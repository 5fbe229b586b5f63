"""The ``chunked`` backend, CUDA's default: the vocabulary-chunked path (``fastdpo.ops.chunked``: cuBLAS GEMMs through
``torch.mm``) with its row steps as Triton kernels (``fastdpo.kernels.logit_chunks``), and the Triton row-wise
log-softmax over given logits. Same interface as ``fastdpo.kernels``; exact (``filter_eps`` is ignored: a GEMM
cannot skip the tiles that filtering would drop) and deterministic (a fixed chunk order).
"""

from __future__ import annotations

from ..kernels import logit_chunks, logits_backward, logits_forward
from . import chunked

STEPS = chunked.RowSteps(logit_chunks.update_lse, logit_chunks.logits_grad_)

__all__ = ["linear_forward", "linear_backward", "logits_forward", "logits_backward"]


def linear_forward(hidden, weight, bias, labels, transform, primitives, deterministic=False):
    return chunked.linear_forward(hidden, weight, bias, labels, transform, primitives, STEPS)


def linear_backward(hidden, weight, bias, labels, lse, grad, transform, needs, filter_eps=None, deterministic=False):
    return chunked.linear_backward(hidden, weight, bias, labels, lse, grad, transform, needs, STEPS)
