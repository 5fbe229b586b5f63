"""Seeing through the wrappers around a transformers causal LM (DDP/FSDP ``module``, PEFT)."""

from __future__ import annotations

import torch


def is_peft(model: torch.nn.Module) -> bool:
    """Whether ``model`` is a ``peft.PeftModel`` (checked by its interface, without importing peft)."""
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


def causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers CausalLM inside DDP/FSDP and PEFT wrappers (PEFT layers stay in place)."""
    while hasattr(model, "module") and not hasattr(model, "get_decoder"):
        model = model.module
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model
