"""A tiny real `fastdpo train` run, then what the new user sees of it: the memory estimate and the settings chosen at
the start, the first → last table at the end, training_curves.png, and `fastdpo plot` on its trainer_state.json."""

import contextlib
import io
import json

import pytest

from _shared import write_tiny_run
from fastdpo import cli
from fastdpo.cli.plot import load_history, write_curves
from fastdpo.cli.report import first_last_table, wilson_interval

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """(output dir, stdout, summary) of a 2-epoch LoRA run of a tiny random Llama on 12 + 4 pairs, budget unset."""
    root = tmp_path_factory.mktemp("tiny-run")
    model_dir, data = write_tiny_run(root)
    out, stdout = root / "out", io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(stdout):
        mp.setenv("FASTDPO_CACHE", str(root / "cache"))
        _, summary = cli.train(["--model", str(model_dir), "--dataset", str(data), "--eval-fraction", "0.25",
                                "--use-peft", "--learning-rate", "1e-3", "--num-train-epochs", "2", "--logging-steps",
                                "1", "--eval-strategy", "epoch", "--eval-on-start", "true", "--max-length", "64",
                                "--output-dir", str(out), "--report-to", "none", "--save-strategy", "no",
                                "--disable-tqdm", "true"])
    return out, stdout.getvalue(), summary


def test_memory_estimate_and_choices_are_printed(tiny_run):
    _, stdout, summary = tiny_run
    assert "[fastdpo] memory: estimated peak" in stdout and "GiB available" in stdout
    # max_length 64: a pair needs up to 128 tokens; fastdpo picked the CPU budget and kept 4096 tokens per step
    assert "chose --max-tokens-per-batch 1024, --gradient-accumulation-steps 4" in stdout
    assert "--activation-checkpointing false" in stdout
    assert summary["estimated_peak_mib"] > 0


def test_the_user_setting_is_kept(tmp_path, monkeypatch, capsys):
    model_dir, data = write_tiny_run(tmp_path, pairs=4)
    cli.train(["--model", str(model_dir), "--dataset", str(data), "--max-tokens-per-batch", "300", "--max-steps", "1",
               "--activation-checkpointing", "true", "--output-dir", str(tmp_path / "out"), "--report-to", "none",
               "--save-strategy", "no", "--disable-tqdm", "true", "--max-length", "64"])
    out = capsys.readouterr().out
    assert "300-token micro-batches, activation checkpointing on" in out and "chose" not in out


def test_end_of_run_table(tiny_run):
    _, stdout, _ = tiny_run
    table = stdout[stdout.index("first → last:"):]
    for row in ("train loss", "train rewards/margins", "train rewards/accuracies", "eval loss",
                "eval rewards/margins", "eval rewards/accuracies"):
        assert row in table
    assert "eval over 4 pairs" in table and "(step 0 → 2)" in table


def test_curves_written_at_the_end_and_by_the_plot_command(tiny_run, tmp_path):
    out, stdout, summary = tiny_run
    curves = out / "training_curves.png"
    assert summary["curves"] == curves and curves.read_bytes()[:8] == PNG
    assert f"training curves: {curves}" in stdout
    target = tmp_path / "curves.png"
    assert cli.main(["plot", str(out), "-o", str(target)]) == 0
    assert target.read_bytes()[:8] == PNG and target.stat().st_size > 10_000


def test_plot_errors_say_what_to_do(tmp_path, capsys):
    assert cli.main(["plot", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no trainer_state.json" in err and "What to do:" in err
    (tmp_path / "trainer_state.json").write_text(json.dumps({"log_history": [{"train_runtime": 1.0, "step": 3}]}))
    assert cli.main(["plot", str(tmp_path)]) == 2
    assert "holds no logged loss or rewards" in capsys.readouterr().err


def test_sft_history_gets_only_the_loss_panel(tmp_path):
    (tmp_path / "trainer_state.json").write_text(json.dumps({"log_history": [
        {"loss": 2.0, "step": 1}, {"loss": 1.5, "step": 2}, {"eval_loss": 1.7, "step": 2}]}))
    assert len(load_history(tmp_path)) == 3
    assert write_curves(tmp_path).read_bytes()[:8] == PNG
    assert first_last_table(load_history(tmp_path)).count("loss") == 2


def test_wilson_interval():
    low, high = wilson_interval(62, 100)
    assert (round(low, 3), round(high, 3)) == (0.522, 0.709)   # the textbook value
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0
    with pytest.raises(ValueError):
        wilson_interval(5, 0)
