"""Preference losses on per-sequence log-probabilities: plain PyTorch on [B] vectors.

One interface for every loss, as TRL's ``DPOTrainer.dpo_loss``: it takes the summed label
log-probabilities of the policy and the reference for the chosen and rejected completions and
returns ``(losses, chosen_rewards, rejected_rewards)``, each [B].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid",)


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    loss_type: str = "sigmoid",
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    reference_free: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO losses and implicit rewards.

    ``sigmoid`` (Rafailov et al. 2023, "Direct Preference Optimization"), with conservative label
    smoothing ``label_smoothing`` = ε (cDPO, Mitchell 2023):
    ``h = (π_c − π_r) − (ref_c − ref_r)``;
    ``loss = −(1 − ε) log σ(β h) − ε log σ(−β h)``.
    Rewards are ``β (π − ref)`` per completion, detached (TRL's ``chosen_rewards`` /
    ``rejected_rewards``). With ``reference_free`` the reference terms are taken as 0.

    Args:
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps: [B]
            float tensors, summed log-probabilities (nats) of each completion.
        loss_type: one of ``LOSS_TYPES``.
        beta: the KL-penalty coefficient β > 0.
        label_smoothing: ε in [0, 0.5], the assumed probability that a preference label is flipped.
        reference_free: ignore the reference log-probabilities (an implicit uniform reference).

    Returns:
        (losses, chosen_rewards, rejected_rewards), each [B] in the policy log-probs' dtype.

    Raises:
        ValueError: unknown ``loss_type``, ``beta <= 0``, ``label_smoothing`` outside [0, 0.5],
            or inputs whose shapes differ.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; supported: {', '.join(LOSS_TYPES)}")
    if not beta > 0:
        raise ValueError(f"beta must be positive, got {beta}")
    if not 0.0 <= label_smoothing <= 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5], got {label_smoothing}")
    shapes = {tuple(t.shape) for t in (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)}
    if len(shapes) != 1:
        raise ValueError(f"the four log-prob vectors must have one shape, got {sorted(shapes)}")

    if reference_free:
        ref_chosen_logps = torch.zeros_like(ref_chosen_logps)
        ref_rejected_logps = torch.zeros_like(ref_rejected_logps)
    ref_chosen_logps = ref_chosen_logps.to(policy_chosen_logps.dtype)
    ref_rejected_logps = ref_rejected_logps.to(policy_rejected_logps.dtype)
    logits = (policy_chosen_logps - policy_rejected_logps) - (ref_chosen_logps - ref_rejected_logps)
    losses = -F.logsigmoid(beta * logits) * (1 - label_smoothing) - F.logsigmoid(-beta * logits) * label_smoothing
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards
