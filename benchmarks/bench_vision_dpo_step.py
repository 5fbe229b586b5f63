"""One vision-language DPO training step, end to end: fastdpo's trainer (shared-prefix and unshared layouts) against
TRL's DPOTrainer, same model, rows and settings.

The model is a randomly initialised Qwen2-VL of ``--decoder`` / ``--vision`` shape (``tests/_vision.py``, the tiny
models' fixture module, its processor assembled locally: nothing to download), LoRA r 16 on the language model, the
vision tower frozen, the reference the policy with its adapter disabled, fp32 on the CPU; the rows are ``--pairs``
conversational pairs with ``--images-per-pair`` random ``--image-size``² images each (448² is 256 image tokens a
picture) and short text, so that a pair's work is mostly its image and prompt. TRL 1.16 concatenates chosen and
rejected, so each pair's images go through the vision tower and the decoder twice per model pass; fastdpo's shared
layout runs them once (its unshared layout twice, as TRL).

Each trainer runs in a fresh process. Reported per trainer, over the optimiser steps after the first: work pairs/s
(pairs trained over step time), median step time, peak RSS (the process's, so each trainer's own), and the images
the vision tower encoded per image of a trained pair in the policy pass (grad enabled) and in the reference pass.

    pip install -e ".[peers]"     # TRL
    python benchmarks/bench_vision_dpo_step.py --out benchmarks/results/cpu-vision-dpo-step
    python benchmarks/bench_vision_dpo_step.py --dry-run --out /tmp/vision-dry      # the whole path in ~1 minute
"""

from __future__ import annotations

import argparse
import sys

from benchlib import steps
from benchlib.env import package_version
from benchlib.paths import REPO_DIR

sys.path.insert(0, str(REPO_DIR / "tests"))   # _vision: the tiny vision models' builders, shared with the tests

#: Qwen2-VL decoder and vision tower shapes: ``small`` the timed run's (head dim 64 and 4:1 grouped KV heads, as
#: Qwen2-VL-2B's; the vision tower about a fifth of the decoder's weights, run on 4× as many patches as image tokens),
#: ``tiny`` the dry run's.
DECODERS = {"small": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
                          num_key_value_heads=2, initializer_range=0.02),
            "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2)}
VISION = {"small": dict(depth=4, embed_dim=256, num_heads=4), "tiny": dict(depth=2, embed_dim=32, num_heads=4)}
DRY_RUN = ["--pairs", "4", "--steps", "2", "--image-size", "56", "--pairs-per-micro-batch", "2",
           "--decoder", "tiny", "--vision", "tiny", "--max-tokens-per-batch", "256"]


def processor(args):
    import _vision

    return _vision.qwen2_vl_processor(max_pixels=args.image_size ** 2)


def model(args, proc, attention: str):
    """The Qwen2-VL of --decoder / --vision shape with LoRA on its language model (seeded: the same on every side)."""
    import torch

    import _vision
    from fastdpo.models import apply_lora

    config = _vision.qwen2_vl_config(proc, DECODERS[args.decoder])
    config.vision_config.update(VISION[args.vision])
    config.use_cache = False
    torch.manual_seed(0)
    with torch.device("cpu"):
        from transformers import Qwen2VLForConditionalGeneration

        built = Qwen2VLForConditionalGeneration._from_config(
            config, attn_implementation={"text_config": attention, "vision_config": "sdpa"})
    return apply_lora(built, r=16, alpha=32, dropout=0.05)


def rows(args):
    """--pairs rows of --images-per-pair random square images and a few words of text each."""
    import datasets

    import _vision

    size = (args.image_size, args.image_size)
    out = _vision.vision_rows(args.pairs, args.images_per_pair, sizes=(size,))
    return datasets.Dataset.from_list(out)


class VisionCount:
    """Images the vision tower encodes (rows of its ``grid_thw``), in grad-enabled (policy) and no-grad (reference)
    passes: a forward pre-hook on the model's ``visual`` module."""

    def __init__(self, policy):
        import torch

        self.policy = self.reference = 0
        tower = next(m for name, m in policy.named_modules() if name.endswith("visual"))

        def count(module, args, kwargs):
            grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
            if torch.is_grad_enabled():
                self.policy += len(grid)
            else:
                self.reference += len(grid)

        tower.register_forward_pre_hook(count, with_kwargs=True)


def make_trainer(name: str, args, policy, proc, data):
    common = dict(output_dir=f"/tmp/bench-vision-{name}", report_to=[], use_cpu=True, bf16=False, fp16=False,
                  gradient_checkpointing=False, learning_rate=3e-4, max_steps=args.steps, logging_steps=args.steps,
                  save_strategy="no", disable_tqdm=True, gradient_accumulation_steps=args.gradient_accumulation_steps,
                  max_length=None, beta=0.1, seed=0)    # no truncation: it would cut image tokens
    if name == "trl":
        from trl import DPOConfig, DPOTrainer

        config = DPOConfig(per_device_train_batch_size=args.pairs_per_micro_batch, **common)
    else:
        from fastdpo import DPOConfig, DPOTrainer

        config = DPOConfig(max_tokens_per_batch=args.max_tokens_per_batch, prefix_sharing=name == "fastdpo", **common)
    return DPOTrainer(model=policy, args=config, train_dataset=data, processing_class=proc)


