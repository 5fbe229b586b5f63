"""One DPO training step, end to end: fastdpo's trainer (shared-prefix and unshared layouts) against TRL's
DPOTrainer, same data and settings.

Both train SmolLM2-135M-Instruct (the shared GGUF, converted once to an fp32 checkpoint) with LoRA
(r 16, alpha 32, all linear layers), no gradient checkpointing, each with its default attention
(TRL: transformers' sdpa; fastdpo: ``fastdpo.models.default_attn_implementation``, ``packed_sdpa`` on
CPU, or ``--attention``), the reference being the policy with its adapter disabled, on the first ``--pairs`` rows of a
preference file; fp32 on CPU, bf16 autocast on CUDA. ``--random-model NAME`` trains a randomly initialised model of a
real one's shape instead (``benchlib.synthetic``: Llama-3.2-1B's, built on the device, bf16 weights on CUDA) on
``--pairs`` random pairs of HH-RLHF's token lengths: nothing to load, for the GPU machine. Each trainer runs in a fresh
process; per optimiser step we record wall time, the pairs and real tokens it trained on and the tokens it processed
(padding included), and the process's peak memory (CPU: peak RSS; CUDA: ``torch.cuda.max_memory_allocated``).
``--probe`` then looks for the longest micro-batch that trains within ``--memory-limit-gib`` (``probe``).

    pip install -e ".[peers]"     # TRL
    python benchmarks/bench_dpo_step.py --out benchmarks/results/cpu-dpo-step
    python benchmarks/bench_dpo_step.py --dataset HH.jsonl.gz UF.jsonl --untruncated \
        --trainers fastdpo,fastdpo-unshared,trl --out benchmarks/results/cpu-dpo-step-prefix
    python benchmarks/bench_dpo_step.py --random-model llama-3.2-1b --pairs 512 --max-length 1024 --probe \
        --trainers fastdpo,trl --attention packed_sdpa      # on a GPU, as benchmarks/gpu_check.py runs it

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
import gc
import sys
from pathlib import Path

from benchlib import steps, synthetic
from benchlib.env import default_device, package_version
from benchlib.paths import DEFAULT_MODEL, HH_DATA

GiB = 1 << 30


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


def dataset_name(args, dataset: str) -> str:
    return "synthetic HH-shaped" if args.random_model else Path(dataset).name


def attention_for(uses_trl: bool, args) -> str:
    """Each trainer with its own default attention: TRL's (transformers' sdpa), fastdpo train's (or --attention)."""
    from fastdpo.models import default_attn_implementation

    return "sdpa" if uses_trl else (args.attention or default_attn_implementation(args.device))


def load_model(uses_trl: bool, args):
    """The model of a run, with LoRA: the local checkpoint, or a random model of --random-model's shape."""
    import torch

    from fastdpo.models import apply_lora, load_causal_lm, resolve_model

    torch.manual_seed(0)
    attention = attention_for(uses_trl, args)
    if args.random_model:
        dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
        model = synthetic.random_causal_lm(args.random_model, args.device, dtype, attention)
    else:
        model = load_causal_lm(resolve_model(args.model), attn_implementation=attention)
    return apply_lora(model, r=16, alpha=32, dropout=0.05)


def load_data(args):
    """(tokenizer, training rows) of a run: the checkpoint's and the preference file's, or with --random-model the
    byte tokenizer and --pairs HH-shaped pairs."""
    import datasets

    from fastdpo.models import load_tokenizer, resolve_model

    if args.random_model:
        return synthetic.byte_tokenizer(), datasets.Dataset.from_list(synthetic.hh_like_pairs(args.pairs,
                                                                                              args.max_length))
    tokenizer = load_tokenizer(resolve_model(args.model))
    raw = datasets.load_dataset("json", data_files=str(args.child_dataset or args.dataset[0]), split="train")
    data = (untruncated(raw.select(range(min(len(raw), args.scan_rows))), tokenizer, args.max_length, args.pairs)
            if args.untruncated else raw.select(range(args.pairs)))
    return tokenizer, data


