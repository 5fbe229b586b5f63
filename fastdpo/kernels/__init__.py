"""Triton kernels of fastdpo (no autograd): the backend behind ``fastdpo`` on CUDA.

Import only where Triton can run: on a GPU, or on the CPU with ``TRITON_INTERPRET=1`` set before
Triton is first imported.
"""

from .linear_backward import linear_backward
from .linear_lse_forward import linear_forward
from .logits_logps import logits_backward, logits_forward

__all__ = ["linear_forward", "linear_backward", "logits_forward", "logits_backward"]
