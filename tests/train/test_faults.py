"""Faults: kill -9 mid-save or SIGTERM, then --resume-from-checkpoint, gives the uninterrupted loss trace; a full
disk stops the run with the previous checkpoint intact; same seed, same bits; NaN losses."""

import json
import math
import os
import re
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


@pytest.fixture(scope="module")
def straight(tiny, tmp_path_factory):
    """The loss trace of the uninterrupted run."""
    out = tmp_path_factory.mktemp("straight")
    run(command(tiny, out, "--save-strategy", "no"))
    return losses(out)


def test_same_seed_same_bits(tiny, straight, tmp_path):
    run(command(tiny, tmp_path / "again", "--save-strategy", "no"))
    again = losses(tmp_path / "again")
    assert len(again) == STEPS and again == straight          # bit-identical floats, not approximately equal


# `fastdpo train` whose save of checkpoint-6 stops after its optimizer state (the files before it written, those
# after it not), touching the file named by $STALLED, until it is killed
STALL_IN_SAVE = """
import os, sys, time, torch
from fastdpo.cli import main
write = torch.save
def stalled(obj, f, *args, **kwargs):
    write(obj, f, *args, **kwargs)
    if str(f).endswith(os.path.join("checkpoint-6", "optimizer.pt")):
        open(os.environ["STALLED"], "w").close()
        time.sleep(600)
torch.save = stalled
sys.exit(main(sys.argv[1:]))
"""


def test_kill_9_mid_save_then_resume_matches_uninterrupted(tiny, straight, tmp_path):
    out, stalled = tmp_path / "killed", tmp_path / "stalled"
    cmd = command(tiny, out, "--save-strategy", "steps", "--save-steps", "3")
    proc = subprocess.Popen([sys.executable, "-c", STALL_IN_SAVE, *cmd[3:]], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, cwd=CWD, env={**os.environ, "STALLED": str(stalled)})
    deadline = time.time() + 300
    while not stalled.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert stalled.exists(), "the run ended before saving checkpoint-6"
    assert (out / ".staging" / "checkpoint-6" / "optimizer.pt").is_file()        # killed mid-save
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3"]
    run(command(tiny, out, "--save-strategy", "steps", "--save-steps", "3", "--resume-from-checkpoint", "true"))
    assert losses(out) == pytest.approx(straight, rel=1e-6)


def test_sigterm_finishes_the_step_saves_exits_0_then_resume_matches_uninterrupted(tiny, straight, tmp_path):
    out = tmp_path / "terminated"
    cmd = command(tiny, out, "--save-strategy", "no")     # SIGTERM saves whatever the save strategy
    with open(tmp_path / "stderr", "w") as stderr:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=stderr, text=True, cwd=CWD,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        for line in proc.stdout:                          # the first step's log: training is under way
            if "'loss'" in line:
                break
        proc.send_signal(signal.SIGTERM)
        proc.stdout.read()
        returncode = proc.wait(timeout=300)
    log = (tmp_path / "stderr").read_text()
    assert returncode == 0, log[-3000:]
    [checkpoint] = out.glob("checkpoint-*")
    step = int(checkpoint.name.split("-")[1])
    assert 1 <= step < STEPS
    assert f"SIGTERM: stopped after step {step} of {STEPS} and saved {checkpoint}" in log, log[-3000:]
    assert "rerun the same command with --resume-from-checkpoint true" in log
    run(command(tiny, out, "--save-strategy", "no", "--resume-from-checkpoint", "true"))
    assert losses(out) == pytest.approx(straight, rel=1e-6)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs Linux's /dev/full")
def test_disk_full_during_save_stops_with_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    """The optimizer state of checkpoint-4 goes to /dev/full, where the kernel fails every write with ENOSPC,
    as a full disk does: the writer (torch's) runs unpatched."""
    import torch

    from _shared import config, lora, pairs, tiny_llama
    from fastdpo import DPOTrainer

    write = torch.save

    def onto_a_full_disk(obj, f, *args, **kwargs):
        if str(f).endswith(os.path.join("checkpoint-4", "optimizer.pt")):
            os.symlink("/dev/full", f)
        return write(obj, f, *args, **kwargs)

    def trainer():
        args = config(tmp_path, save_strategy="steps", save_steps=2, max_steps=6, max_tokens_per_batch=60)
        return DPOTrainer(lora(tiny_llama(seed=3)), args=args, train_dataset=pairs(12, seed=3))

    monkeypatch.setattr(torch, "save", onto_a_full_disk)
    out = tmp_path / "out"
    with pytest.raises(OSError, match=rf"(?s)could not write checkpoint-4 in {re.escape(str(out))} .*the previous "
                                      rf"checkpoint, {re.escape(str(out / 'checkpoint-2'))}, is intact.*"
                                      "--resume-from-checkpoint true"):
        trainer().train()
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2"]     # the half-written one removed
    monkeypatch.setattr(torch, "save", write)                            # space again
    resumed = trainer()
    resumed.train(resume_from_checkpoint=str(out / "checkpoint-2"))
    assert resumed.state.global_step == 6


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
