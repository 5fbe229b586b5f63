"""Picks the implementation behind the fused ops: the Triton kernels or the PyTorch tiles.

``auto`` (the default) takes the Triton kernels for CUDA tensors when Triton imports, and the
PyTorch path otherwise; on CUDA it stays on Triton until a GPU measurement (``benchmarks/gpu_check.py``)
shows the PyTorch path faster somewhere. ``FASTDPO_BACKEND=triton|torch|auto`` or an explicit ``backend=``
argument overrides it; ``triton`` on CPU tensors needs ``TRITON_INTERPRET=1`` set before Triton is imported
(that is how the tests run the kernels without a GPU). Both backends are deterministic: the Triton backward
has no atomics (each program owns the gradient rows it writes) and the PyTorch path has a fixed reduction
order, so ``deterministic=True`` (passed to the backends, or ``torch.use_deterministic_algorithms(True)``) keeps the
choice and only turns off the launch-config autotune (``FASTDPO_AUTOTUNE``), whose pick could differ between
processes.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Protocol

import torch

from . import torch_backend
from .transform import LogitTransform

BACKENDS = ("auto", "triton", "torch")


class Backend(Protocol):
    """What ``fastdpo.kernels`` (Triton) and ``fastdpo.ops.torch_backend`` (PyTorch) both implement; no autograd.

    ``linear_forward``: hidden [N, H], weight [V, H], bias [V] or None, labels [N] int64 in [0, V) ->
    (label_logit [N] fp32, lse [N] fp32, {primitive: [N] fp32}) of the transformed logits.
    ``linear_backward``: the same inputs, lse and grad [N] fp32 (d loss / d logp), needs (dh, dw, db),
    filter_eps (float or None: gradient filtering, see ``linear_logps``; a backend may compute exactly instead),
    deterministic (no launch-config autotune) ->
    (d_hidden, d_weight, d_bias) in the inputs' dtypes, None where not needed.
    ``logits_forward``: logits [R0, V], rows [R] int64, labels [R] -> (logps [R] fp32, lse [R] fp32).
    ``logits_backward``: logits, rows, labels, lse, grad [R] fp32 -> gradient shaped and typed like logits.
    """

    def linear_forward(self, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       labels: torch.Tensor, transform: LogitTransform, primitives: tuple[str, ...],
                       deterministic: bool = False): ...

    def linear_backward(self, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                        labels: torch.Tensor, lse: torch.Tensor, grad: torch.Tensor, transform: LogitTransform,
                        needs: tuple[bool, bool, bool], filter_eps: float | None = None,
                        deterministic: bool = False): ...

    def logits_forward(self, logits: torch.Tensor, rows: torch.Tensor, labels: torch.Tensor): ...

    def logits_backward(self, logits: torch.Tensor, rows: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor,
                        grad: torch.Tensor): ...


def _triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def select(device: torch.device, backend: str | None = None) -> Backend:
    """The backend (``fastdpo.kernels`` or ``fastdpo.ops.torch_backend``) for tensors on ``device``.

    Raises:
        ValueError: unknown backend name, or ``triton`` where it cannot run.
    """
    name = backend or os.environ.get("FASTDPO_BACKEND", "auto")
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    if name == "auto":
        name = "triton" if device.type == "cuda" and _triton_available() else "torch"
    if name == "torch":
        return torch_backend
    if not _triton_available():
        raise ValueError("backend='triton' requested but triton is not installed")
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before triton is imported")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"backend='triton' does not run on {device.type} tensors")
    from .. import kernels

    return kernels