def make_trainer(trainer_name: str, args, model, tokenizer, data, *, micro_batch: int | None = None,
                 max_steps: int | None = None, accumulation: int | None = None):
    """The trainer of a run; ``micro_batch`` overrides --pairs-per-micro-batch (TRL) or --max-tokens-per-batch."""
    cuda = args.device == "cuda"
    common = dict(output_dir=f"/tmp/bench-{trainer_name}", report_to=[], use_cpu=not cuda, bf16=cuda, fp16=False,
                  gradient_checkpointing=False, learning_rate=3e-4, max_steps=max_steps or args.steps,
                  logging_steps=max_steps or args.steps, save_strategy="no", disable_tqdm=True,
                  gradient_accumulation_steps=accumulation or args.gradient_accumulation_steps,
                  max_length=args.max_length, beta=0.1, seed=0)
    if trainer_name in ("trl", "trl+fastdpo"):
        from trl import DPOConfig, DPOTrainer

        config = DPOConfig(per_device_train_batch_size=micro_batch or args.pairs_per_micro_batch, **common)
    else:
        from fastdpo import DPOConfig, DPOTrainer

        config = DPOConfig(max_tokens_per_batch=micro_batch or args.max_tokens_per_batch,
                           max_prompt_length=args.max_length // 2, prefix_sharing=trainer_name != "fastdpo-unshared",
                           **common)
    trainer = DPOTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer)
    if trainer_name == "trl+fastdpo":   # TRL's trainer, its log-probs through fastdpo.linear_logps
        from fastdpo.integrations.trl import patch_dpo_trainer

        patch_dpo_trainer(trainer)
    return trainer


def probe(trainer_name: str, args, tokenizer, data) -> list[dict]:
    """Micro-batches tried for the longest that trains within --memory-limit-gib: the timed run's size doubled until
    one fails (or --probes are spent), then one bisection step between the last that fit and the first that failed.

    A probe is one optimiser step on one micro-batch (no accumulation): TRL's size is pairs per micro-batch, fastdpo's
    its token budget; each reports the tokens it processed (padding included), its peak memory and whether it fit. Each
    probe trains a fresh model (TRL adds a reference adapter to the one it is given). On CUDA the limit is the
    process's (``set_per_process_memory_fraction``, set in ``run``), so a micro-batch over it fails with an
    out-of-memory error, which is caught and its memory released; on the CPU every probe fits."""
    import torch

    cuda = args.device == "cuda"
    uses_trl = trainer_name.startswith("trl")
    size = args.pairs_per_micro_batch if uses_trl else args.max_tokens_per_batch
    fit, fail, probes = None, None, []
    for _ in range(args.probes):
        model = load_model(uses_trl, args)
        trainer = make_trainer(trainer_name, args, model, tokenizer, data, micro_batch=size, max_steps=1,
                               accumulation=1)
        recorder = steps.attach(trainer, work_tokens, cuda)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        try:
            trainer.train()
            ok = True
        except torch.OutOfMemoryError:
            ok = False
        probes.append({"size": size, "fits": ok, "peak_memory_mib": steps.peak_memory_mib(cuda),
                       "processed_tokens": recorder.steps[0]["processed_tokens"] if ok else None})
        del trainer, recorder, model
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        fit, fail = (size, fail) if ok else (fit, size)
        if fail is None:
            size *= 2
        elif fit is None:
            size //= 2
        elif fail - fit > 1 and len(probes) < args.probes and (fit + fail) // 2 not in {p["size"] for p in probes}:
            size = (fit + fail) // 2
        else:
            break
    return probes


def run(trainer_name: str, args) -> dict:
    import torch

    uses_trl = trainer_name in ("trl", "trl+fastdpo")
    cuda = args.device == "cuda"
    if cuda:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_limit_gib * GiB / total))
    tokenizer, data = load_data(args)
    model = load_model(uses_trl, args)
    trainer = make_trainer(trainer_name, args, model, tokenizer, data)
    recorder = steps.attach(trainer, work_tokens, cuda)
    trainer.train()
    result = {
        "trainer": trainer_name,
        "dataset": dataset_name(args, args.child_dataset or args.dataset[0]),
        "version": package_version("trl" if uses_trl else "fastdpo"),
        "attention": attention_for(uses_trl, args),
        "layout": "padded" if uses_trl else ("shared prefix" if trainer.prefix_sharing else "unshared"),
        **steps.summary(recorder, cuda),
    }
    if args.probe:
        del trainer, recorder, model
        gc.collect()
        result["probes"] = probe(trainer_name, args, tokenizer, data)
    return result


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


