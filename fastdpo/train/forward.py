"""Packed micro-batch -> model backbone -> fused label log-probs -> per-sequence sums.

Everything the losses need per token happens here, before the per-sequence sums: LD-DPO's split at
the shorter completion's length, WPO's weights from the ``log_sum_p2`` statistic, and ORPO's NLL over
the chosen prompts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.distributed.tensor import DTensor, Partial

from ..data import PackedBatch
from ..losses import check_ld_alpha
from ..models import causal_lm
from ..models.prefix_attention import attention_inputs
from ..ops import LogitTransform, linear_logps_with_stats, sequence_logps


def logit_transform(config) -> LogitTransform:
    """The model's own logit transform (Cohere ``logit_scale``, Gemma-2 ``final_logit_softcapping``).

    Raises:
        ValueError: a zero or non-finite scale, a non-positive soft-cap (``LogitTransform``'s checks).
    """
    return LogitTransform(logit_scale=getattr(config, "logit_scale", None) or 1.0,
                          softcap=getattr(config, "final_logit_softcapping", None))


@dataclass
class LabelLogps:
    """What one forward of a packed stream gives (``label_logps``)."""

    logps: torch.Tensor                  # [M] fp32 log p(targets[j]) at stream positions index[j], differentiable
    stats: dict[str, torch.Tensor]       # the requested per-token statistics of fastdpo.linear_logps, each [M]
    aux_loss: torch.Tensor | None        # scalar MoE router load-balancing loss (None: a dense model)


def label_logps(model: torch.nn.Module, batch: PackedBatch, index: torch.Tensor | None = None,
                targets: torch.Tensor | None = None, stats: tuple[str, ...] = ()) -> LabelLogps:
    """One forward of the packed stream: ``log p(targets[j])`` at stream positions ``index[j]`` (default: the batch's
    scored tokens, ``logit_index`` and ``targets``), the requested per-token statistics and the forward's
    ``aux_loss`` (the MoE router load-balancing loss of a model whose config sets ``output_router_logits``).

    The model's own forward runs (so DDP's gradient synchronisation, PEFT adapters and their
    disabling, and gradient checkpointing all apply) with ``logits_to_keep=1``, which leaves its LM
    head a single position; the backbone's final hidden states are taken from the decoder by a
    forward hook. Unshared layout: ``position_ids`` restart per sequence and no attention mask is passed:
    with ``use_cache=False`` transformers derives the document mask from the position ids for every
    attention implementation (block-diagonal causal for sdpa/eager, a ``BlockMask`` for
    flex_attention, varlen for flash-attention; ``packed_sdpa``, ``fastdpo.models.attention``, splits the
    stream there), so attention never crosses a sequence boundary. Streams with branches (``batch.segments``):
    ``fastdpo.models.prefix_attention.attention_inputs`` adds the masks or the segment layout the model's
    attention implementation needs, or raises ``ValueError`` for one that has no shared-prefix path.
    Only the hidden states at ``index`` reach ``fastdpo.linear_logps``, with the model's head weight,
    bias and logit transform (an FSDP2-sharded head gathered first, ``_gathered``); an index listed twice (the
    last prompt position, predicting both first completion tokens) gets the sum of both gradients.
    ``logits_to_keep`` only trims the LM head's input: the routers see every token of the stream (so with a
    shared prefix each prompt token is routed once, not twice), and as the stream has no padding, the aux loss
    needs no attention mask.
    """
    index = batch.logit_index if index is None else index
    targets = batch.targets if targets is None else targets
    lm = causal_lm(model)
    attention = {} if batch.segments is None else attention_inputs(
        lm.config, batch.position_ids, batch.segments, lm.get_input_embeddings().weight.dtype)
    captured = []
    hook = lm.get_decoder().register_forward_hook(lambda _module, _args, out: captured.append(out[0]))
    try:
        output = model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False,
                       logits_to_keep=1, **attention)
    finally:
        hook.remove()
    head = lm.get_output_embeddings()
    transform = logit_transform(lm.config)
    logps, stats = linear_logps_with_stats(captured[-1][0, index], _gathered(head.weight), targets, stats,
                                           _gathered(head.bias), logit_scale=transform.logit_scale,
                                           softcap=transform.softcap, temperature=transform.temperature)
    return LabelLogps(logps, stats, getattr(output, "aux_loss", None))


def _gathered(param: torch.Tensor | None) -> torch.Tensor | None:
    """The whole of an FSDP2-sharded head parameter, differentiably.

    FSDP2 keeps the root module's parameters (embeddings, final norm, a head not sharded on its own)
    gathered after the forward, so the head usually arrives whole. A head sharded as its own FSDP unit is
    a ``DTensor`` shard again once its forward ends; it is all-gathered here, and its gradient goes back
    as FSDP's own does: averaged over the ranks and scattered to the shards.
    """
    if not isinstance(param, DTensor):
        return param
    return param.full_tensor(grad_placements=[Partial("avg")] * param.device_mesh.ndim)


def _lengths(cu_seqlens: torch.Tensor) -> torch.Tensor:
    return (cu_seqlens[1:] - cu_seqlens[:-1]).long()


def ld_pair_logps(token_logps: torch.Tensor, label_cu_seqlens: torch.Tensor,
                  ld_alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """LD-DPO's length-desensitised sums (Liu et al. 2024, "Length Desensitization in Direct Preference Optimization"):
    per pair, the tokens up to the shorter completion's length count fully and the rest of the longer
    one with weight α, ``shared + α · tail`` (TRL 1.16 ``DPOTrainer._compute_loss``, for the policy and the
    reference alike).

    Args:
        token_logps: [N] float, the label log-probs of 2B completions back to back (chosen_0, rejected_0,
            chosen_1, ...).
        label_cu_seqlens: [2B + 1] int cumulative completion lengths.
        ld_alpha: α in [0, 1]; 1 gives the plain sums.

    Returns:
        (chosen [B], rejected [B]) in ``token_logps``' dtype, differentiable.

    Raises:
        ValueError: ``ld_alpha`` outside [0, 1].
    """
    check_ld_alpha(ld_alpha)
    lengths = _lengths(label_cu_seqlens).to(token_logps.device)
    shared = torch.minimum(lengths[0::2], lengths[1::2]).repeat_interleave(2)
    seq = torch.repeat_interleave(torch.arange(lengths.numel(), device=token_logps.device), lengths)
    starts = label_cu_seqlens[:-1].long().to(token_logps.device)
    in_shared = torch.arange(token_logps.numel(), device=token_logps.device) - starts[seq] < shared[seq]
    sums = (sequence_logps(token_logps * in_shared, label_cu_seqlens)
            + ld_alpha * sequence_logps(token_logps * ~in_shared, label_cu_seqlens))
    return sums[0::2], sums[1::2]


def wpo_weights(token_logps: torch.Tensor, log_sum_p2: torch.Tensor, label_cu_seqlens: torch.Tensor) -> torch.Tensor:
    """WPO's pair weights (Zhou et al. 2024, "WPO: Enhancing RLHF with Weighted Preference Optimization",
    Eq. 2, with its per-token alignment by Σ_v p_v²): ``w = exp(mean_t (log p_t − log Σ_v p_v²))`` per
    completion and ``w_c · w_r`` per pair, without gradient (TRL 1.16 ``DPOTrainer._compute_loss``).

    Args:
        token_logps, log_sum_p2: [N] float, label log-probs and the ``log_sum_p2`` statistic of
            ``linear_logps`` for 2B completions back to back (chosen_0, rejected_0, ...).
        label_cu_seqlens: [2B + 1] int cumulative completion lengths.

    Returns:
        [B] in ``token_logps``' dtype, no grad.
    """
    with torch.no_grad():
        lengths = _lengths(label_cu_seqlens).to(token_logps.device).clamp_min(1)
        weights = torch.exp(sequence_logps(token_logps - log_sum_p2, label_cu_seqlens) / lengths)
        return weights[0::2] * weights[1::2]


def chosen_prompt_targets(batch: PackedBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The chosen prompts' tokens after their first, as next-token targets in the packed stream (ORPO's NLL
    covers the prompt too). Both layouts: a pair's first segment is its whole ``prompt + chosen`` sequence.

    Returns:
        (stream positions [M] int64, target token ids [M] int64, cu_seqlens [B + 1] int64 of their spans).
    """
    cu, label_cu = batch.cu_seqlens.long(), batch.label_cu_seqlens.long()
    starts = cu[:-1][0::2]
    counts = (_lengths(cu)[0::2] - _lengths(label_cu)[0::2] - 1).clamp_min(0)
    spans = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    offsets = torch.arange(int(spans[-1]), device=counts.device) - torch.repeat_interleave(spans[:-1], counts)
    index = torch.repeat_interleave(starts, counts) + offsets
    return index, batch.input_ids[0, index + 1], spans


