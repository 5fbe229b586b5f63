"""Every `fastdpo train`, `train-online` and `sft` command in the README's shell blocks parses with today's CLI (a
renamed or removed option fails here, not in a new user's first hour)."""

import re
import shlex
from pathlib import Path

import pytest

from fastdpo.cli.options import COMMANDS, parse_command

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_commands() -> list[list[str]]:
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)
    lines = "\n".join(blocks).replace("\\\n", " ").splitlines()
    return [shlex.split(line, comments=True) for line in lines if line.strip().startswith("fastdpo ")]


TRAINING = [argv for argv in readme_commands() if argv[1] in COMMANDS]


def test_the_readme_has_the_commands():
    assert {argv[1] for argv in TRAINING} == set(COMMANDS)


@pytest.mark.parametrize("argv", TRAINING, ids=lambda argv: " ".join(argv[1:4]))
def test_readme_command_parses(argv):
    script, args, _ = parse_command(argv[2:], argv[1])
    assert script.dataset and args.output_dir
