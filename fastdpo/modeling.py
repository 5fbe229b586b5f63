"""Packed micro-batch -> model backbone -> fused label log-probs -> per-sequence sums."""

from __future__ import annotations

import torch

from .batch_logps import sequence_logps
from .linear_logps import linear_logps


def _causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers CausalLM inside DDP/FSDP and PEFT wrappers (PEFT layers stay in place)."""
    while hasattr(model, "module") and not hasattr(model, "get_decoder"):
        model = model.module
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def logit_transform(config) -> dict:
    """The model's own logit transform (Cohere ``logit_scale``, Gemma-2 ``final_logit_softcapping``)."""
    return {"logit_scale": getattr(config, "logit_scale", None) or 1.0,
            "softcap": getattr(config, "final_logit_softcapping", None)}


def packed_sequence_logps(model: torch.nn.Module, batch: dict, *, average: bool = False,
                          stats: tuple[str, ...] = ()) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Summed label log-probs of every chosen and rejected sequence in a packed micro-batch.

    The model's own forward runs (so DDP's gradient synchronisation, PEFT adapters and their
    disabling, and gradient checkpointing all apply) with ``logits_to_keep=1``, which leaves its LM
    head a single position; the backbone's final hidden states are taken from the decoder by a
    forward hook. ``position_ids`` restart per sequence and no attention mask is passed: with
    ``use_cache=False`` transformers derives the document mask from the position ids for every
    attention implementation (block-diagonal causal for sdpa/eager, a ``BlockMask`` for
    flex_attention, varlen for flash-attention), so attention never crosses a sequence boundary.
    Only the hidden states that predict completion tokens reach ``fastdpo.linear_logps``, with the
    model's head weight, bias and logit transform.

    Args:
        model: a transformers causal LM, possibly wrapped by PEFT or DDP.
        batch: a micro-batch from ``fastdpo.packing.pack_pairs`` on the model's device.
        average: per-sequence mean instead of sum (length-normalised losses).
        stats: per-token statistics of ``linear_logps`` to return.

    Returns:
        (chosen_logps [B], rejected_logps [B], {stat: [N] per-token values}), float32.
    """
    lm = _causal_lm(model)
    captured = []
    hook = lm.get_decoder().register_forward_hook(lambda _module, _args, out: captured.append(out[0]))
    try:
        model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False, logits_to_keep=1)
    finally:
        hook.remove()
    hidden = captured[-1]
    head = lm.get_output_embeddings()
    result = linear_logps(
        hidden[0, batch["logit_index"]], head.weight, batch["targets"], head.bias,
        stats=stats, **logit_transform(lm.config),
    )
    token_logps, token_stats = result if stats else (result, {})
    seq = sequence_logps(token_logps, batch["label_cu_seqlens"], average=average)
    return seq[0::2], seq[1::2], token_stats
