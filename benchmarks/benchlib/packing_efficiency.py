"""Packing efficiency on whole preference samples: tokenisation and batching only, no training.

Each trainer is built as it would be for training (the same tokenizer, ``max_length`` and seed) but
around a one-layer model with random weights, and its own training data loader is walked once:
TRL's ``DataCollatorForPreference`` pads each micro-batch of pairs to its longest sequence, fastdpo's
loader packs whole pairs into a token budget. For every micro-batch:

* real tokens: tokens of ``prompt + chosen`` and ``prompt + rejected`` (the prompt twice, as both
  trainers feed it), i.e. TRL's ``attention_mask.sum()``;
* processed tokens: positions the model runs on, ``input_ids.numel()`` (padding included).

Packing efficiency = real / processed over the sample. For fastdpo, budget fill = processed tokens /
(micro-batches × ``max_tokens_per_batch``): how full the packed micro-batches are, which sets how
many micro-batches (optimiser work per step) a sample takes, not wasted compute.

``sharing`` counts what prefix sharing saves on top: the tokens of the first pairs of a sample, untruncated, with
the prompt twice (``[prompt + chosen][prompt + rejected]``) and once (``[prompt][chosen][rejected]``).

    python -m benchlib.packing_efficiency --sharing --out results/cpu-prefix-sharing-tokens   (from benchmarks/)
"""

from __future__ import annotations

import tempfile

SETTINGS = {"trl": [2, 8], "fastdpo": [2048, 8192]}   # pairs per micro-batch / token budget


def _tiny_model(vocab_size: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))


def _loader(trainer_name: str, setting: int, dataset, tokenizer, max_length: int):
    common = dict(output_dir=tempfile.mkdtemp(prefix="bench-packing-"), report_to=[], use_cpu=True, bf16=False,
                  max_length=max_length, seed=0, disable_tqdm=True)
    if trainer_name == "trl":
        from trl import DPOConfig, DPOTrainer

        args = DPOConfig(per_device_train_batch_size=setting, **common)
    else:
        from fastdpo import DPOConfig, DPOTrainer

        args = DPOConfig(max_tokens_per_batch=setting, **common)
    # an explicit reference model: TRL would otherwise reload the policy from its (absent) hub id
    trainer = DPOTrainer(model=_tiny_model(len(tokenizer)), ref_model=_tiny_model(len(tokenizer)), args=args,
                         train_dataset=dataset, processing_class=tokenizer)
    return trainer.get_train_dataloader(), len(trainer.train_dataset)


def measure(trainer_name: str, setting: int, dataset, tokenizer, max_length: int) -> dict:
    loader, pairs = _loader(trainer_name, setting, dataset, tokenizer, max_length)
    batches = real = processed = 0
    for batch in loader:
        ids = batch["input_ids"]
        batches += 1
        processed += ids.numel()
        real += int(batch["attention_mask"].sum()) if "attention_mask" in batch else ids.numel()
    row = {"trainer": trainer_name, "pairs": pairs, "micro_batches": batches, "real_tokens": real,
           "processed_tokens": processed, "efficiency": real / processed}
    if trainer_name == "trl":
        row["pairs_per_micro_batch"] = setting
    else:
        row["max_tokens_per_batch"] = setting
        row["budget_fill"] = processed / (batches * setting)
    return row


def run(datasets_by_name: dict[str, str], model_path: str, max_length: int = 1024, log=print) -> list[dict]:
    """Rows for every (dataset, trainer, setting)."""
    import datasets

    from fastdpo.models import load_tokenizer, resolve_model

    tokenizer = load_tokenizer(resolve_model(model_path))
    rows = []
    for name, path in datasets_by_name.items():
        data = datasets.load_dataset("json", data_files=str(path), split="train")
        for trainer_name, settings in SETTINGS.items():
            for setting in settings:
                row = {"dataset": name, "rows": len(data), "max_length": max_length,
                       **measure(trainer_name, setting, data, tokenizer, max_length)}
                log(row)
                rows.append(row)
    return rows


def sharing(datasets_by_name: dict[str, str], model_path: str, pairs: int = 500) -> list[dict]:
    """Per sample: tokens of its first ``pairs`` pairs (fastdpo's tokenisation, untruncated), prompt twice and once."""
    import datasets

    from fastdpo.data import pair_length, tokenize_pairs
    from fastdpo.models import load_tokenizer, resolve_model

    tokenizer = load_tokenizer(resolve_model(model_path))
    rows = []
    for name, path in datasets_by_name.items():
        data = datasets.load_dataset("json", data_files=str(path), split="train")
        tokenized, _ = tokenize_pairs(data.select(range(min(pairs, len(data)))), tokenizer, max_length=None,
                                      max_prompt_length=None)
        twice, once = (sum(pair_length(row, shared) for row in tokenized) for shared in (False, True))
        rows.append({"dataset": name, "pairs": len(tokenized), "prompt_twice": twice, "prompt_once": once,
                     "fewer": twice / once})
    return rows


def sharing_table(rows: list[dict]) -> str:
    lines = ["| dataset | pairs | tokens, prompt twice | tokens, prompt once | × fewer |", "|---|---|---|---|---|"]
    lines += [f"| {r['dataset']} | {r['pairs']} | {r['prompt_twice']:,} | {r['prompt_once']:,} | {r['fewer']:.2f} |"
              for r in rows]
    return "\n".join(lines)


def table(rows: list[dict]) -> str:
    lines = ["| dataset | trainer | micro-batch | pairs | micro-batches | real tokens | processed tokens "
             "| packing efficiency | budget fill |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        setting = (f"{r['pairs_per_micro_batch']} pairs, padded" if r["trainer"] == "trl"
                   else f"≤ {r['max_tokens_per_batch']} tokens, packed")
        fill = f"{r['budget_fill']:.2f}" if "budget_fill" in r else "–"
        lines.append(f"| {r['dataset']} | {r['trainer']} | {setting} | {r['pairs']} | {r['micro_batches']} | "
                     f"{r['real_tokens']} | {r['processed_tokens']} | {r['efficiency']:.3f} | {fill} |")
    return "\n".join(lines)


if __name__ == "__main__":
    import argparse
    from pathlib import Path

    from .env import header, metadata
    from .paths import DEFAULT_MODEL, HH_DATA, ULTRAFEEDBACK_DATA
    from .report import write

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sharing", action="store_true", help="only the prefix-sharing token counts")
    parser.add_argument("--out", help="path prefix for the .json and .md results")
    args = parser.parse_args()
    samples = {"HH harmless": HH_DATA, "UltraFeedback": ULTRAFEEDBACK_DATA}
    meta = metadata("cpu")
    if args.sharing:
        rows = sharing(samples, str(DEFAULT_MODEL))
        md = f"{header(meta)}\n\nSmolLM2-135M-Instruct's tokenizer, the first 500 pairs of each sample, untruncated.\n\n"
        md += sharing_table(rows)
    else:
        rows = run(samples, str(DEFAULT_MODEL))
        md = f"{header(meta)}\n\n{table(rows)}"
    print(md)
    if args.out:
        write(Path(args.out), {"meta": meta, "rows": rows}, md)
