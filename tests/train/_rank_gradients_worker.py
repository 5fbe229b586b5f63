"""Runs of tests/train/test_rank_gradients.py: one optimiser step of DPOTrainer with each reference mode, either in
one process (``single``: two micro-batches accumulated) or on each of 2 gloo processes under torchrun (``ranks``: one
micro-batch each, the model wrapped by the Trainer's DDP, then sharded by FSDP2: ``_shared.fsdp2_step``). Writes the
trained parameters to ``<out>/<run>-<rank>.pt`` as {mode: {name: tensor}} (the weights before the step to
``start-0.pt``)."""

import os
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # tests/, for _shared

from _shared import fsdp2_step, lora, pairs, tiny_llama  # noqa: E402
from fastdpo import DPOConfig, DPOTrainer  # noqa: E402

MODES = ("live", "adapter-disabled", "reference-adapter", "precomputed")
LR = 0.1


def trainer(out: str, mode: str, accumulation: int) -> DPOTrainer:
    """A DPOTrainer on 12 random pairs (micro-batches of 2-3 pairs) with ``mode``'s reference: a frozen copy of a
    fully fine-tuned policy, the LoRA policy with its adapter disabled, a second frozen adapter, or log-probs
    precomputed once (with the adapter disabled)."""
    model = tiny_llama(seed=3)
    names = {}
    if mode != "live":
        model = lora(model, seed=1)
    if mode == "reference-adapter":
        from peft import LoraConfig

        model.add_adapter("reference", LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))
        for name, p in model.named_parameters():
            if "lora_B.reference" in name:
                torch.nn.init.normal_(p, std=0.02)
        names = dict(model_adapter_name="default", ref_adapter_name="reference")
    args = DPOConfig(output_dir=f"{out}/{mode}", use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True,
                     max_tokens_per_batch=40, gradient_accumulation_steps=accumulation, max_steps=1, optim="sgd",
                     learning_rate=LR, lr_scheduler_type="constant", max_grad_norm=0.0, seed=0, beta=0.5,
                     precompute_ref_log_probs=mode == "precomputed", **names)
    return DPOTrainer(model, args=args, train_dataset=pairs(12, seed=8))


def trained(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def main(out: str, run: str) -> None:
    if run == "single":
        start, results = {}, {}
        for mode in MODES:
            t = trainer(out, mode, accumulation=2)
            start[mode] = trained(t.model)
            t.train()
            results[mode] = trained(t.model)
        torch.save(start, f"{out}/start-0.pt")
        torch.save(results, f"{out}/single-0.pt")
        return
    # a collective out of step fails within a minute (transformers' CPU group would wait 30)
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank = int(os.environ["RANK"])
    ddp, fsdp2 = {}, {}
    for mode in MODES:
        t = trainer(f"{out}/ddp", mode, accumulation=1)
        t.train()
        ddp[mode] = trained(t.model)
        fsdp2[mode] = fsdp2_step(trainer(f"{out}/fsdp2", mode, accumulation=1), LR)
    torch.save(ddp, f"{out}/ddp-{rank}.pt")
    torch.save(fsdp2, f"{out}/fsdp2-{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
