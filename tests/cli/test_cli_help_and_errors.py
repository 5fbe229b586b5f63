"""`fastdpo train --help` (and train-online's, sft's) in groups, the options a user of the command needs first; bad
input gets an error naming the problem and ending with what to do; a broken JSON Lines file is named with its line and
column."""

import gzip
import json

import pytest

from fastdpo import cli
from fastdpo.cli.options import HELP_GROUPS, OTHER_FIELDS
from fastdpo.data import load_rows

GOOD = {"prompt": "What is 2 + 2?", "chosen": " 4.", "rejected": " 5."}


def help_text(command, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([command, "--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


DPO_NEEDS = ("--dataset", "--model", "--use_peft", "--beta", "--loss_type", "--ref_model", "--learning_rate",
             "--num_train_epochs", "--activation_checkpointing")
SFT_NEEDS = ("--dataset", "--model", "--use_peft", "--completion_only_loss", "--assistant_only_loss", "--loss_type",
             "--packing", "--learning_rate", "--num_train_epochs", "--activation_checkpointing")


@pytest.mark.parametrize("command", ["train", "train-online", "sft"])
def test_help_groups_in_order(command, capsys):
    out = help_text(command, capsys)
    assert out.startswith(f"usage: fastdpo {command} --dataset DATA [--model MODEL] [options]\n")
    titles = [t for t in [*HELP_GROUPS, OTHER_FIELDS] if f"\n{t}:\n" in out]
    assert titles[:2] == ["data", "model"] and titles[-1] == OTHER_FIELDS
    positions = [out.index(f"\n{t}:\n") for t in titles]
    assert positions == sorted(positions)
    other = out.index(f"\n{OTHER_FIELDS}:\n")
    for needed in SFT_NEEDS if command == "sft" else DPO_NEEDS:
        assert out.index(f"  {needed} ") < other, needed
    assert out.index("--adam_beta1") > other
    if command == "train":
        assert out.index("--precompute_ref_log_probs") < other and "--judge" not in out[:other]
    elif command == "train-online":
        assert out.index("--judge") < other
    else:   # SFT's own options: no DPO loss, no reference
        assert "SFT data and loss" in titles and "--beta" not in out and "--ref_model" not in out


def test_bad_json_lines_names_file_line_and_column(tmp_path, capsys):
    bad = tmp_path / "pairs.jsonl"
    bad.write_text(json.dumps(GOOD) + '\n{"prompt": 3, "chosen": "a"\n' + json.dumps(GOOD) + "\n")
    with pytest.raises(ValueError) as e:
        load_rows(str(bad))
    message = str(e.value)
    assert message.startswith(f"{bad}: line 2, column 28: Expecting ',' delimiter; found the end of the line")
    assert message.splitlines()[-1].startswith("What to do:") and "line 2" in message.splitlines()[-1]
    assert cli.main(["train", "--dataset", str(bad), "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"fastdpo train: error: {bad}: line 2, column 28" in err and err.rstrip().count("What to do:") == 1


def test_bad_gzipped_json_lines_and_json_array(tmp_path):
    gz = tmp_path / "pairs.jsonl.gz"
    with gzip.open(gz, "wt") as f:
        f.write("".join(json.dumps(GOOD) + "\n" for _ in range(3)) + '{"prompt": "q", chosen: 1}\n')
    with pytest.raises(ValueError, match=r"line 4, column 17: Expecting property name .* found 'chosen: 1}'"):
        load_rows(str(gz))
    array = tmp_path / "pairs.json"
    array.write_text("[\n" + json.dumps(GOOD) + ",\n" + json.dumps(GOOD)[:-1] + "\n")
    with pytest.raises(ValueError, match=r"pairs.json: line 4, column 1: .* found the end of the file\n.*one JSON "
                                         r"array of objects; the file ends before its JSON does"):
        load_rows(str(array))


def test_valid_json_still_loads_and_other_errors_are_untouched(tmp_path):
    good = tmp_path / "pairs.jsonl"
    good.write_text(json.dumps(GOOD) + "\n\n" + json.dumps(GOOD) + "\n")
    assert len(load_rows(str(good))[0]) == 2


def test_every_cli_error_ends_with_what_to_do(tmp_path, capsys):
    assert cli.main(["train", "--dataset", str(tmp_path / "missing.jsonl"), "--output-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.rstrip().splitlines()
    assert "no such file or directory" in err[0] and err[-1].startswith("What to do: check the path")
    unsupported = tmp_path / "pairs.txt"
    unsupported.write_text("x")
    assert cli.main(["train", "--dataset", str(unsupported), "--output-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.rstrip().splitlines()
    assert "unsupported file type" in err[0] and err[-1].startswith("What to do: correct the option or the data")
