"""Faults: kill -9 then --resume_from_checkpoint gives the uninterrupted loss trace; same seed, same
bits."""

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from _shared import write_tiny_run

CWD = Path(__file__).resolve().parents[2]   # the repository root, where a user runs the commands

STEPS = 30


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_run(tmp_path_factory.mktemp("faults"))


def command(tiny, out, *extra):
    model, data = tiny
    return [sys.executable, "-m", "fastdpo", "train", "--model", str(model), "--dataset", str(data),
            "--max-tokens-per-batch", "64", "--gradient-accumulation-steps", "2", "--max-steps", str(STEPS),
            "--logging-steps", "1", "--learning-rate", "1e-3", "--use-peft", "--output-dir", str(out),
            "--report-to", "none", "--disable-tqdm", "true", "--seed", "7", *extra]


def losses(out):
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return {h["step"]: h["loss"] for h in history if "loss" in h}


def run(cmd):
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=CWD)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_same_seed_same_bits(tiny, tmp_path):
    run(command(tiny, tmp_path / "a", "--save-strategy", "no"))
    run(command(tiny, tmp_path / "b", "--save-strategy", "no"))
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert len(a) == STEPS and a == b          # bit-identical floats, not approximately equal


def test_kill_9_then_resume_matches_uninterrupted(tiny, tmp_path):
    run(command(tiny, tmp_path / "straight", "--save-strategy", "no"))
    want = losses(tmp_path / "straight")

    out = tmp_path / "killed"
    proc = subprocess.Popen(command(tiny, out, "--save-strategy", "steps", "--save-steps", "3"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=CWD)
    deadline = time.time() + 300
    while not list(out.glob("checkpoint-*")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    checkpoints = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert checkpoints, "killed before any checkpoint was written"
    assert all((c / "trainer_state.json").is_file() and (c / "rng_state.pth").is_file() for c in checkpoints)
    run(command(tiny, out, "--save-strategy", "steps", "--save-steps", "3", "--resume-from-checkpoint", "true"))
    got = losses(out)
    resumed_from = int(checkpoints[-1].name.split("-")[1])
    assert resumed_from < STEPS
    assert got == pytest.approx(want, rel=1e-6)


def poisoned_pairs(n=6, bad=(3,)):
    """Tokenised pairs with precomputed reference log-probs, NaN for the pairs ``bad``."""
    import datasets
    import torch

    g = torch.Generator().manual_seed(5)
    rows = []
    for i in range(n):
        rows.append({"prompt_input_ids": torch.randint(3, 49152, (4,), generator=g).tolist(),
                     "chosen_input_ids": torch.randint(3, 49152, (3,), generator=g).tolist(),
                     "rejected_input_ids": torch.randint(3, 49152, (2,), generator=g).tolist(),
                     "ref_chosen_logps": float("nan") if i in bad else -30.0, "ref_rejected_logps": -20.0})
    return datasets.Dataset.from_list(rows)


def nan_trainer(tmp_path, bad=(3,), **kw):
    from _shared import tiny_llama
    from fastdpo import DPOConfig, DPOTrainer

    # 12 tokens: one 9-token pair (prompt once) a micro-batch, so the NaN pair is skipped alone
    args = DPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True,
                     max_tokens_per_batch=12, max_steps=6, logging_steps=1, learning_rate=1e-3, **kw)
    return DPOTrainer(tiny_llama(seed=3), args=args, train_dataset=poisoned_pairs(bad=bad))


def test_nonfinite_loss_stops_naming_step_and_pair(tmp_path):
    trainer = nan_trainer(tmp_path)
    with pytest.raises(FloatingPointError, match=r"non-finite DPO loss at step \d+, training pair\(s\) \[3\]"):
        trainer.train()
    import torch

    # stopped before the optimiser could apply anything computed from the NaN
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_nonfinite_loss_skipped_when_asked(tmp_path):
    import torch

    trainer = nan_trainer(tmp_path, skip_nonfinite_losses=True)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert sum(h.get("skipped_pairs", 0) for h in logs) == 1
    # the step whose one pair was skipped trained on nothing: its loss is NaN, not 0; no NaN reached the others
    assert [math.isnan(h["loss"]) for h in logs] == ["skipped_pairs" in h for h in logs]
    assert (trainer.tally.steps, trainer.tally.trained) == (6, 5)


def test_run_whose_every_pair_is_skipped_says_so(tmp_path, caplog):
    """Every pair non-finite and skipped: each step warns with the count and what to do, logs TRL's metric names as
    NaN, and the tally records no trained step (the CLI then exits 2 with that reason)."""
    import torch

    trainer = nan_trainer(tmp_path, bad=range(6), skip_nonfinite_losses=True)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 6 and all(h["skipped_pairs"] == 1 for h in logs)
    assert all(math.isnan(h[k]) for h in logs for k in ("loss", "rewards/chosen", "rewards/margins", "logps/chosen"))
    assert all(torch.equal(p, b) for p, b in zip(trainer.model.parameters(), before))
    assert (trainer.tally.steps, trainer.tally.trained) == (6, 0)
    assert caplog.text.count("trained on nothing: all 1 pair(s) had a non-finite loss and were skipped") == 6
    assert "What to do: correct those pairs' data or reference log-probs" in trainer.tally.untrained_reason