def longest_fit(row: dict) -> dict | None:
    """The probe that fit with the most processed tokens, or None."""
    return max((p for p in row.get("probes", ()) if p["fits"]), key=lambda p: p["processed_tokens"], default=None)


def probe_table(rows: list[dict], limit_gib: float) -> str:
    """Each trainer's probes and the longest micro-batch that trained within the limit, against TRL's."""
    lines = [f"| dataset | trainer | probes: size → fits, peak GiB | longest micro-batch within {limit_gib:g} GiB: "
             "processed tokens | ×TRL |", "|---|---|---|---|---|"]
    trl = {r["dataset"]: longest_fit(r) for r in rows if r["trainer"] == "trl"}
    for r in rows:
        if "probes" not in r:
            continue
        best, base = longest_fit(r), trl.get(r["dataset"])
        tried = "; ".join(f"{p['size']} → {'yes' if p['fits'] else 'no'}, {p['peak_memory_mib'] / 1024:.1f}"
                          for p in r["probes"])
        ratio = f"{best['processed_tokens'] / base['processed_tokens']:.2f}" if best and base else "–"
        lines.append(f"| {r['dataset']} | {r['trainer']} | {tried} | "
                     f"{best['processed_tokens'] if best else 'none fit'} | {ratio} |")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(DEFAULT_MODEL))
    p.add_argument("--random-model", choices=list(synthetic.MODELS),
                   help="a randomly initialised model of this shape, trained on --pairs synthetic HH-shaped pairs")
    p.add_argument("--attention", help="fastdpo's attention implementation (default: fastdpo train's on the device)")
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
    p.add_argument("--probe", action="store_true", help="then probe the longest micro-batch within the memory limit")
    p.add_argument("--probes", type=int, default=5, help="micro-batch sizes tried at most")
    p.add_argument("--memory-limit-gib", type=float, default=40.0, help="the CUDA memory each trainer may use")
    p.add_argument("--timeout-s", type=float, help="all trainers' processes together stop within this long")
    p.add_argument("--log", help="append each trainer process's stderr to this file")
    p.add_argument("--out", help="path prefix for .json and .md results")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--child-dataset", help=argparse.SUPPRESS)
    return p


def run_trainers(argv: list[str]) -> tuple[list[dict], str]:
    """(rows, markdown) for the trainers named in ``argv``'s ``--trainers``, each in a fresh process."""
    args = parser().parse_args(argv)
    datasets = [args.dataset[0]] if args.random_model else args.dataset
    rows = [{"dataset": dataset_name(args, dataset), **row} for dataset in datasets
            for row in steps.run_children(__file__, argv, args.trainers.split(","), ["--child-dataset", dataset],
                                          timeout_s=args.timeout_s, log=args.log)]
    ran = [r for r in rows if "skipped" not in r]
    skipped = "".join(f"\n- {r['trainer']} on {r['dataset']} skipped: {r['skipped']}" for r in rows if "skipped" in r)
    precision = "bf16" if args.device == "cuda" else "fp32"
    model = f"random {args.random_model}-shaped model" if args.random_model else "SmolLM2-135M-Instruct"
    names = ", ".join(dataset_name(args, d) for d in datasets)
    md = (f"{model} + LoRA r16, {precision}, {args.pairs} {'untruncated ' * args.untruncated}pairs of "
          f"{names}, max_length {args.max_length}, GA {args.gradient_accumulation_steps}, "
          f"{args.max_tokens_per_batch}-token packed micro-batches, {args.pairs_per_micro_batch} pairs per TRL "
          f"micro-batch\n\n" + table(ran) + skipped)
    if args.probe:
        md += "\n\n" + probe_table(ran, args.memory_limit_gib)
    return rows, md


if __name__ == "__main__":
    steps.main(parser, run, lambda args: run_trainers(sys.argv[1:]))
