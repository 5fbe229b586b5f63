"""One rank of tests/train/test_collectives.py (torchrun, 2 CPU processes, gloo): trainings in which only rank 1's
micro-batches break (a NaN reference log-prob on each of its pairs; a judge with no verdict), each rank writing what
it saw to ``<out>/<case>-<rank>.json``. A collective out of step fails within the process group's timeout instead
of hanging."""

import json
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # tests/, for _shared

from _shared import fsdp2_step, pairs, smollm2_tokenizer, tiny_llama  # noqa: E402
from fastdpo import DPOConfig, DPOTrainer, OnlineDPOConfig, OnlineDPOTrainer  # noqa: E402

COMMON = dict(use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True, max_steps=2, logging_steps=1,
              learning_rate=1e-2, seed=0)


def rows_seen(trainer_class):
    """``trainer_class`` recording the pairs of each training micro-batch this rank computes a loss for."""

    class Recording(trainer_class):
        def compute_loss(self, model, inputs, *args, **kwargs):
            if model.training:
                self.rows.append(inputs.num_rows)
            return super().compute_loss(model, inputs, *args, **kwargs)

    Recording.rows = []
    return Recording


def poisoned_on(rank: int):
    """8 tokenised pairs with precomputed reference log-probs: NaN on every pair of rank 1's copy of the data."""
    data = pairs(8, seed=4)
    nan = rank == 1
    return data.add_column("ref_chosen_logps", [float("nan") if nan else -30.0] * 8).add_column(
        "ref_rejected_logps", [-20.0] * 8)


def dpo_trainer(out: str, rank: int, skip: bool):
    args = DPOConfig(output_dir=out, max_tokens_per_batch=48, skip_nonfinite_losses=skip, **COMMON)
    return rows_seen(DPOTrainer)(tiny_llama(seed=3), args=args, train_dataset=poisoned_on(rank))


def dpo(out: str, rank: int, skip: bool):
    trainer = dpo_trainer(out, rank, skip)
    try:
        trainer.train()
    except FloatingPointError as e:
        return {"error": str(e)}
    return result(trainer)


class RankJudge:
    """Ranks every pair on rank 0; gives no verdict at all on rank 1."""

    def __init__(self, rank: int):
        self.verdict = 0 if rank == 0 else -1

    def judge(self, prompts, completion_pairs):
        return [self.verdict] * len(prompts)


def online_trainer(out: str, rank: int, **kw):
    import datasets

    prompts = datasets.Dataset.from_list([{"prompt": f"Question {i}: what is {i} plus {i}?"} for i in range(8)])
    args = OnlineDPOConfig(output_dir=out, per_device_train_batch_size=2, **COMMON, **kw)
    return rows_seen(OnlineDPOTrainer)(tiny_llama(seed=6), args=args, train_dataset=prompts,
                                       processing_class=smollm2_tokenizer(), judge=RankJudge(rank))


def online(out: str, rank: int):
    trainer = online_trainer(out, rank, max_new_tokens=4)
    trainer.train()
    return result(trainer)


def online_fsdp2(out: str, rank: int):
    """One step under FSDP2, the ranks sampling completions of different lengths (2 and 4 tokens)."""
    return fsdp2_result(online_trainer(out, rank, max_new_tokens=2 + 2 * rank))


def fsdp2_result(trainer) -> dict:
    weights = fsdp2_step(trainer, lr=1e-2)
    return {"rows": trainer.rows, "window": untimed(trainer.metrics.pop("train")),
            "weights": [float(w.double().sum()) for w in weights.values()],
            "finite": all(bool(torch.isfinite(w).all()) for w in weights.values())}


def untimed(logs: dict) -> dict:
    """``logs`` without tokens/s, the one value each rank times for itself."""
    return {k: v for k, v in logs.items() if k != "tokens_per_second"}


def result(trainer) -> dict:
    return {"logs": [untimed(h) for h in trainer.state.log_history if "loss" in h], "rows": trainer.rows,
            "tally": [trainer.tally.steps, trainer.tally.trained],
            "weights": [float(p.detach().double().sum()) for p in trainer.model.parameters()],
            "finite": all(bool(torch.isfinite(p).all()) for p in trainer.model.parameters())}


def main(out: str) -> None:
    # the trainers join this group; on CPU transformers would give the one it makes accelerate's 30 minutes
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank = dist.get_rank()
    for case, run in (("dpo-skip", lambda: dpo(f"{out}/dpo-skip", rank, skip=True)),
                      ("dpo-stop", lambda: dpo(f"{out}/dpo-stop", rank, skip=False)),
                      ("dpo-skip-fsdp2", lambda: fsdp2_result(dpo_trainer(f"{out}/dpo-skip-fsdp2", rank, skip=True))),
                      ("online", lambda: online(f"{out}/online", rank)),
                      ("online-fsdp2", lambda: online_fsdp2(f"{out}/online-fsdp2", rank))):
        with open(f"{out}/{case}-{rank}.json", "w") as f:
            json.dump(run(), f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
