"""`accelerate launch -m fastdpo kto` with 2 CPU processes (gloo), one KL group per micro-batch on each, equals one
process whose micro-batches hold those two groups: the KL estimate is taken over both processes' rows, and the loss
over the step's rows, so the loss trace and the trained weights are the same; with the reference precomputed too."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
from safetensors.torch import load_file

from _kto_rows import write_jsonl
from _shared import smollm2_tokenizer, write_tiny_run
from fastdpo.data import tokenize_unpaired

CWD = Path(__file__).resolve().parents[2]   # the repository root, where a user runs the commands
LAUNCH_2 = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no"]
GROUP = 2

pytestmark = pytest.mark.skipif(shutil.which("accelerate") is None, reason="accelerate's launcher not installed")


def arithmetic_rows(n=16):
    """Rows of one token length each (single digits), so that a budget of k groups holds exactly k groups."""
    return [{"prompt": f"Question {i % 10}: what is {i * 3 % 10} plus {i * 7 % 10}?",
             "completion": f" It is {(i * 10 + (i % 3 == 0)) % 10}.", "label": i % 3 != 0} for i in range(n)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("kto-dist")
    write_tiny_run(root, pairs=1)
    data = write_jsonl(root / "rows.jsonl", arithmetic_rows())
    tokenized, _ = tokenize_unpaired(datasets.Dataset.from_list(arithmetic_rows()), smollm2_tokenizer(),
                                     kl_group_size=GROUP)
    lengths = {len(r["prompt_input_ids"]) + len(r["completion_input_ids"]) + len(r["kl_completion_input_ids"])
               for r in tokenized}
    assert len(lengths) == 1, lengths
    return root, data, GROUP * lengths.pop()


def kto(root, data, name, launcher, groups_per_batch, group_tokens, *extra):
    """Loss trace and trained adapter of one run (its own $FASTDPO_CACHE)."""
    out = root / name
    cmd = [*launcher, "-m", "fastdpo", "kto", "--model", str(root / "tiny"), "--dataset", str(data),
           "--per-device-train-batch-size", str(GROUP), "--train-sampling-strategy", "sequential",
           "--max-tokens-per-batch", str(groups_per_batch * group_tokens), "--max-steps", "3", "--logging-steps", "1",
           "--optim", "sgd", "--learning-rate", "0.5", "--lr-scheduler-type", "constant", "--beta", "1.0",
           "--use-peft", "--lora-dropout", "0", "--output-dir", str(out), "--report-to", "none", "--save-strategy", "no",
           "--disable-tqdm", "true", *extra]
    env = {**os.environ, "FASTDPO_CACHE": str(root / f"{name}-cache")}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=CWD, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return [h for h in history if "loss" in h], load_file(out / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def single(setup):
    root, data, group_tokens = setup
    return kto(root, data, "single", [sys.executable], 2, group_tokens)


@pytest.mark.parametrize("precompute", ["false", "true"])
def test_two_processes_equal_one(setup, single, precompute):
    root, data, group_tokens = setup
    logs, weights = single
    dist_logs, dist_weights = kto(root, data, f"ddp-{precompute}", LAUNCH_2, 1, group_tokens,
                                  "--precompute-ref-log-probs", precompute)
    assert len(logs) == len(dist_logs) == 3 and any(h["kl"] > 0 for h in logs)
    # kl and the rewards (β = 1) are differences of log-prob sums: their error is relative to those sums' size
    logps = max(abs(h["logps/chosen"]) for h in logs)
    for key in ("loss", "kl", "rewards/chosen", "rewards/rejected", "num_tokens"):
        tolerance = dict(rel=1e-5) if key in ("loss", "num_tokens") else dict(rel=0, abs=1e-5 * logps)
        assert [h[key] for h in dist_logs] == pytest.approx([h[key] for h in logs], **tolerance), key
    # SGD keeps the update linear in the gradient
    for name, w in weights.items():
        assert (dist_weights[name] - w).norm() <= 1e-5 * w.norm(), name
