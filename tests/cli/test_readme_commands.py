"""Every `fastdpo train`, `train-online` and `sft` command in the README's shell blocks parses with today's CLI (a
renamed or removed option fails here, not in a new user's first hour)."""

import re
import shlex
from pathlib import Path

import pytest

from fastdpo.cli.options import parse_train_args
from fastdpo.cli.sft import parse_sft_args

README = Path(__file__).resolve().parents[2] / "README.md"
PARSERS = {"train": parse_train_args, "train-online": lambda argv: parse_train_args(argv, "train-online"),
           "sft": parse_sft_args}


def readme_commands() -> list[list[str]]:
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)
    lines = "\n".join(blocks).replace("\\\n", " ").splitlines()
    return [shlex.split(line, comments=True) for line in lines if line.strip().startswith("fastdpo ")]


COMMANDS = [argv for argv in readme_commands() if argv[1] in PARSERS]


def test_the_readme_has_the_commands():
    assert {argv[1] for argv in COMMANDS} == set(PARSERS)


@pytest.mark.parametrize("argv", COMMANDS, ids=lambda argv: " ".join(argv[1:4]))
def test_readme_command_parses(argv):
    script, args = PARSERS[argv[1]](argv[2:])
    assert script.dataset and args.output_dir
