"""KTO training, one epoch end to end: fastdpo's KTOTrainer against TRL 1.16's KTOTrainer, same rows and settings.

Both train SmolLM2-135M-Instruct (the shared GGUF, converted once to an fp32 checkpoint) with LoRA (r 16, alpha 32, all
linear layers), no gradient checkpointing, loss ``kto``, the reference being the policy with its adapter off (TRL: its
frozen copy of the adapter, the same cost), on the first ``--pairs`` HH-RLHF pairs, which each trainer unpairs itself
(2 × ``--pairs`` rows), in dataset order (TRL's ``sequential``; fastdpo's ``train_sampling_strategy`` set to match).
Both give each row TRL's KL completion from groups of ``--rows-per-group`` rows: TRL's per_device_train_batch_size,
whose rows it pads to their longest twice (the completions, then the KL completions, each with the prompt again);
fastdpo packs whole groups under ``--max-tokens-per-batch`` with the prompt once and the KL completion as a branch off
it. Each trainer runs in a fresh process, one after the other; work tokens/s is the epoch's prompt + completion tokens
(TRL's ``num_tokens``: the same rows for both, KL completions and padding not counted) over the summed wall time of its
optimiser steps after the first, and we record the process's peak RSS (CUDA: ``max_memory_allocated``). Needs a quiet
machine; ``--random-model tiny`` (a random model of ``benchlib.synthetic``'s tiny shape, the byte tokenizer and
HH-shaped pairs) runs the same code in seconds; ``--dry-run`` is that at CI's sizes (its times mean nothing).

    pip install -e ".[peers]"     # TRL
    python benchmarks/bench_kto_step.py --out benchmarks/results/cpu-kto-step
    python benchmarks/bench_kto_step.py --dry-run --out /tmp/kto-dry
"""

from __future__ import annotations

import argparse
import sys

from bench_dpo_step import attention_for, load_model
from benchlib import steps, synthetic
from benchlib.env import default_device, package_version
from benchlib.paths import DEFAULT_MODEL, HH_DATA


def work_tokens(max_length: int):
    """A row's prompt + completion tokens, cut at ``max_length`` (fastdpo's or TRL 1.16's column names; TRL cuts in its
    collator)."""
    def count(row: dict) -> int:
        prompt = row.get("prompt_input_ids", row.get("prompt_ids"))
        completion = row.get("completion_input_ids", row.get("completion_ids"))
        return min(max_length, len(prompt) + len(completion))
    return count


def budget(args) -> int:
    """fastdpo's token budget per micro-batch: ``--max-tokens-per-batch``, else TRL's largest batch with gradients."""
    return args.max_tokens_per_batch or args.rows_per_group * args.max_length


def load_data(args):
    """(tokenizer, preference pairs): the checkpoint's and the HH file's first --pairs, or the byte tokenizer and
    HH-shaped pairs with --random-model."""
    import datasets

    from fastdpo.models import load_tokenizer, resolve_model

    if args.random_model:
        return synthetic.byte_tokenizer(), datasets.Dataset.from_list(synthetic.hh_like_pairs(args.pairs,
                                                                                              args.max_length))
    raw = datasets.load_dataset("json", data_files=str(args.dataset), split="train")
    return load_tokenizer(resolve_model(args.model)), raw.select(range(args.pairs))


def run(trainer_name: str, args) -> dict:
    cuda = args.device == "cuda"
    uses_trl = trainer_name == "trl"
    tokenizer, data = load_data(args)
    model = load_model(uses_trl, args)
    common = dict(output_dir=f"/tmp/bench-kto-{trainer_name}", report_to=[], use_cpu=not cuda, bf16=cuda, fp16=False,
                  gradient_checkpointing=False, learning_rate=5e-5, num_train_epochs=1, logging_steps=1,
                  save_strategy="no", disable_tqdm=True, gradient_accumulation_steps=args.gradient_accumulation_steps,
                  max_length=args.max_length, per_device_train_batch_size=args.rows_per_group, beta=0.1, seed=0)
    if uses_trl:
        from trl import KTOConfig, KTOTrainer

        config = KTOConfig(**common)
    else:
        from fastdpo import KTOConfig, KTOTrainer

        config = KTOConfig(max_tokens_per_batch=budget(args), train_sampling_strategy="sequential",
                           **common)
    trainer = KTOTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer)
    recorder = steps.attach(trainer, work_tokens(args.max_length), cuda)
    trainer.train()
    return {"trainer": trainer_name, "version": package_version("trl" if uses_trl else "fastdpo"),
            "attention": attention_for(uses_trl, args), "rows": len(trainer.train_dataset),
            **steps.summary(recorder, cuda)}


