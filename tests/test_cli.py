"""`fastdpo` and `fastdpo train`: help, option errors, YAML config, and a short real run."""

import pytest
import torch

from _reference import rel_err
from _shared import SMOLLM2_GGUF, write_hh_pairs
from fastdpo import cli
from fastdpo.data.packing import pack_pairs
from fastdpo.train.forward import packed_sequence_logps


def run_args(tmp_path, *extra):
    return ["--model", str(SMOLLM2_GGUF), "--dataset", str(write_hh_pairs(tmp_path / "pairs.jsonl")),
            "--output-dir", str(tmp_path / "out"), "--report-to", "none", "--save-strategy", "no",
            "--disable-tqdm", "true", *extra]


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit) as top:
        cli.main(["--help"])
    assert top.value.code == 0 and "train" in capsys.readouterr().out
    with pytest.raises(SystemExit) as sub:
        cli.main(["train", "--help"])
    out = capsys.readouterr().out
    assert sub.value.code == 0
    for option in ("--dataset", "--model", "--use_peft", "--load_in_4bit", "--ref_model", "--max_tokens_per_batch",
                   "--precompute_ref_log_probs", "--beta", "--loss_type", "--config", "--max_samples", "--eval_fraction"):
        assert option in out
    undocumented = [a.dest for a in cli.command_parser()._actions if a.dest != "help" and not (a.help or "").strip()]
    assert not undocumented


def test_unknown_command_and_option(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["serve"])
    assert e.value.code == 2
    assert cli.main(["train", "--dataset", "x.jsonl", "--no-such-option", "1"]) == 2
    assert "--no-such-option" in capsys.readouterr().err


def test_missing_file_and_required_dataset(tmp_path, capsys):
    assert cli.main(["train", "--dataset", str(tmp_path / "missing.jsonl"), "--output-dir", str(tmp_path),
                     "--model", str(SMOLLM2_GGUF)]) == 2
    assert "no such file or directory" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.parse_command(["--output-dir", str(tmp_path)])
    assert e.value.code == 2 and "--dataset is required" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.parse_command(["--dataset", "d.jsonl", "--load-in-4bit"])
    assert "add --use-peft" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["train", "sft"])
def test_new_adapter_options_with_a_saved_adapter_are_refused(command, capsys):
    """A saved adapter keeps its own r/alpha/dropout/targets: an option that would shape a new one is an error."""
    with pytest.raises(SystemExit) as e:
        cli.parse_command(["--dataset", "d.jsonl", "--adapter", "sft-out", "--lora-dropout", "0", "--lora-r", "8"],
                          command)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--lora-r, --lora-dropout shape a new adapter" in err
    script, _, _ = cli.parse_command(["--dataset", "d.jsonl", "--adapter", "sft-out", "--output-dir", "o"], command)
    assert script.adapter == "sft-out"


def test_yaml_config_with_command_line_override(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("dataset: data.jsonl\nbeta: 0.3\nmax_length: 99\nuse_peft: true\nlora_r: 4\n")
    script, args, _ = cli.parse_command(["--config", str(config), "--beta", "0.2", "--output-dir", str(tmp_path)])
    assert (script.dataset, script.use_peft, script.lora_r) == ("data.jsonl", True, 4)
    assert (args.beta, args.max_length) == (0.2, 99)
    config.write_text("dataset: data.jsonl\nbetta: 0.3\n")
    with pytest.raises(SystemExit):
        cli.parse_command(["--config", str(config)])
    err = capsys.readouterr().err
    assert "unknown keys in" in err and "betta" in err


@pytest.mark.skipif(not SMOLLM2_GGUF.is_file(), reason="shared SmolLM2 GGUF not present")
def test_token_budget_smaller_than_a_pair(tmp_path, smollm2_cache, monkeypatch, capsys):
    monkeypatch.setenv("FASTDPO_CACHE", str(smollm2_cache))
    assert cli.main(["train", *run_args(tmp_path, "--max-tokens-per-batch", "20", "--max-steps", "1")]) == 2
    assert "max_tokens_per_batch=20 is smaller than" in capsys.readouterr().err


@pytest.mark.skipif(not SMOLLM2_GGUF.is_file(), reason="shared SmolLM2 GGUF not present")
def test_short_real_run_loss_falls_and_adapter_reloads(tmp_path, smollm2_cache, monkeypatch):
    """SmolLM2-135M-Instruct (the real GGUF) + LoRA, a few steps: loss falls, the saved adapter reloads."""
    monkeypatch.setenv("FASTDPO_CACHE", str(smollm2_cache))
    trainer, summary = cli.train(run_args(
        tmp_path, "--use-peft", "--learning-rate", "1e-3", "--beta", "0.5", "--max-length", "64",
        "--max-tokens-per-batch", "512", "--num-train-epochs", "5", "--logging-steps", "1", "--lora-dropout", "0",
    ))
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 5 and losses[0] == pytest.approx(0.6931, abs=1e-3)   # the adapter starts as a no-op
    assert losses[-1] < losses[0] - 0.05
    assert summary["drops"]["train"] == {"rows": 4, "kept": 4, "prompt_too_long": 0, "identical": 0}

    from peft import PeftModel
    from transformers import AutoTokenizer

    from fastdpo.models import load_causal_lm, load_tokenizer, resolve_model

    out = tmp_path / "out"
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert AutoTokenizer.from_pretrained(out).eos_token_id == load_tokenizer(resolve_model(str(SMOLLM2_GGUF))).eos_token_id
    reloaded = PeftModel.from_pretrained(load_causal_lm(resolve_model(str(SMOLLM2_GGUF))), str(out)).eval()
    batch = pack_pairs(list(trainer.train_dataset.select_columns(["prompt_input_ids", "chosen_input_ids",
                                                                  "rejected_input_ids"])))
    with torch.no_grad():
        want = packed_sequence_logps(trainer.model.eval(), batch)
        got = packed_sequence_logps(reloaded, batch)
    assert all(rel_err(g, w) <= 1e-5 for g, w in zip(got, want))
