"""`accelerate launch -m fastdpo train` with 2 CPU processes (gloo) equals one process with the same
effective batch: same loss trace, same trained weights (so gradients were all-reduced)."""

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

pytestmark = pytest.mark.skipif(shutil.which("accelerate") is None, reason="accelerate's launcher not installed")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    write_tiny_run(root)
    return root


LAUNCH_2 = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no"]


def train(root, name, launcher, accumulation, *extra):
    """Loss trace, trained adapter and stderr of one run (its own $FASTDPO_CACHE)."""
    out = root / name
    cmd = [*launcher, "-m", "fastdpo", "train", "--model", str(root / "tiny"), "--dataset", str(root / "pairs.jsonl"),
           "--max-tokens-per-batch", "64", "--gradient-accumulation-steps", str(accumulation), "--max-steps", "3",
           "--logging-steps", "1", "--optim", "sgd", "--learning-rate", "0.5", "--use-peft", "--lora-dropout", "0",
           "--output-dir", str(out), "--report-to", "none", "--save-strategy", "no", "--disable-tqdm", "true", *extra]
    env = {**os.environ, "FASTDPO_CACHE": str(root / f"{name}-cache")}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=CWD, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return [h["loss"] for h in history if "loss" in h], load_file(out / "adapter_model.safetensors"), proc.stderr


@pytest.fixture(scope="module")
def single(setup):
    return train(setup, "single", [sys.executable], accumulation=4)


def test_two_processes_equal_one_with_the_same_effective_batch(setup, single):
    single_losses, single_weights, _ = single
    dist_losses, dist_weights, _ = train(setup, "ddp", LAUNCH_2, accumulation=2)
    assert len(single_losses) == len(dist_losses) == 3
    assert single_losses[-1] < single_losses[0]
    assert dist_losses == pytest.approx(single_losses, rel=1e-5)
    # SGD keeps the update linear in the gradient (Adam's first steps would amplify rounding in tiny gradients)
    for name, w in single_weights.items():
        assert (dist_weights[name] - w).norm() <= 1e-5 * w.norm(), name


def test_precomputed_reference_is_computed_once_and_shared(setup, single):
    """The main process computes the reference log-probs, the other loads its file; training matches the
    single process's live reference."""
    losses, _, stderr = train(setup, "ddp-precompute", LAUNCH_2, 2, "--precompute-ref-log-probs", "true")
    assert stderr.count("reference log-probs (train): computing") == 1, stderr[-3000:]
    assert stderr.count("reference log-probs (train): loaded from") == 1, stderr[-3000:]
    assert len(list((setup / "ddp-precompute-cache" / "ref_logps").iterdir())) == 1
    assert losses == pytest.approx(single[0], rel=1e-5)
