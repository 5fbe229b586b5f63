"""TRL 1.x's DPOTrainer computing its log-probs through fastdpo's fused op.

TRL 1.16 gives its models a fused LM head (``trl.trainer.utils.add_fused_lm_head``): called with
``fused_lm_head=True``, the forward runs the backbone and hands the hidden states at label
positions to ``trl.trainer.utils._ChunkedLogProbFunction`` (cuBLAS tiles, torch fold on CPU). ``patch_dpo_trainer``
swaps that function for ``fastdpo.linear_logps`` on the trainer's policy and reference models
only; TRL's data path, losses and metrics stay TRL's own.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import inspect
import types

from packaging.specifiers import SpecifierSet
from packaging.version import Version

from ..models.wrappers import causal_lm
from ..ops import linear_logps_with_stats

#: TRL versions whose fused-head contract this module was checked against (see ``_check_contract``).
SUPPORTED_TRL = SpecifierSet(">=1.16,<2")

# TRL's optional per-token outputs, in the order its function returns them after log_probs, and
# the fastdpo statistic computing each.
_TRL_OUTPUTS = {"entropy": "entropy", "log_sum_sq_probs": "log_sum_p2", "mean_logits": "mean_logit",
                "is_top1": "is_argmax"}
_TRL_SIGNATURE = ["ctx", "hidden", "weight", "bias", "targets", "temperature", "chunk_size",
                  "final_logit_softcapping", "logit_scale", "outputs"]


class FastdpoLogProbFunction:
    """Stands in for ``trl.trainer.utils._ChunkedLogProbFunction``: same ``apply`` arguments and outputs."""

    @staticmethod
    def apply(hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping=None,
              logit_scale=1.0, outputs=tuple(_TRL_OUTPUTS)):
        stats = tuple(_TRL_OUTPUTS[name] for name in _TRL_OUTPUTS if name in outputs)
        logps, values = linear_logps_with_stats(hidden, weight, targets, stats, bias, logit_scale=logit_scale,
                                                softcap=final_logit_softcapping, temperature=temperature)
        return (logps, *(values.get(_TRL_OUTPUTS[name]) for name in _TRL_OUTPUTS))


def _check_contract():
    """The TRL internals the patch relies on, checked so that another version fails loudly."""
    version = Version(importlib.metadata.version("trl"))
    if version not in SUPPORTED_TRL:
        raise RuntimeError(f"fastdpo.integrations.trl supports trl{SUPPORTED_TRL}, found trl {version}")
    import trl.trainer.utils as trl_utils

    original = getattr(trl_utils, "_ChunkedLogProbFunction", None)
    if original is None or list(inspect.signature(original.forward).parameters) != _TRL_SIGNATURE:
        raise RuntimeError(f"trl {version}'s fused LM head does not have the interface fastdpo patches "
                           "(trl.trainer.utils._ChunkedLogProbFunction.forward)")
    return trl_utils


def _route_fused_head(model, trl_utils) -> None:
    lm = causal_lm(model)
    fused = lm.forward
    if getattr(getattr(fused, "__func__", None), "__code__", None) is None \
            or fused.__func__.__code__.co_name != "_fused_forward":
        raise RuntimeError(f"{type(lm).__name__} has no TRL fused LM head (trl.trainer.utils.add_fused_lm_head)")

    @functools.wraps(fused)
    def forward(self, *args, **kwargs):
        with _swapped(trl_utils, "_ChunkedLogProbFunction", FastdpoLogProbFunction):
            return fused(*args, **kwargs)

    lm.forward = types.MethodType(forward, lm)


@contextlib.contextmanager
def _swapped(module, name, value):
    saved = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, saved)


def patch_dpo_trainer(trainer):
    """Make a ``trl.DPOTrainer`` compute its per-token log-probs with ``fastdpo.linear_logps``.

    Patches the fused LM head of ``trainer.model`` and, when present, ``trainer.ref_model`` (the PEFT
    adapter-disabled reference shares the policy's head). Everything else — data, losses, metrics —
    stays TRL's. Call it after constructing the trainer and before ``train()``.

    Returns:
        The same trainer.

    Raises:
        RuntimeError: a TRL version outside ``SUPPORTED_TRL``, or one whose fused-head internals
            differ from those checked here; a model without TRL's fused head. Never a silent fallback.
    """
    trl_utils = _check_contract()
    for model in (trainer.model, getattr(trainer, "ref_model", None)):
        if model is not None:
            _route_fused_head(model, trl_utils)
    return trainer
