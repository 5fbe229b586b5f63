"""`fastdpo sft`: help, option errors, and a short real run whose adapter `fastdpo train --adapter` continues."""


import datasets
import pytest
import torch

from _reference import rel_err
from _shared import DIALOGUES, SMOLLM2_GGUF, A, H, write_hh_pairs
from fastdpo import cli
from fastdpo.data.sft import pack_sequences, tokenize_sft


def test_help_and_option_errors(capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        cli.main(["sft", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    for option in ("--dataset", "--model", "--use_peft", "--completion_only_loss", "--assistant_only_loss",
                   "--max_tokens_per_batch", "--packing", "--dataset_text_field", "--max_length"):
        assert option in out
    assert not [a.dest for a in cli.command_parser("sft")._actions if a.dest != "help" and not (a.help or "").strip()]
    # supervised fine-tuning has no reference model: --ref-model is not one of its options
    assert cli.main(["sft", "--dataset", "d.jsonl", "--ref-model", "m", "--output-dir", str(tmp_path)]) == 2
    assert "unknown options: --ref-model m" in capsys.readouterr().err
    assert cli.main(["sft", "--dataset", str(tmp_path / "missing.jsonl"), "--output-dir", str(tmp_path),
                     "--model", str(SMOLLM2_GGUF)]) == 2
    assert "no such file or directory" in capsys.readouterr().err


def test_preference_rows_train_on_the_chosen_reply():
    from _shared import smollm2_tokenizer

    tok = smollm2_tokenizer()
    question, good, bad = DIALOGUES[0]
    rows = datasets.Dataset.from_list([{"chosen": f"{H}{question}{A}{good}", "rejected": f"{H}{question}{A}{bad}"}])
    tokenized, report = tokenize_sft(rows, tok, max_length=18)
    assert report == {"rows": 1, "kept": 1, "truncated": 1, "no_loss_tokens": 0}
    full, _ = tokenize_sft(rows, tok)
    assert tok.decode([t for t in full[0]["labels"] if t != -100]) == good + tok.eos_token
    with pytest.raises(ValueError, match="row 1: completion must be a str"):
        tokenize_sft(datasets.Dataset.from_list([{"prompt": "a", "completion": "b"}, {"prompt": "a", "completion": None}]),
                     tok)
    with pytest.raises(ValueError, match="no SFT columns"):
        tokenize_sft(datasets.Dataset.from_list([{"question": "a"}]), tok)


def test_short_real_run_loss_falls_and_adapter_reloads_into_dpo(tmp_path, smollm2_cache, monkeypatch, capsys):
    """SmolLM2-135M-Instruct (the real GGUF) + LoRA, a few SFT steps: the loss falls; `fastdpo train --adapter` loads
    the adapter as policy and frozen reference (DPO's first loss is then log 2) with the trained log-probs."""
    monkeypatch.setenv("FASTDPO_CACHE", str(smollm2_cache))
    data, out = write_hh_pairs(tmp_path / "pairs.jsonl"), tmp_path / "sft"
    common = ["--model", str(SMOLLM2_GGUF), "--dataset", str(data), "--report-to", "none", "--save-strategy", "no",
              "--disable-tqdm", "true", "--logging-steps", "1"]
    trainer, summary = cli.train([*common, "--use-peft", "--lora-dropout", "0", "--output-dir", str(out),
                                 "--learning-rate", "2e-3", "--num-train-epochs", "5", "--max-tokens-per-batch", "512"],
                                 "sft")
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 5 and losses[-1] < losses[0] - 0.2, losses
    assert summary["drops"]["train"] == {"rows": 4, "kept": 4, "truncated": 0, "no_loss_tokens": 0}
    assert (out / "adapter_model.safetensors").is_file() and (out / "tokenizer_config.json").is_file()
    assert (out / "training_curves.png").is_file()
    printed = capsys.readouterr().out
    assert "first → last:" in printed and "train mean_token_accuracy" in printed and "(step 1 → 5)" in printed

    dpo, _ = cli.train([*common, "--output-dir", str(tmp_path / "dpo"), "--adapter", str(out), "--model-adapter-name",
                        "policy", "--ref-adapter-name", "reference", "--max-steps", "1", "--max-length", "64"])
    assert dpo.state.log_history[0]["loss"] == pytest.approx(0.6931, abs=1e-4)
    batch = pack_sequences(list(trainer.train_dataset))
    with torch.no_grad():
        want = trainer.compute_loss(trainer.model.eval(), batch)
        dpo.model.set_adapter("reference")
        got = trainer.compute_loss(dpo.model.eval(), batch.to(dpo.args.device))
    assert rel_err(got, want) <= 1e-5


def test_sft_plans_its_memory_and_reads_its_options_once(tmp_path, monkeypatch, capsys):
    """`fastdpo sft` prints its memory estimate and picks the token budget as `fastdpo train` does; the command line
    and its --config file are each read once (the memory plan knows what was given without parsing again)."""
    import argparse

    import yaml

    from _shared import write_tiny_run

    model_dir, data = write_tiny_run(tmp_path, pairs=4)
    config = tmp_path / "sft.yaml"
    config.write_text(f"dataset: {data}\nmax_length: 64\nlearning_rate: 1e-3\n")
    argv = ["--config", str(config), "--model", str(model_dir), "--max-steps", "1", "--use-peft", "--output-dir",
            str(tmp_path / "out"), "--report-to", "none", "--save-strategy", "no", "--disable-tqdm", "true"]
    loads, parses = [], []
    safe_load, parse_known_args = yaml.safe_load, argparse.ArgumentParser.parse_known_args
    monkeypatch.setattr(yaml, "safe_load", lambda stream: loads.append(getattr(stream, "name", None)) or safe_load(stream))
    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args",
                        lambda self, args=None, namespace=None: parses.append(list(args or [])) or
                        parse_known_args(self, args, namespace))
    trainer, _ = cli.train(argv, "sft")
    assert loads.count(str(config)) == 1 and parses.count(argv) == 1
    assert trainer.args.learning_rate == 1e-3 and trainer.args.max_length == 64   # "1e-3": a string to YAML
    out = capsys.readouterr().out
    assert "[fastdpo] memory: estimated peak" in out and "GiB available" in out
    # max_length 64: a sequence needs up to 64 tokens; the CPU budget, and SFTConfig's 4096 tokens per step kept
    assert "chose --max-tokens-per-batch 1024, --gradient-accumulation-steps 4" in out
    assert (trainer.args.max_tokens_per_batch, trainer.args.gradient_accumulation_steps) == (1024, 4)
