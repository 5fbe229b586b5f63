"""``fastdpo sft``: supervised fine-tuning (the step before ``fastdpo train``) with packed sequences and the fused
LM head. Options: the model and data options of ``fastdpo train`` (``TrainArguments``) and ``fastdpo.SFTConfig``
(all of ``transformers.TrainingArguments``); ``--config file.yaml`` supplies defaults that the command line overrides.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import HfArgumentParser, set_seed

from . import SUBCOMMANDS
from .options import parse_with_config
from .report import SFT_METRICS
from .training import TrainArguments, begin_run, finish_run, load_data, load_policy


@dataclass
class SFTArguments(TrainArguments):
    """``fastdpo train``'s model and data options, for SFT data (``--ref-model`` does not apply)."""

    dataset: str | None = field(default=None, metadata={
        "help": "SFT data: a .json/.jsonl/.jsonl.gz/.parquet/.csv file, a directory of them, or a hub dataset name. "
                "Rows in TRL's SFT formats: text (--dataset-text-field), prompt + completion (strings or message "
                "lists), messages; or preference rows, trained on their chosen completions. (required)"})


def _parser():
    from ..sft import SFTConfig

    return HfArgumentParser((SFTArguments, SFTConfig), prog="fastdpo sft", description=SUBCOMMANDS["sft"][0])


def parse_sft_args(argv: list[str]):
    """(SFTArguments, SFTConfig) from the command line and an optional ``--config`` YAML file.

    Raises:
        SystemExit: unknown options or YAML keys, a missing dataset or config file, ``--ref-model``, 4-bit
            without LoRA, both eval options (argparse's usage error, exit status 2).
    """
    parser = _parser()
    script, args = parse_with_config(parser, argv)
    if script.ref_model:
        parser.error("supervised fine-tuning has no reference model: drop --ref-model")
    return script, args


def sft(argv: list[str]):
    """Run ``fastdpo sft``: returns the finished ``SFTTrainer`` and a summary (wall time, peak RSS, the
    tokenisation reports), which is also printed. Saves the model or adapter with the tokenizer to
    ``--output-dir``, ``trainer_state.json`` and, where matplotlib is installed, the training curves (``fastdpo plot``)."""
    from ..sft import SFTTrainer

    script, args = parse_sft_args(argv)
    start = begin_run()
    train_ds, eval_ds = load_data(script, args)
    set_seed(args.seed, deterministic=args.full_determinism)   # before the model: LoRA's init is seeded
    tokenizer, model, _ = load_policy(script, args)
    trainer = SFTTrainer(model, args=args, train_dataset=train_ds, eval_dataset=eval_ds, processing_class=tokenizer)
    return trainer, finish_run(trainer, args, start, metrics=SFT_METRICS)


def main(argv: list[str], name: str = "sft") -> None:
    """The ``fastdpo sft`` subcommand (``fastdpo.cli.main`` turns ValueError/FileNotFoundError into exit 2)."""
    sft(argv)
