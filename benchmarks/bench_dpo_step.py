"""One DPO training step, end to end: fastdpo's trainer (shared-prefix and unshared layouts) against TRL's
DPOTrainer, same data and settings.

Both train SmolLM2-135M-Instruct (the shared GGUF, converted once to an fp32 checkpoint) with LoRA
(r 16, alpha 32, all linear layers), no gradient checkpointing, each with its default attention
(TRL: transformers' sdpa; fastdpo: ``fastdpo.models.default_attn_implementation``, ``packed_sdpa`` on
CPU), the reference being the policy with its adapter disabled, on the first ``--pairs`` rows of a preference file;
fp32 on CPU, bf16 autocast
on CUDA. Each trainer runs in a fresh process; per optimiser step we record wall time, the pairs and
real tokens it trained on and the tokens it processed (padding included), and the process's peak
memory (CPU: peak RSS; CUDA: ``torch.cuda.max_memory_allocated``).

    pip install -e ".[peers]"     # TRL
    python benchmarks/bench_dpo_step.py --out benchmarks/results/cpu-dpo-step
    python benchmarks/bench_dpo_step.py --dataset HH.jsonl.gz UF.jsonl --untruncated \
        --trainers fastdpo,fastdpo-unshared,trl --out benchmarks/results/cpu-dpo-step-prefix

TRL pads each micro-batch of ``--pairs-per-micro-batch`` pairs to its longest sequence (TRL 1.16's
``padding_free`` falls back to padding); fastdpo packs whole pairs into ``--max-tokens-per-batch``.
Truncation differs by design (TRL 1.16 keeps the start of prompt + completion up to
``max_length``; fastdpo caps the prompt at ``max_length / 2`` keeping its end), so compare
per-token figures; ``--untruncated`` trains on the first ``--pairs`` pairs that neither truncates, so every trainer
does the same work: Σ len(prompt + chosen) + len(prompt + rejected) "work tokens" per pair, whatever it processes
(fastdpo's shared-prefix layout processes the prompt once, TRL pads).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from benchlib import steps
from benchlib.env import default_device
from benchlib.paths import DEFAULT_MODEL, HH_DATA


def work_tokens(row: dict) -> int:
    """len(prompt + chosen) + len(prompt + rejected) of a tokenised row (fastdpo's or TRL 1.16's column names)."""
    lengths = [len(row.get(f"{part}_input_ids", row.get(f"{part}_ids", ()))) for part in ("prompt", "chosen", "rejected")]
    return 2 * lengths[0] + lengths[1] + lengths[2]


def untruncated(raw, tokenizer, max_length: int, pairs: int):
    """The first ``pairs`` rows that neither trainer truncates: prompt <= max_length / 2 (fastdpo's prompt cap) and
    prompt + either completion <= max_length (TRL's cap), by fastdpo's tokenisation without limits."""
    from fastdpo.data import tokenize_pairs

    tokenized, report = tokenize_pairs(raw, tokenizer, max_length=None, max_prompt_length=None)
    if report["kept"] != len(raw):
        raise ValueError(f"{report}: dropped rows would shift the indices; pick other rows")
    keep = [i for i, row in enumerate(tokenized) if len(row["prompt_input_ids"]) <= max_length // 2
            and len(row["prompt_input_ids"]) + max(len(row["chosen_input_ids"]), len(row["rejected_input_ids"]))
            <= max_length]
    if len(keep) < pairs:
        raise ValueError(f"only {len(keep)} of {len(raw)} rows fit max_length {max_length} untruncated")
    return raw.select(keep[:pairs])


def run(trainer_name: str, args) -> dict:
    import datasets
    import torch

    from fastdpo.models import apply_lora, default_attn_implementation, load_causal_lm, load_tokenizer, resolve_model

    uses_trl = trainer_name in ("trl", "trl+fastdpo")
    dataset = args.child_dataset or args.dataset[0]
    # each trainer with its own default attention: TRL's (transformers' sdpa), fastdpo train's
    attention = "sdpa" if uses_trl else default_attn_implementation(args.device)
    torch.manual_seed(0)
    source = resolve_model(args.model)
    tokenizer = load_tokenizer(source)
    model = apply_lora(load_causal_lm(source, attn_implementation=attention), r=16, alpha=32, dropout=0.05)
    raw = datasets.load_dataset("json", data_files=str(dataset), split="train")
    data = (untruncated(raw.select(range(min(len(raw), args.scan_rows))), tokenizer, args.max_length, args.pairs)
            if args.untruncated else raw.select(range(args.pairs)))
    cuda = args.device == "cuda"
    common = dict(output_dir=f"/tmp/bench-{trainer_name}", report_to=[], use_cpu=not cuda, bf16=cuda, fp16=False,
                  gradient_checkpointing=False, learning_rate=3e-4, max_steps=args.steps, logging_steps=args.steps,
                  save_strategy="no", disable_tqdm=True, gradient_accumulation_steps=args.gradient_accumulation_steps,
                  max_length=args.max_length, beta=0.1, seed=0)
    if uses_trl:
        from trl import DPOConfig, DPOTrainer

        config = DPOConfig(per_device_train_batch_size=args.pairs_per_micro_batch, **common)
    else:
        from fastdpo import DPOConfig, DPOTrainer

        config = DPOConfig(max_tokens_per_batch=args.max_tokens_per_batch, max_prompt_length=args.max_length // 2,
                           prefix_sharing=trainer_name != "fastdpo-unshared", **common)
    trainer = DPOTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer)
    if trainer_name == "trl+fastdpo":   # TRL's trainer, its log-probs through fastdpo.linear_logps
        from fastdpo.integrations.trl import patch_dpo_trainer

        patch_dpo_trainer(trainer)
    recorder = steps.attach(trainer, work_tokens, cuda)
    trainer.train()
    import importlib.metadata as md

    return {
        "trainer": trainer_name,
        "dataset": Path(dataset).name,
        "version": md.version("trl" if uses_trl else "fastdpo"),
        "attention": attention,
        "layout": "padded" if uses_trl else ("shared prefix" if trainer.prefix_sharing else "unshared"),
        **steps.summary(recorder, cuda),
    }


def table(rows: list[dict]) -> str:
    """Markdown rows; ratios are against TRL's row on the same dataset (when it ran)."""
    lines = ["| dataset | trainer | attention | layout | processed tokens/pair | median step s | pairs/step | "
             "work tokens/s | ×TRL | real tokens/s | packing efficiency | peak memory MiB | ×TRL | before training MiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    trl = {r["dataset"]: r for r in rows if r["trainer"] == "trl"}
    for r in rows:
        base = trl.get(r["dataset"])
        speed = f"{r['work_tokens_per_s'] / base['work_tokens_per_s']:.2f}" if base else "–"
        memory = f"{r['peak_memory_mib'] / base['peak_memory_mib']:.2f}" if base else "–"
        lines.append(f"| {r['dataset']} | {r['trainer']} {r['version']} | {r['attention']} | {r['layout']} | "
                     f"{r['processed_tokens_per_row']:.0f} | {r['median_step_s']:.2f} | {r['rows_per_step']:.1f} | "
                     f"{r['work_tokens_per_s']:.0f} | {speed} | {r['real_tokens_per_s']:.0f} | "
                     f"{r['packing_efficiency']:.2f} | {r['peak_memory_mib']:.0f} | {memory} | "
                     f"{r['setup_peak_memory_mib']:.0f} |")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(DEFAULT_MODEL))
    p.add_argument("--dataset", nargs="+", default=[str(HH_DATA)], help="one or more preference files, in turn")
    p.add_argument("--untruncated", action="store_true", help="only pairs that neither trainer truncates")
    p.add_argument("--scan-rows", type=int, default=600, help="rows scanned for --untruncated pairs")
    p.add_argument("--device", default=default_device(), choices=["cpu", "cuda"])
    p.add_argument("--pairs", type=int, default=120)
    p.add_argument("--steps", type=int, default=6, help="optimiser steps (the first is not timed)")
    p.add_argument("--max-length", type=int, default=192)
    p.add_argument("--pairs-per-micro-batch", type=int, default=2, help="TRL's per_device_train_batch_size")
    p.add_argument("--max-tokens-per-batch", type=int, default=512, help="fastdpo's packed micro-batch budget")
    p.add_argument("--gradient-accumulation-steps", type=int, default=4)
    p.add_argument("--trainers", default="fastdpo,fastdpo-unshared,trl,trl+fastdpo",
                   help="fastdpo (shared prefix where the attention runs it), fastdpo-unshared, trl, trl+fastdpo")
    p.add_argument("--out", help="path prefix for .json and .md results")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--child-dataset", help=argparse.SUPPRESS)
    return p


def run_trainers(argv: list[str]) -> tuple[list[dict], str]:
    """(rows, markdown) for the trainers named in ``argv``'s ``--trainers``, each in a fresh process."""
    args = parser().parse_args(argv)
    rows = [{"dataset": Path(dataset).name, **row} for dataset in args.dataset
            for row in steps.run_children(__file__, argv, args.trainers.split(","), ["--child-dataset", dataset])]
    ran = [r for r in rows if "skipped" not in r]
    skipped = "".join(f"\n- {r['trainer']} on {r['dataset']} skipped: {r['skipped']}" for r in rows if "skipped" in r)
    precision = "bf16" if args.device == "cuda" else "fp32"
    names = ", ".join(Path(d).name for d in args.dataset)
    md = (f"SmolLM2-135M-Instruct + LoRA r16, {precision}, {args.pairs} {'untruncated ' * args.untruncated}pairs of "
          f"{names}, max_length {args.max_length}, GA {args.gradient_accumulation_steps}, "
          f"{args.max_tokens_per_batch}-token packed micro-batches, {args.pairs_per_micro_batch} pairs per TRL "
          f"micro-batch\n\n" + table(ran) + skipped)
    return rows, md


if __name__ == "__main__":
    steps.main(parser, run, lambda args: run_trainers(sys.argv[1:]))
