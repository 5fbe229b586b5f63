"""TR-DPO (Gorbatovski et al. 2024): the reference model moved toward the policy every few optimiser steps."""

from __future__ import annotations

import torch
from transformers import TrainerCallback


def check_sync_compatible(policy: torch.nn.Module, ref_model: torch.nn.Module) -> None:
    """TR-DPO mixes parameters by name: the reference must have the policy's parameter names and shapes.

    Raises:
        ValueError: naming the first missing, extra or differently shaped parameter.
    """
    mine = {name: p.shape for name, p in policy.named_parameters()}
    theirs = {name: p.shape for name, p in ref_model.named_parameters()}
    for name in sorted(mine.keys() | theirs.keys()):
        if mine.get(name) != theirs.get(name):
            raise ValueError(f"sync_ref_model needs a reference with the policy's parameters; {name!r} is "
                             f"{tuple(mine[name]) if name in mine else 'missing'} in the policy and "
                             f"{tuple(theirs[name]) if name in theirs else 'missing'} in the reference")


class SyncRefModelCallback(TrainerCallback):
    """TR-DPO (Gorbatovski et al. 2024, "Learn Your Reference Model for Real Good Alignment", its soft
    update): after every ``args.ref_model_sync_steps``-th optimiser step, each reference weight becomes
    ``α · policy + (1 − α) · ref`` with ``α = args.ref_model_mixup_alpha`` (α = 1 is the hard update), in
    place and without gradient; TRL 1.16's ``SyncRefModelCallback``, but matching parameters by name.

    Args:
        ref_model: the reference causal LM (parameter names and shapes as the policy's; see
            ``check_sync_compatible``).
        unwrap: maps the Trainer's (DDP-wrapped) model to the bare causal LM whose parameters are mixed in.
    """

    def __init__(self, ref_model: torch.nn.Module, unwrap):
        self.ref_model = ref_model
        self.unwrap = unwrap

    @staticmethod
    @torch.no_grad()
    def mix(policy: torch.nn.Module, ref_model: torch.nn.Module, alpha: float) -> None:
        """``ref ← α · policy + (1 − α) · ref`` for every parameter, in the reference's dtype."""
        policy_params = dict(policy.named_parameters())
        for name, ref in ref_model.named_parameters():
            ref.mul_(1.0 - alpha).add_(policy_params[name].to(ref.dtype), alpha=alpha)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % args.ref_model_sync_steps == 0:
            self.mix(self.unwrap(model), self.unwrap(self.ref_model), args.ref_model_mixup_alpha)
