"""The reference log-probs of a micro-batch, by a strategy resolved once when the trainer is built: none, a
separate frozen model (given, or a copy of a fully fine-tuned policy), a second frozen PEFT adapter, the PEFT
policy with its adapters disabled, or values precomputed into the dataset (``fastdpo.train.reference_cache``)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from contextlib import contextmanager
from typing import TypeVar

import torch

from ..data import PackedBatch
from ..data.packing import REF_COLUMNS
from ..models import causal_lm, is_peft
from .forward import packed_sequence_logps

Logps = tuple[torch.Tensor, torch.Tensor]
T = TypeVar("T")


class _LiveReference:
    """A reference that runs a forward: ``run`` calls a function of the model with the reference's weights in place."""

    ld_alpha: float | None

    def run(self, policy: torch.nn.Module, forward: Callable[[torch.nn.Module], T]) -> T:
        raise NotImplementedError

    def logps(self, policy: torch.nn.Module, batch: PackedBatch) -> Logps:
        """The (chosen [B], rejected [B]) log-probs of a batch of pairs."""
        return self.run(policy, lambda model: packed_sequence_logps(model, batch, ld_alpha=self.ld_alpha))


class ReferenceModel(_LiveReference):
    """A separate frozen reference model (``ref_model``, or a copy of the policy)."""

    description = "a separate frozen model"

    def __init__(self, model: torch.nn.Module, ld_alpha: float | None = None):
        self.model, self.ld_alpha = model.requires_grad_(False).eval(), ld_alpha

    def run(self, policy: torch.nn.Module, forward: Callable[[torch.nn.Module], T]) -> T:
        return forward(self.model)


class AdapterReference(_LiveReference):
    """The PEFT policy with a second, frozen adapter active (``ref_adapter_name``) or with its adapters disabled
    (``ref_adapter_name`` None); ``unwrap`` maps the Trainer's (DDP-wrapped) model to the PeftModel."""

    def __init__(self, unwrap: Callable, ld_alpha: float | None = None, ref_adapter_name: str | None = None,
                 model_adapter_name: str | None = None):
        self.unwrap, self.ld_alpha = unwrap, ld_alpha
        self.ref_adapter_name, self.model_adapter_name = ref_adapter_name, model_adapter_name
        self.description = (f"the frozen adapter {ref_adapter_name!r}" if ref_adapter_name
                            else "the policy with its adapters disabled")

    def run(self, policy: torch.nn.Module, forward: Callable[[torch.nn.Module], T]) -> T:
        peft_model = self.unwrap(policy)
        context = (reference_adapter(peft_model, self.ref_adapter_name, self.model_adapter_name)
                   if self.ref_adapter_name else peft_model.disable_adapter())
        with context:
            return forward(policy)


class PrecomputedReference:
    """Reference log-probs read from the batch (``ref_chosen_logps``/``ref_rejected_logps`` columns of the dataset,
    from ``precompute_ref_log_probs`` or the user's own, as TRL takes them); a batch without them goes to
    ``fallback`` (None once the reference model is released)."""

    description = "precomputed log-probs"

    def __init__(self, fallback: ReferenceModel | AdapterReference | None = None):
        self.fallback = fallback

    @property
    def model(self) -> torch.nn.Module | None:
        return getattr(self.fallback, "model", None)

    def logps(self, policy: torch.nn.Module, batch: PackedBatch) -> Logps:
        if set(REF_COLUMNS) <= set(batch.row_values):
            return tuple(batch.row_values[c] for c in REF_COLUMNS)
        return self._live().logps(policy, batch)

    def run(self, policy: torch.nn.Module, forward: Callable[[torch.nn.Module], T]) -> T:
        """``forward`` run by the fallback, for a batch without the precomputed columns."""
        return self._live().run(policy, forward)

    def _live(self) -> ReferenceModel | AdapterReference:
        if self.fallback is None:
            raise ValueError("this micro-batch carries no precomputed reference log-probs and the reference model "
                             "was released (precompute_ref_log_probs=True): give every dataset its reference columns")
        return self.fallback


Reference = ReferenceModel | AdapterReference | PrecomputedReference


def resolve_reference(model: torch.nn.Module, ref_model: torch.nn.Module | None, unwrap: Callable, *,
                      ld_alpha: float | None = None, ref_adapter_name: str | None = None,
                      model_adapter_name: str | None = None) -> ReferenceModel | AdapterReference:
    """The live reference, in TRL's order of precedence: ``ref_model``; the reference adapter ``ref_adapter_name``;
    a PEFT policy's disabled adapters; a frozen copy of the policy. ``ld_alpha``: LD-DPO's α for ``logps``."""
    if ref_model is not None:
        return ReferenceModel(ref_model, ld_alpha)
    if is_peft(model):
        return AdapterReference(unwrap, ld_alpha, ref_adapter_name, model_adapter_name)
    return ReferenceModel(copy.deepcopy(causal_lm(model)), ld_alpha)


def reference_logps(reference: Reference | None, policy: torch.nn.Module, batch: PackedBatch) -> Logps | None:
    """The (chosen [B], rejected [B]) reference log-probs, without gradient, or None without a reference."""
    if reference is None:
        return None
    with torch.no_grad():
        return reference.logps(policy, batch)


@contextmanager
def reference_adapter(peft_model, ref_adapter_name: str, model_adapter_name: str):
    """Run the enclosed forward with ``ref_adapter_name`` as the active adapter, then reactivate
    ``model_adapter_name`` (TRL <= 0.28 ``DPOTrainer.null_ref_context``).

    peft's ``set_adapter(name)`` makes ``name``'s weights trainable and every other adapter's frozen; the
    reference is activated with ``inference_mode=True`` so its weights never get ``requires_grad``, and
    reactivating the train adapter restores its ``requires_grad`` before the backward.

    Raises:
        ValueError: (peft) an adapter name that is not loaded.
    """
    peft_model.set_adapter(ref_adapter_name, inference_mode=True)
    try:
        yield
    finally:
        peft_model.set_adapter(model_adapter_name)
