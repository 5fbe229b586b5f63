"""LoRA/QLoRA adapters: wrapping a model in new ones, or in a saved one (optionally twice, as the reference)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .vision import encoder_names, encoder_pattern

if TYPE_CHECKING:
    import peft
    import transformers


def apply_lora(
    model: transformers.PreTrainedModel,
    *,
    r: int = 16,
    alpha: int = 32,
    dropout: float = 0.05,
    target_modules: list[str] | str | None = None,
    quantized: bool = False,
    train_vision: bool = False,
) -> peft.PeftModel:
    """Wrap ``model`` in LoRA adapters; only the adapters train. A vision-language model's adapters go on its
    language model only: its vision tower and projector stay frozen, or with ``train_vision`` train in full (peft's
    ``modules_to_save``: saved with the adapter).

    Args:
        model: a ``transformers.PreTrainedModel`` (modified in place by peft).
        target_modules: peft's choice of modules (names or a regex); None means "all-linear",
            every linear layer except the LM head.
        quantized: ``model`` was loaded in 4 bits; prepare it with
            ``peft.prepare_model_for_kbit_training`` (no gradient checkpointing) first.
        train_vision: train a vision-language model's vision tower and projector too.

    Raises:
        ValueError: ``target_modules`` selects the LM head, whose raw weight fastdpo's log-probs read;
            ``train_vision`` for a text model, or with ``quantized`` (the tower's weights are 4-bit).
    """
    import peft
    from peft.tuners.tuners_utils import check_target_module_exists

    encoder = encoder_names(model)
    if train_vision and (not encoder or quantized):
        raise ValueError("train_vision trains a vision-language model's vision tower in full: "
                         + ("this model has none" if not encoder else "its 4-bit weights cannot train; load it "
                            "without load_in_4bit"))
    config = peft.LoraConfig(
        task_type="CAUSAL_LM", r=r, lora_alpha=alpha, lora_dropout=dropout,
        target_modules=target_modules if target_modules is not None else "all-linear",
        exclude_modules=None if train_vision else encoder_pattern(model), modules_to_save=encoder if train_vision else None,
    )
    head_name = _lm_head_name(model)
    if check_target_module_exists(config, head_name):
        raise ValueError(
            f"target_modules={target_modules!r} selects the LM head {head_name!r}; fastdpo computes "
            "log-probs from the LM head's raw weight, so it cannot carry a LoRA adapter"
        )
    if quantized:
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return peft.get_peft_model(model, config)


def load_lora_adapter(
    model: transformers.PreTrainedModel,
    path: str,
    *,
    adapter_name: str = "default",
    ref_adapter_name: str | None = None,
    quantized: bool = False,
) -> peft.PeftModel:
    """Wrap ``model`` in a saved adapter to train further, optionally loaded a second time, frozen, as the
    reference (the two-adapter reference of TRL's PEFT docs: ``DPOConfig.ref_adapter_name``).

    Args:
        model: the base model the adapter was trained on (modified in place by peft).
        path: a directory written by ``PeftModel.save_pretrained`` (e.g. by ``fastdpo train --use-peft``).
        adapter_name: the trainable copy's name (``DPOConfig.model_adapter_name``).
        ref_adapter_name: the frozen copy's name, or None for no second copy.
        quantized: as ``apply_lora``.

    Raises:
        ValueError: ``ref_adapter_name == adapter_name``, or a name that is an ``nn.Module`` attribute (such as
            "train"); peft's errors for a missing or mismatched adapter.
    """
    import peft

    if ref_adapter_name == adapter_name:
        raise ValueError(f"the reference adapter needs its own name, not the trained adapter's {adapter_name!r}")
    for name in (adapter_name, ref_adapter_name):
        if name is not None and hasattr(torch.nn.ModuleDict, name):
            # peft keys each layer's nn.ModuleDicts by adapter name; add_module refuses a method's name.
            raise ValueError(f"adapter name {name!r} is an nn.Module attribute, which peft cannot use as an adapter "
                             "name: choose another (e.g. 'policy')")
    if quantized:
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = peft.PeftModel.from_pretrained(model, path, adapter_name=adapter_name, is_trainable=True)
    if ref_adapter_name is not None:
        model.load_adapter(path, adapter_name=ref_adapter_name, is_trainable=False)
    return model


def _lm_head_name(model: transformers.PreTrainedModel) -> str:
    head = model.get_output_embeddings()
    return next((name for name, module in model.named_modules() if module is head), "lm_head")
