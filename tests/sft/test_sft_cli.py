"""`fastdpo sft`: help, option errors, and a short real run whose adapter `fastdpo train --adapter` continues."""


import datasets
import pytest
import torch

from _reference import rel_err
from _shared import DIALOGUES, SMOLLM2_GGUF, A, H, write_hh_pairs
from fastdpo import cli
from fastdpo.cli import sft
from fastdpo.data.sft import pack_sequences, tokenize_sft


def test_help_and_option_errors(capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        cli.main(["sft", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    for option in ("--dataset", "--model", "--use_peft", "--completion_only_loss", "--assistant_only_loss",
                   "--max_tokens_per_batch", "--packing", "--dataset_text_field", "--max_length"):
        assert option in out
    assert not [a.dest for a in sft._parser()._actions if a.dest != "help" and not (a.help or "").strip()]
    with pytest.raises(SystemExit) as e:
        sft.parse_sft_args(["--dataset", "d.jsonl", "--ref-model", "m", "--output-dir", str(tmp_path)])
    assert e.value.code == 2 and "no reference model" in capsys.readouterr().err
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
    trainer, summary = sft.sft([*common, "--use-peft", "--lora-dropout", "0", "--output-dir", str(out),
                                "--learning-rate", "2e-3", "--num-train-epochs", "5", "--max-tokens-per-batch", "512"])
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