def run(name: str, args) -> dict:
    from fastdpo.models import default_attn_implementation

    attention = "sdpa" if name == "trl" else default_attn_implementation("cpu")
    proc = processor(args)
    policy = model(args, proc, attention)
    trainer = make_trainer(name, args, policy, proc, rows(args))
    count = VisionCount(policy)
    # the unit of work is the pair (TRL's collator tokenises raw rows: there are no token columns to count)
    recorder = steps.attach(trainer, lambda row: 1, cuda=False)
    trainer.train()
    timed = recorder.steps[1:]
    images = sum(s["rows"] for s in recorder.steps) * args.images_per_pair
    result = {"trainer": name, "version": package_version("trl" if name == "trl" else "fastdpo"),
              "attention": attention,
              "layout": "padded" if name == "trl" else ("shared prefix" if trainer.prefix_sharing else "unshared"),
              **steps.summary(recorder, cuda=False),
              "pairs_per_s": sum(s["rows"] for s in timed) / sum(s["time_s"] for s in timed),
              "vision_per_image_policy": count.policy / images, "vision_per_image_reference": count.reference / images}
    return result


def table(rows: list[dict]) -> str:
    """Markdown rows; ratios against TRL's row (when it ran). Peak RSS holds the process's floor (imports, model,
    data: "before training"), which both trainers pay; "training MiB" is the peak above it."""
    lines = ["| trainer | attention | layout | processed tokens/pair | median step s | pairs/step | work pairs/s | "
             "×TRL | peak RSS MiB | ×TRL | before training MiB | training MiB | ×TRL | "
             "vision tower runs per image: policy, reference |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    trl = next((r for r in rows if r["trainer"] == "trl"), None)
    for r in rows:
        speed = f"{r['pairs_per_s'] / trl['pairs_per_s']:.2f}" if trl else "–"
        memory = f"{r['peak_memory_mib'] / trl['peak_memory_mib']:.2f}" if trl else "–"
        training = r["peak_memory_mib"] - r["setup_peak_memory_mib"]
        own = f"{training / (trl['peak_memory_mib'] - trl['setup_peak_memory_mib']):.2f}" if trl else "–"
        lines.append(f"| {r['trainer']} {r['version']} | {r['attention']} | {r['layout']} | "
                     f"{r['processed_tokens_per_row']:.0f} | {r['median_step_s']:.2f} | {r['rows_per_step']:.1f} | "
                     f"{r['pairs_per_s']:.2f} | {speed} | {r['peak_memory_mib']:.0f} | {memory} | "
                     f"{r['setup_peak_memory_mib']:.0f} | {training:.0f} | {own} | "
                     f"{r['vision_per_image_policy']:g}, {r['vision_per_image_reference']:g} |")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true",
                   help="the whole path at a tiny size (" + " ".join(DRY_RUN) + "); times mean nothing")
    p.add_argument("--device", default="cpu", choices=["cpu"], help="the CPU only (fp32)")
    p.add_argument("--decoder", default="small", choices=list(DECODERS))
    p.add_argument("--vision", default="small", choices=list(VISION))
    p.add_argument("--pairs", type=int, default=48)
    p.add_argument("--images-per-pair", type=int, default=1)
    p.add_argument("--image-size", type=int, default=448, help="square images of this side (a multiple of 28)")
    p.add_argument("--steps", type=int, default=6, help="optimiser steps (the first is not timed)")
    p.add_argument("--pairs-per-micro-batch", type=int, default=8, help="TRL's per_device_train_batch_size")
    p.add_argument("--max-tokens-per-batch", type=int, default=2816,
                   help="fastdpo's packed micro-batch budget (2816: eight 448² pairs shared, as TRL's eight; a pair "
                        "takes 318 to 346 tokens shared, 616 to 644 unshared)")
    p.add_argument("--gradient-accumulation-steps", type=int, default=1)
    p.add_argument("--trainers", default="fastdpo,fastdpo-unshared,trl", help="fastdpo, fastdpo-unshared, trl")
    p.add_argument("--timeout-s", type=float, help="all trainers' processes together stop within this long")
    p.add_argument("--log", help="append each trainer process's stderr to this file")
    p.add_argument("--out", help="path prefix for .json and .md results")
    p.add_argument("--child", help=argparse.SUPPRESS)
    return p


def run_trainers(argv: list[str]) -> tuple[list[dict], str]:
    """(rows, markdown) for the trainers of ``argv``'s ``--trainers``, each in a fresh process."""
    args = parser().parse_args(argv)
    rows = steps.run_children(__file__, argv, args.trainers.split(","), timeout_s=args.timeout_s, log=args.log)
    ran = [r for r in rows if "skipped" not in r]
    skipped = "".join(f"\n- {r['trainer']} skipped: {r['skipped']}" for r in rows if "skipped" in r)
    md = (f"random Qwen2-VL ({args.decoder} decoder, {args.vision} vision tower) + LoRA r16 on the language model, "
          f"fp32, {args.pairs} pairs of {args.images_per_pair} {args.image_size}² image(s) and short text, GA "
          f"{args.gradient_accumulation_steps}, {args.max_tokens_per_batch}-token packed micro-batches, "
          f"{args.pairs_per_micro_batch} pairs per TRL micro-batch{' (dry run)' * args.dry_run}\n\n"
          + table(ran) + skipped)
    return rows, md


if __name__ == "__main__":
    if "--dry-run" in sys.argv:    # its sizes first, so that options given after them win
        sys.argv[1:1] = DRY_RUN
    steps.main(parser, run, lambda args: run_trainers(sys.argv[1:]))
