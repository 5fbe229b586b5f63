"""Runs of tests/kto/test_kto_distributed.py: three SGD steps of KTOTrainer (LoRA, the reference its adapter
disabled) on 16 one-length rows in KL groups of 2, for each case (``CASES``), either in one process (``single``: a
micro-batch holds two groups) or on each of 2 gloo processes under torchrun (``ranks``: one group each). Writes
``<out>/<run>-<rank>.pt``: {case: {"logs": the logged steps without tokens/s, "weights": the trained parameters}}."""

import os
import sys
from datetime import timedelta
from pathlib import Path

import datasets
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # tests/, for _shared

from _shared import lora, smollm2_tokenizer, tiny_llama  # noqa: E402
from fastdpo import KTOConfig, KTOTrainer  # noqa: E402

GROUP = 2
CASES = {"kto": dict(loss_type="kto"), "kto-precomputed": dict(loss_type="kto", precompute_ref_log_probs=True),
         "apo_zero_unpaired": dict(loss_type="apo_zero_unpaired")}


def arithmetic_rows(n: int = 16) -> list[dict]:
    """Rows of one token length each (single digits), so that a budget of k groups holds exactly k groups; the KL
    group of rows 4 and 5 is all desirable (a micro-batch without an undesirable row on one rank)."""
    return [{"prompt": f"Question {i % 10}: what is {i * 3 % 10} plus {i * 7 % 10}?",
             "completion": f" It is {(i * 10 + (i % 3 == 0)) % 10}.", "label": i % 3 != 0} for i in range(n)]


def trainer(out: str, case: str, groups_per_batch: int) -> KTOTrainer:
    tokenizer = smollm2_tokenizer()
    rows = datasets.Dataset.from_list(arithmetic_rows())
    args = KTOConfig(output_dir=f"{out}/{case}", use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True,
                     per_device_train_batch_size=GROUP, train_sampling_strategy="sequential", max_steps=3,
                     logging_steps=1, optim="sgd", learning_rate=0.5, lr_scheduler_type="constant", max_grad_norm=0.0,
                     beta=1.0, seed=0, **CASES[case])
    t = KTOTrainer(lora(tiny_llama(seed=1), seed=2), args=args, train_dataset=rows, processing_class=tokenizer)
    lengths = set(t.row_lengths(t.train_dataset))
    assert len(lengths) == 1, lengths
    t.args.max_tokens_per_batch = groups_per_batch * GROUP * lengths.pop()
    return t


def result(t: KTOTrainer) -> dict:
    logs = [{k: v for k, v in h.items() if k != "tokens_per_second"} for h in t.state.log_history if "loss" in h]
    return {"logs": logs, "weights": {n: p.detach().clone() for n, p in t.model.named_parameters() if p.requires_grad}}


def main(out: str, run: str) -> None:
    if run == "single":
        results = {}
        for case in CASES:
            t = trainer(out, case, groups_per_batch=2)
            t.train()
            results[case] = result(t)
        torch.save(results, f"{out}/single-0.pt")
        return
    # a collective out of step fails within a minute (transformers' CPU group would wait 30)
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank = int(os.environ["RANK"])
    results = {}
    for case in CASES:
        t = trainer(f"{out}/ddp", case, groups_per_batch=1)
        t.train()
        results[case] = result(t)
    torch.save(results, f"{out}/ranks-{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
