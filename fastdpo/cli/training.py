"""The training commands: ``fastdpo train`` preference-tunes a causal LM with fused log-probs on a preference dataset,
``fastdpo train-online`` does online DPO on a dataset of prompts, ``fastdpo sft`` supervised fine-tuning (the step
before DPO), ``fastdpo kto`` KTO on unpaired rows. Their options and what tells them apart: ``fastdpo.cli.options``
(``COMMANDS``).

A run prints its memory estimate and the settings chosen to fit it (``fastdpo.cli.memory``), and ends with a
first → last table of the metrics (``fastdpo.cli.report``) and ``training_curves.png`` (``fastdpo.cli.plot``).
"""

from __future__ import annotations

import logging
import os
import resource
import time
import warnings

import torch
from transformers import set_seed
from transformers.trainer_utils import get_last_checkpoint

from .memory import apply_memory_plan
from .options import COMMANDS, RunArguments, parse_command
from .plot import curves_after_training
from .report import finished, first_last_table


def _checkpoint_to_resume(args) -> str | None:
    """``--resume-from-checkpoint PATH``, or ``true``/``last`` for the newest checkpoint in ``--output-dir``."""
    resume = args.resume_from_checkpoint
    if resume is None or resume.lower() not in ("true", "last"):
        return resume
    last = get_last_checkpoint(args.output_dir) if os.path.isdir(args.output_dir) else None
    if last is None:
        raise FileNotFoundError(f"--resume-from-checkpoint {resume}: no checkpoint in {args.output_dir}")
    return last


def load_policy(script: RunArguments, args, *, reference: bool):
    """(tokenizer or a vision-language model's processor, policy, reference model or None) as the command line asks:
    the source resolved, the model loaded (4-bit with ``--load-in-4bit``), wrapped in a saved or a new LoRA adapter (a
    vision tower frozen unless ``--train-vision-tower``), and, for a command with a ``reference`` (its config's adapter
    names, ``script.ref_model``), ``--ref-model``."""
    from ..models import (
        apply_lora,
        default_attn_implementation,
        load_causal_lm,
        load_lora_adapter,
        load_processing_class,
        resolve_model,
        set_encoder_trainable,
    )

    source = resolve_model(script.model)
    tokenizer = load_processing_class(source, trust_remote_code=script.trust_remote_code)
    load = dict(dtype=getattr(torch, script.dtype), trust_remote_code=script.trust_remote_code,
                attn_implementation=script.attn_implementation or default_attn_implementation(args.device.type))
    model = load_causal_lm(source, load_in_4bit=script.load_in_4bit, **load)
    if script.adapter:
        # the configs of DPO's commands name the adapters; KTO's and SFT's train the one adapter
        names = (getattr(args, "model_adapter_name", None), getattr(args, "ref_adapter_name", None))
        model = load_lora_adapter(model, script.adapter, adapter_name=names[0] or "default", ref_adapter_name=names[1],
                                  quantized=script.load_in_4bit)
    elif script.use_peft:
        model = apply_lora(model, r=script.lora_r, alpha=script.lora_alpha, dropout=script.lora_dropout,
                           target_modules=script.lora_target_modules, quantized=script.load_in_4bit,
                           train_vision=script.train_vision_tower)
    else:
        set_encoder_trainable(model, script.train_vision_tower)
    ref_model = load_causal_lm(resolve_model(script.ref_model), **load) if reference and script.ref_model else None
    return tokenizer, model, ref_model


def begin_run() -> float:
    """Logging as every train command has it; returns the run's start time (``time.perf_counter``)."""
    # fastdpo's progress at INFO; other libraries' INFO chatter (accelerate on every evaluation) stays out
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("fastdpo").setLevel(logging.INFO)
    # peft reads transformers' deprecated alias itself; nothing a user can change
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    return time.perf_counter()


def load_data(script: RunArguments, args):
    """(train, eval or None) datasets as the command line asks. Called before the model loads, so that a mistyped
    path or a broken file fails before minutes of model loading."""
    from ..data import load_rows

    return load_rows(script.dataset, split=script.dataset_split, eval_split=script.eval_split,
                                   eval_fraction=script.eval_fraction, max_samples=script.max_samples, seed=args.seed)


def finish_run(trainer, args, start: float, *, metrics: tuple[str, ...], eval_pairs: int | None = None,
               estimated_peak_mib: float | None = None) -> dict:
    """Train ``trainer`` to the end (resuming as ``--resume-from-checkpoint`` asks), save the model or adapter with
    the tokenizer and ``trainer_state.json`` (the metric history, also without checkpoints), draw the curves, and
    print and return the summary (wall time, peak RSS, the estimate, dropped rows, the curves' path).

    Raises:
        ValueError: no optimiser step of the run trained on anything (``PackedTrainer.tally``), with the reason.
    """
    drops = trainer.drop_reports
    for split, report in drops.items():
        print(f"[fastdpo] {split}: {report}", flush=True)
    trainer.train(resume_from_checkpoint=_checkpoint_to_resume(args))
    tally = trainer.tally
    if tally.steps and not tally.trained:
        raise ValueError(f"none of this run's {tally.steps} optimiser step(s) trained on anything, so the model was "
                         f"not saved; in the last one, {tally.untrained_reason}")
    trainer.save_model()
    trainer.save_state()
    summary = {
        "wall_time_s": time.perf_counter() - start,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "estimated_peak_mib": estimated_peak_mib,
        "drops": drops,
        "output_dir": args.output_dir,
        "curves": curves_after_training(args.output_dir) if trainer.is_world_process_zero() else None,
    }
    table = first_last_table(trainer.state.log_history, eval_pairs, metrics)
    print(finished(summary["wall_time_s"], summary["peak_rss_mib"], args.output_dir, table, estimated_peak_mib),
          flush=True)
    # Every process waits for the main one (it draws the curves), then the process group is destroyed (accelerate's
    # shutdown): a non-main rank exiting alone aborted ("terminate called without an active exception") in 1 of 6
    # 2-process runs with a precomputed reference, 0 of 24 with the wait.
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()
    return summary


def train(argv: list[str], command: str = "train"):
    """Run the training command ``command`` (``fastdpo train``, ``train-online``, ``sft`` or ``kto``): returns the finished
    trainer and a summary (wall time, peak RSS and its estimate, dropped rows, the curves' path), which is also
    printed."""
    spec = COMMANDS[command]
    script, args, given = parse_command(argv, command)
    start = begin_run()
    train_ds, eval_ds = load_data(script, args)
    # Seeded before the model is built, so LoRA's random init is the same in every run and on every rank.
    set_seed(args.seed, deterministic=args.full_determinism)
    tokenizer, model, ref_model = load_policy(script, args, reference=spec.reference)
    args, plan = apply_memory_plan(args, given, model, spec.shape(args), ref_model)
    # a command without evaluation refuses eval options (parse_command), so eval_ds is None there
    trainer = spec.load("trainer")(model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                                   processing_class=tokenizer, **({"ref_model": ref_model} if spec.reference else {}))
    eval_rows = len(trainer.eval_dataset) if trainer.eval_dataset else None
    return trainer, finish_run(trainer, args, start, metrics=spec.metrics, eval_pairs=eval_rows,
                               estimated_peak_mib=plan.estimate / 2**20)
