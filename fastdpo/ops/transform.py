"""The logit transform applied between the LM-head projection and the log-softmax.

Order (the one transformers uses for the models that have these knobs):

1. ``z = hidden @ weight.T + bias``
2. ``z = z * logit_scale``                       (Cohere: ``logits * self.logit_scale``)
3. ``z = softcap * tanh(z / softcap)``           (Gemma-2/3: ``final_logit_softcapping``)
4. ``z = z / temperature``                       (sampling temperature, as TRL divides logits by it)

The Triton kernels implement the same steps in ``fastdpo.kernels.tiles`` (``apply_transform``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LogitTransform:
    """Scalar parameters of the logit transform; the identity by default.

    Raises:
        ValueError: ``logit_scale`` not finite and non-zero, ``temperature`` not finite and positive, or
            ``softcap`` not ``None`` / finite positive.
    """

    logit_scale: float = 1.0
    softcap: float | None = None
    temperature: float = 1.0

    def __post_init__(self) -> None:
        if not math.isfinite(self.logit_scale) or self.logit_scale == 0:
            raise ValueError(f"logit_scale must be finite and non-zero, got {self.logit_scale}")
        if self.softcap is not None and not (math.isfinite(self.softcap) and self.softcap > 0):
            raise ValueError(f"softcap must be None or a finite positive number, got {self.softcap}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"temperature must be a finite positive number, got {self.temperature}")

    @property
    def inv_temperature(self) -> float:
        return 1.0 / self.temperature

    def apply(self, z: torch.Tensor) -> torch.Tensor:
        """Transformed logits; ``z`` is the raw projection (bias included), any shape, float."""
        if self.logit_scale != 1.0:
            z = z * self.logit_scale
        if self.softcap is not None:
            z = torch.tanh(z / self.softcap) * self.softcap
        if self.temperature != 1.0:
            z = z * self.inv_temperature
        return z

    def grad_scale(self, z_out: torch.Tensor) -> torch.Tensor | float:
        """d(transformed)/d(raw) as a function of the transformed logits ``z_out``.

        Soft-capping's derivative ``1 - tanh(u)^2`` is recovered from its output, so the backward
        needs no second copy of the raw logits.
        """
        scale = self.logit_scale * self.inv_temperature
        if self.softcap is None:
            return scale
        t = z_out * (self.temperature / self.softcap)
        return (1.0 - t * t) * scale
