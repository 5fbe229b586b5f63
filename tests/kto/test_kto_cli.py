"""`fastdpo kto`: help and bad input, a LoRA run on the shared HH sample (paired, unpaired as TRL does) whose adapter
reloads, and a run on a hand-written conversational unpaired file with a precomputed reference."""

import json
import math
from pathlib import Path

import pytest
import torch

from _kto_rows import write_jsonl
from _shared import HH_HARMLESS, require, write_tiny_run
from fastdpo import cli

PNG = b"\x89PNG\r\n\x1a\n"
CONVERSATIONAL_FILE = Path(__file__).resolve().parent / "data" / "conversational_unpaired.jsonl"
COMMON = ["--report-to", "none", "--save-strategy", "no", "--disable-tqdm", "true", "--logging-steps", "1"]


def assert_adapter_reloads(trainer, model_dir, out):
    """The adapter saved in ``out`` loads onto the base model as the trained LoRA weights (moved off their start)."""
    from peft import PeftModel

    from fastdpo.models import ModelSource, load_causal_lm

    reloaded = PeftModel.from_pretrained(load_causal_lm(ModelSource(str(model_dir), None)), out)
    trained = {n: p for n, p in trainer.model.named_parameters() if "lora_" in n}
    loaded = dict(reloaded.named_parameters())
    assert trained and all(torch.equal(loaded[n], p.detach().cpu()) for n, p in trained.items())
    assert trained[next(n for n in trained if "lora_B" in n)].abs().sum() > 0


def test_help_and_bad_labels(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["kto", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "KTO loss:" in out
    for option in ("--desirable_weight", "--undesirable_weight", "--loss_type", "--beta", "--ref_model",
                   "--precompute_ref_log_probs", "--per_device_train_batch_size", "--train_sampling_strategy"):
        assert option in out
    assert "--rpo_alpha" not in out and "--f_divergence_type" not in out   # DPO's options are not KTO's
    assert not [a.dest for a in cli.command_parser("kto")._actions if a.dest != "help" and not (a.help or "").strip()]
    model_dir, _ = write_tiny_run(tmp_path, pairs=1)
    data = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "completion": " b", "label": 1},
                                                {"prompt": "c", "completion": " d", "label": 0}])
    assert cli.main(["kto", "--model", str(model_dir), "--dataset", str(data), "--output-dir", str(tmp_path / "o"),
                     *COMMON]) == 2
    err = capsys.readouterr().err
    assert "row 0: label must be true or false" in err and "What to do:" in err


def test_hh_sample_unpaired_trains_and_the_adapter_reloads(tmp_path, capsys):
    """A tiny random Llama (SmolLM2's tokenizer) + LoRA on 12 pairs of the shared HH sample, unpaired into 24 rows:
    the run trains, logs TRL's KTO metrics, saves an adapter that reloads to the trained weights, and prints the table
    and the curves. (SmolLM2-135M itself takes minutes a step on a shared 2-core CPU: the README's command.)"""
    require(HH_HARMLESS, "the shared HH sample")
    model_dir, _ = write_tiny_run(tmp_path, pairs=1)
    out = tmp_path / "kto"
    trainer, summary = cli.train(["--model", str(model_dir), "--dataset", str(HH_HARMLESS), "--max-samples", "12",
                                  "--eval-fraction", "0.25", "--eval-strategy", "epoch", "--use-peft", "--lora-dropout",
                                  "0", "--learning-rate", "1e-2", "--beta", "0.5", "--num-train-epochs", "2",
                                  "--max-length", "160", "--per-device-train-batch-size", "3",
                                  "--max-tokens-per-batch", "1024", "--gradient-accumulation-steps", "1",
                                  "--output-dir", str(out), *COMMON], "kto")
    report = summary["drops"]["train"]
    assert report["rows"] == 18 and report["desirable"] > 0 and report["undesirable"] > 0
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert all(k in logs[0] for k in ("kl", "rewards/chosen", "logps/rejected", "entropy"))
    # it learns: over the second epoch, the same rows' reward margin is above the first epoch's (a step whose KL
    # group holds one class logs NaN margins, the mean of nothing: left out)
    margins = [[h["rewards/margins"] for h in logs if not math.isnan(h["rewards/margins"]) and (h["epoch"] > 1) == second]
               for second in (False, True)]
    assert all(margins) and sum(margins[1]) / len(margins[1]) > sum(margins[0]) / len(margins[0]) + 0.05, margins
    assert len([h for h in trainer.state.log_history if "eval_loss" in h]) == 2

    assert_adapter_reloads(trainer, model_dir, out)

    printed = capsys.readouterr().out
    table = printed[printed.index("first → last:"):]
    for row in ("train loss", "train rewards/margins", "train kl", "eval loss", "eval kl"):
        assert row in table, table
    assert (out / "training_curves.png").read_bytes()[:8] == PNG


def test_hand_written_conversational_file_with_a_precomputed_reference(tmp_path, capsys):
    """tests/kto/data/conversational_unpaired.jsonl: 10 hand-written message-list rows (a system turn, a multi-turn
    prompt, two completions of one prompt with opposite labels), trained with the reference precomputed."""
    model_dir, _ = write_tiny_run(tmp_path, pairs=1)
    data = CONVERSATIONAL_FILE
    assert json.loads(data.read_text().splitlines()[0])["completion"][0]["role"] == "assistant"
    out = tmp_path / "run"
    trainer, summary = cli.train(["--model", str(model_dir), "--dataset", str(data), "--use-peft", "--lora-dropout",
                                  "0", "--learning-rate", "1e-3", "--max-steps", "3", "--per-device-train-batch-size",
                                  "2", "--precompute-ref-log-probs", "true", "--output-dir", str(out), *COMMON], "kto")
    assert summary["drops"]["train"]["kept"] == 10 and "ref_KL_logps" in trainer.train_dataset.column_names
    assert [h["step"] for h in trainer.state.log_history if "loss" in h] == [1, 2, 3]
    assert_adapter_reloads(trainer, model_dir, out)
    assert (out / "training_curves.png").read_bytes()[:8] == PNG
    assert "train kl" in capsys.readouterr().out
