"""SFT training steps, end to end: fastdpo's SFTTrainer against TRL 1.16's SFTTrainer, same rows and settings.

Both train SmolLM2-135M-Instruct (the shared GGUF, converted once to an fp32 checkpoint) with LoRA (r 16, alpha 32,
all linear layers), no gradient checkpointing, completion-only loss, on the first ``--rows`` prompt / chosen
completions of a preference file (UltraFeedback by default), truncated to ``--max-length`` tokens (both keep the
start). TRL pads each micro-batch of ``--rows-per-micro-batch`` rows to its longest (its default, ``packing`` and
``padding_free`` off) and runs transformers' sdpa; fastdpo packs whole sequences under ``--max-tokens-per-batch``
(best-fit decreasing) and runs its default attention (``packed_sdpa`` on CPU). Each trainer runs one epoch in a
fresh process, one after the other: work tokens/s is the epoch's tokens (Σ len(input_ids), padding excluded; the same
rows for both) over the summed wall time of its optimiser steps after the first (warm-up); we also record the tokens
processed (padding included) and the process's peak RSS (CUDA: ``max_memory_allocated``).

    python benchmarks/bench_sft_step.py --out benchmarks/results/cpu-sft-step
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from benchlib import steps
from benchlib.env import default_device
from benchlib.paths import DEFAULT_MODEL, ULTRAFEEDBACK_DATA


def run(trainer_name: str, args) -> dict:
    import datasets
    import torch

    from fastdpo.models import apply_lora, default_attn_implementation, load_causal_lm, load_tokenizer, resolve_model

    attention = "sdpa" if trainer_name == "trl" else default_attn_implementation(args.device)
    torch.manual_seed(0)
    source = resolve_model(args.model)
    tokenizer = load_tokenizer(source)
    model = apply_lora(load_causal_lm(source, attn_implementation=attention), r=16, alpha=32, dropout=0.05)
    rows = datasets.load_dataset("json", data_files=str(args.dataset), split="train").select(range(args.rows))
    data = rows.map(lambda r: {"prompt": r["prompt"], "completion": r["chosen"]}, remove_columns=rows.column_names)
    cuda = args.device == "cuda"
    common = dict(output_dir=f"/tmp/bench-sft-{trainer_name}", report_to=[], use_cpu=not cuda, bf16=cuda, fp16=False,
                  gradient_checkpointing=False, learning_rate=2e-4, num_train_epochs=1, logging_steps=1,
                  save_strategy="no", disable_tqdm=True, gradient_accumulation_steps=args.gradient_accumulation_steps,
                  max_length=args.max_length, seed=0)
    if trainer_name == "trl":
        from trl import SFTConfig, SFTTrainer

        config = SFTConfig(per_device_train_batch_size=args.rows_per_micro_batch, **common)
    else:
        from fastdpo import SFTConfig, SFTTrainer

        config = SFTConfig(max_tokens_per_batch=args.max_tokens_per_batch, **common)
    trainer = SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer)
    recorder = steps.attach(trainer, lambda row: len(row["input_ids"]), cuda)
    trainer.train()
    import importlib.metadata as md

    return {
        "trainer": trainer_name,
        "version": md.version("trl" if trainer_name == "trl" else "fastdpo"),
        "attention": attention,
        **steps.summary(recorder, cuda),
    }


def table(rows: list[dict]) -> str:
    lines = ["| trainer | attention | processed tokens/sequence | median step s | sequences/step | work tokens/s | "
             "packing efficiency | peak memory MiB | before training MiB |", "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['trainer']} {r['version']} | {r['attention']} | {r['processed_tokens_per_row']:.0f} | "
              f"{r['median_step_s']:.2f} | {r['rows_per_step']:.1f} | {r['work_tokens_per_s']:.0f} | "
              f"{r['packing_efficiency']:.2f} | {r['peak_memory_mib']:.0f} | {r['setup_peak_memory_mib']:.0f} |"
              for r in rows]
    return "\n".join(lines + steps.trl_ratios(rows, ">= 1.5x, <= 0.7x"))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(DEFAULT_MODEL))
    p.add_argument("--dataset", default=str(ULTRAFEEDBACK_DATA))
    p.add_argument("--device", default=default_device(), choices=["cpu", "cuda"])
    p.add_argument("--rows", type=int, default=48)
    p.add_argument("--max-length", type=int, default=384)
    p.add_argument("--rows-per-micro-batch", type=int, default=4, help="TRL's per_device_train_batch_size")
    p.add_argument("--max-tokens-per-batch", type=int, default=1536, help="fastdpo's packed micro-batch budget")
    p.add_argument("--gradient-accumulation-steps", type=int, default=2)
    p.add_argument("--trainers", default="fastdpo,trl")
    p.add_argument("--out", help="path prefix for .json and .md results")
    p.add_argument("--child", help=argparse.SUPPRESS)
    return p


def report(args) -> tuple[list[dict], str]:
    """(rows, markdown) of one epoch for each of ``--trainers``, each in a fresh process."""
    rows = steps.run_children(__file__, sys.argv[1:], args.trainers.split(","))
    if any("skipped" in r for r in rows):
        sys.exit(f"failed: {[r for r in rows if 'skipped' in r]}")
    precision = "bf16" if args.device == "cuda" else "fp32"
    md = (f"One SFT epoch: SmolLM2-135M-Instruct + LoRA r16, {precision}, "
          f"{args.rows} prompt/chosen rows of {Path(args.dataset).name}, max_length {args.max_length}, "
          f"GA {args.gradient_accumulation_steps}\n\n" + table(rows))
    return rows, md


if __name__ == "__main__":
    steps.main(parser, run, report)
