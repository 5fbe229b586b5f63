"""Picks the implementation behind the fused ops.

* ``chunked`` (``fastdpo.ops.chunked_backend``): vocabulary chunks through cuBLAS GEMMs and Triton row kernels, exact;
  the GEMMs run at the tensor cores' rate, so the step stays near its 8·N·H·V FLOP floor
  (``benchmarks/results/roofline.md``).
* ``triton`` (``fastdpo.kernels``): the fused Triton kernels (the projection inside the kernels, no logit tile in
  memory); the path for gradient filtering, which skips whole tiles of their products.
* ``torch`` (``fastdpo.ops.torch_backend``): the chunked path with PyTorch row steps; CPUs, devices without Triton.

The rule (``auto``, the default): CUDA tensors take ``triton`` when gradient filtering is asked for
(``filter_eps``) and ``chunked`` otherwise, when Triton imports; everything else takes ``torch``. Where the fused
kernels must not launch (``fastdpo.kernels.launch.fused_unsupported``: sm_100 under Triton < 3.9), filtering falls
back to ``chunked`` with a warning and an explicit ``triton`` is refused.
``FASTDPO_BACKEND=chunked|triton|torch|auto`` or an explicit ``backend=`` overrides it; the Triton backends on CPU
tensors need ``TRITON_INTERPRET=1`` set before Triton is imported (that is how the tests run them without a GPU).
Every backend is deterministic (a fixed reduction order; the Triton backward has no atomics), so
``deterministic=True`` (or ``torch.use_deterministic_algorithms(True)``) keeps the choice and only turns off the
launch-config autotune (``FASTDPO_AUTOTUNE``), whose pick could differ between processes.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from typing import Protocol

import torch

from . import torch_backend
from .transform import LogitTransform

BACKENDS = ("auto", "chunked", "triton", "torch")


class Backend(Protocol):
    """What every backend implements (``fastdpo.kernels`` is one); no autograd.

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


def _fused_unsupported(device: torch.device) -> str | None:
    if device.type != "cuda":
        return None
    from ..kernels.launch import fused_unsupported

    major, minor = torch.cuda.get_device_capability(device)
    return fused_unsupported(10 * major + minor)


def select(device: torch.device, backend: str | None = None, filtering: bool = False) -> Backend:
    """The backend for tensors on ``device`` (see the module docstring); ``filtering``: gradient filtering is on.

    Raises:
        ValueError: unknown backend name, or a Triton backend where it cannot run.
    """
    name = backend or os.environ.get("FASTDPO_BACKEND", "auto")
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    if name == "auto":
        name = "torch"
        if device.type == "cuda" and _triton_available():
            name = "triton" if filtering or torch.__version__ < (2, 8) else "chunked"
            if name == "triton" and (why := _fused_unsupported(device)):
                warnings.warn(f"{why}: computing exactly on the chunked backend, without gradient filtering",
                              stacklevel=3)
                name = "chunked"
    if name == "torch":
        return torch_backend
    if not _triton_available():
        raise ValueError(f"backend={name!r} requested but triton is not installed")
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"backend={name!r} on CPU tensors needs TRITON_INTERPRET=1 set before triton is imported")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"backend={name!r} does not run on {device.type} tensors")
    if name == "triton" and (why := _fused_unsupported(device)):
        raise ValueError(f"backend='triton': {why}; use backend='chunked' (exact) or another Triton")
    if name == "chunked":
        if device.type == "cuda" and torch.__version__ < (2, 8):
            raise ValueError("backend='chunked' needs torch >= 2.8 on CUDA (16-bit GEMMs with fp32 outputs, "
                             f"torch.mm(out_dtype=)); this is {torch.__version__}: use backend='triton'")
        from . import chunked_backend

        return chunked_backend
    from .. import kernels

    return kernels
