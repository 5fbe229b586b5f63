"""`accelerate launch -m fastdpo sft` with 2 CPU processes (gloo) equals one process with the same effective batch,
and a run killed after a checkpoint resumes to the uninterrupted run's loss trace."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from _shared import write_tiny_run

CWD = Path(__file__).resolve().parents[2]   # the repository root, where a user runs the commands
LAUNCH_2 = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft-dist")
    write_tiny_run(root)   # preference pairs: sft trains on their chosen completions
    return root


def sft(root, name, launcher, accumulation, *extra):
    out = root / name
    cmd = [*launcher, "-m", "fastdpo", "sft", "--model", str(root / "tiny"), "--dataset", str(root / "pairs.jsonl"),
           "--max-tokens-per-batch", "48", "--gradient-accumulation-steps", str(accumulation), "--max-steps", "3",
           "--logging-steps", "1", "--optim", "sgd", "--learning-rate", "0.5", "--lr-scheduler-type", "constant",
           "--use-peft", "--lora-dropout", "0", "--output-dir", str(out), "--report-to", "none", "--disable-tqdm", "true",
           *extra]
    env = {**os.environ, "FASTDPO_CACHE": str(root / "cache")}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=CWD, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return [h["loss"] for h in history if "loss" in h], load_file(out / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def single(root):
    return sft(root, "single", [sys.executable], 4, "--save-strategy", "no")


@pytest.mark.skipif(shutil.which("accelerate") is None, reason="accelerate's launcher not installed")
def test_two_processes_equal_one(root, single):
    losses, weights = single
    dist_losses, dist_weights = sft(root, "ddp", LAUNCH_2, 2, "--save-strategy", "no")
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert dist_losses == pytest.approx(losses, rel=1e-5)
    for name, w in weights.items():
        assert (dist_weights[name] - w).norm() <= 1e-5 * w.norm(), name


def test_resume_from_checkpoint_matches_uninterrupted(root, single):
    losses, _ = single
    first, _ = sft(root, "resumed", [sys.executable], 4, "--save-strategy", "steps", "--save-steps", "2",
                   "--max-steps", "2")
    assert (root / "resumed" / "checkpoint-2").is_dir() and not (root / "resumed" / ".staging" / "checkpoint-2").exists()
    rest, _ = sft(root, "resumed", [sys.executable], 4, "--save-strategy", "no", "--resume-from-checkpoint", "true")
    assert first[:2] == pytest.approx(losses[:2], rel=1e-6) and rest[-1] == pytest.approx(losses[-1], rel=1e-5)