def table(rows: list[dict]) -> str:
    lines = ["| trainer | attention | rows | median step s | rows/step | work tokens/s | peak memory MiB | "
             "before training MiB |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['trainer']} {r['version']} | {r['attention']} | {r['rows']} | {r['median_step_s']:.2f} | "
              f"{r['rows_per_step']:.1f} | {r['work_tokens_per_s']:.0f} | {r['peak_memory_mib']:.0f} | "
              f"{r['setup_peak_memory_mib']:.0f} |" for r in rows]
    return "\n".join(lines + steps.trl_ratios(rows, ">= 1.5x, <= 0.7x"))


def parser() -> argparse.ArgumentParser:
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(DEFAULT_MODEL))
    p.add_argument("--dataset", default=str(HH_DATA))
    p.add_argument("--random-model", choices=list(synthetic.MODELS), help="a random model of this shape, no files")
    p.add_argument("--attention", help="fastdpo's attention (default: fastdpo's own default)")
    p.add_argument("--device", default=default_device(), choices=["cpu", "cuda"])
    p.add_argument("--pairs", type=int, default=64, help="HH pairs: 2x as many unpaired rows")
    p.add_argument("--max-length", type=int, default=384)
    p.add_argument("--rows-per-group", type=int, default=8, help="KL group: TRL's per_device_train_batch_size")
    p.add_argument("--max-tokens-per-batch", type=int,
                   help="fastdpo's packed micro-batch budget (default: --rows-per-group x --max-length, the most "
                        "tokens TRL's padded batch trains on with gradients; the first 64 HH pairs' largest KL group "
                        "packs into 2546 of the default 3072)")
    p.add_argument("--gradient-accumulation-steps", type=int, default=1)
    p.add_argument("--trainers", default="fastdpo,trl")
    p.add_argument("--out", help="path prefix for .json and .md results")
    p.add_argument("--dry-run", action="store_true",
                   help=f"the same code in seconds, for CI: {' '.join(DRY_RUN)} (given options still win)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    return p


#: --dry-run's options: a tiny random model on the CPU, 12 pairs (24 rows), groups of 4, a budget of about 2 groups
DRY_RUN = ("--random-model", "tiny", "--device", "cpu", "--pairs", "12", "--max-length", "96", "--rows-per-group",
           "4", "--max-tokens-per-batch", "800")


class Parser(argparse.ArgumentParser):
    """``parser()``'s arguments, ``--dry-run`` putting ``DRY_RUN`` before the command line's own options."""

    def parse_args(self, args=None, namespace=None):
        argv = sys.argv[1:] if args is None else list(args)
        return super().parse_args([*DRY_RUN, *argv] if "--dry-run" in argv else argv, namespace)


def report(args) -> tuple[list[dict], str]:
    """(rows, markdown) of one epoch for each of ``--trainers``, each in a fresh process."""
    rows = steps.run_children(__file__, sys.argv[1:], args.trainers.split(","))
    if any("skipped" in r for r in rows):
        sys.exit(f"failed: {[r for r in rows if 'skipped' in r]}")
    data = f"{args.random_model} random model, HH-shaped pairs" if args.random_model else "SmolLM2-135M-Instruct, HH"
    md = (f"One KTO epoch: {data}, LoRA r16, {'bf16' if args.device == 'cuda' else 'fp32'}, {args.pairs} pairs "
          f"unpaired, max_length {args.max_length}, KL groups of {args.rows_per_group} rows, fastdpo budget "
          f"{budget(args)} tokens, GA {args.gradient_accumulation_steps}\n\n" + table(rows))
    return rows, md


if __name__ == "__main__":
    steps.main(parser, run, report)