def chosen_nll_tokens(batch: PackedBatch, *, with_prompt: bool = False) -> torch.Tensor:
    """[B] int64: the chosen completion's token count, or with ``with_prompt`` its whole sequence's but the
    first token (what ORPO's NLL averages over)."""
    if with_prompt:
        return _lengths(batch.cu_seqlens)[0::2] - 1
    return _lengths(batch.label_cu_seqlens)[0::2]


def packed_sequence_logps(model: torch.nn.Module, batch: PackedBatch, *,
                          ld_alpha: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed label log-probs of every chosen and rejected completion in a packed micro-batch
    (the reference's share of ``pair_logps``).

    Args:
        model: a transformers causal LM, possibly wrapped by PEFT or DDP (forward as ``label_logps``).
        batch: a micro-batch from ``fastdpo.data.pack_pairs`` on the model's device.
        ld_alpha: LD-DPO's α (``ld_pair_logps``), or None for plain sums.

    Returns:
        (chosen_logps [B], rejected_logps [B]), float32.
    """
    pair = pair_logps(model, batch, ld_alpha=ld_alpha)
    return pair.chosen, pair.rejected


@dataclass
class PairLogps:
    """The per-pair inputs of ``fastdpo.dpo_loss`` from one packed micro-batch, each [B] (``aux_loss`` a scalar)."""

    chosen: torch.Tensor             # summed completion log-probs (LD-DPO-weighted with ld_alpha), fp32
    rejected: torch.Tensor
    chosen_lengths: torch.Tensor     # completion token counts, int64
    rejected_lengths: torch.Tensor
    chosen_nll: torch.Tensor         # −Σ log p over the chosen NLL tokens (plain, never LD-weighted), fp32
    nll_tokens: torch.Tensor         # their counts, int64
    wpo_weights: torch.Tensor | None  # WPO's w_c · w_r, no grad
    aux_loss: torch.Tensor | None = None  # scalar MoE router load-balancing loss of the forward (None: dense)

    def rows(self, index: slice) -> PairLogps:
        """The pairs ``index`` selects (``aux_loss``, of the whole forward, kept)."""
        return PairLogps(*(None if t is None else t[index] for t in (
            self.chosen, self.rejected, self.chosen_lengths, self.rejected_lengths, self.chosen_nll, self.nll_tokens,
            self.wpo_weights)), aux_loss=self.aux_loss)


def pair_logps(model: torch.nn.Module, batch: PackedBatch, *, ld_alpha: float | None = None, wpo: bool = False,
               prompt_nll: bool = False) -> PairLogps:
    """Everything the losses need from the policy in one forward: the completions' summed log-probs (with
    LD-DPO's α), their lengths, the chosen NLL (over the completion, and with ``prompt_nll`` also the prompt
    from its second token, as ORPO) and, with ``wpo``, WPO's pair weights (the only case where the
    ``log_sum_p2`` statistic is computed).

    Args:
        model, batch: as ``packed_sequence_logps``.

    Returns:
        ``PairLogps``; the log-prob fields are differentiable.
    """
    index, targets = batch.logit_index, batch.targets
    n = targets.numel()
    if prompt_nll:
        prompt_index, prompt_targets, prompt_spans = chosen_prompt_targets(batch)
        index, targets = torch.cat([index, prompt_index]), torch.cat([targets, prompt_targets])
    out = label_logps(model, batch, index, targets, ("log_sum_p2",) if wpo else ())
    logps = out.logps
    token_logps, label_cu = logps[:n], batch.label_cu_seqlens
    sums = sequence_logps(token_logps, label_cu)
    lengths = _lengths(label_cu).to(sums.device)
    chosen, rejected = (sums[0::2], sums[1::2]) if ld_alpha is None else ld_pair_logps(token_logps, label_cu, ld_alpha)
    chosen_nll = -sums[0::2]
    if prompt_nll:
        chosen_nll = chosen_nll - sequence_logps(logps[n:], prompt_spans)
    return PairLogps(
        chosen=chosen, rejected=rejected, chosen_lengths=lengths[0::2], rejected_lengths=lengths[1::2],
        chosen_nll=chosen_nll, nll_tokens=chosen_nll_tokens(batch, with_prompt=prompt_nll).to(sums.device),
        wpo_weights=wpo_weights(token_logps, out.stats["log_sum_p2"][:n], label_cu) if wpo else None,
        aux_loss=out.aux_loss,
    )
