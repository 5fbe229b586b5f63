"""Layer 7, cli: the ``fastdpo`` command. A subcommand's module is imported only when it runs (``SUBCOMMANDS``), so
``fastdpo --help`` loads nothing heavy; a subcommand may import every layer below."""

from __future__ import annotations

import argparse
import importlib
import sys

from .. import __version__

#: name -> (one-line help, "module:function" run with (argv, name)); a module per subcommand.
SUBCOMMANDS = {
    "train": ("Preference-tune a causal LM with DPO (packed batches, fused log-probs).", ".training:train"),
    "train-online": ("Online DPO: sample two completions per prompt, rank them with a reward model or an LLM judge, "
                     "train on the ranked pairs (packed batches, fused log-probs).", ".training:train"),
    "sft": ("Supervised fine-tuning, the step before DPO (packed sequences, fused cross-entropy).", ".training:train"),
    "kto": ("KTO on unpaired thumbs-up / thumbs-down rows (TRL's KTOTrainer: packed rows, each with its KL "
            "completion branching off the prompt; fused log-probs).", ".training:train"),
    "plot": ("Plot a run's training curves (loss, rewards) from its trainer_state.json.", ".plot:main"),
}


#: the training commands' functions, for callers that run or parse them programmatically
_LAZY = {"train": ".training", "parse_command": ".options", "command_parser": ".options"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastdpo", description="Fast, memory-lean DPO: fused LM-head log-probs, packed batches.",
        epilog="Run 'fastdpo COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"fastdpo {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, _) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    if not argv or argv[0] not in SUBCOMMANDS:
        args = parser.parse_args(argv)       # --help, --version, or an unknown command's error
        parser.print_help()
        return 0 if args.command is None else 2
    module, function = SUBCOMMANDS[argv[0]][1].split(":")
    run = getattr(importlib.import_module(module, __name__), function)
    try:
        run(argv[1:], argv[0])
    except (ValueError, FileNotFoundError, ModuleNotFoundError) as e:
        print(f"fastdpo {argv[0]}: error: {_with_what_to_do(e, argv[0])}", file=sys.stderr)
        return 2
    return 0


def _with_what_to_do(error: Exception, command: str) -> str:
    """The error's message, ending with a line saying what to do (the message's own, where it has one)."""
    message = str(error).rstrip()
    if "\nWhat to do:" in message:
        return message
    if isinstance(error, ModuleNotFoundError):
        hint = f"pip install {error.name}" if error.name else "install the missing package"
    elif isinstance(error, FileNotFoundError):
        hint = "check the path (relative paths start from the current directory), or give a hub name"
    else:
        hint = (f"correct the option or the data named above; 'fastdpo {command} --help' describes every option, "
                "the README's \"Bad input\" table every check")
    return f"{message}\nWhat to do: {hint}."

