"""KTO on 2 CPU processes (gloo, torchrun), one KL group per micro-batch on each, equals one process whose
micro-batches hold those two groups: the KL estimate is taken over both processes' rows, the loss over the step's
rows and every metric over both processes, so the logged steps and the trained weights are the same; for ``kto``
with a live or a precomputed reference and for ``apo_zero_unpaired``. One rank's micro-batch holding no undesirable
row keeps the collectives in step (a hang would fail within the worker's 60 s process-group timeout)."""

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parent
WORKER = TESTS / "_kto_ddp_worker.py"
CASES = ("kto", "kto-precomputed", "apo_zero_unpaired")

pytestmark = pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not installed")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{run: [rank 0's {case: {"logs", "weights"}}, (rank 1's)]} for the single-process and the 2-process run."""
    out = tmp_path_factory.mktemp("kto-ddp")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS.parent.parent), os.environ.get("PYTHONPATH", "")])}
    for launcher, run in (([sys.executable], "single"),
                          (["torchrun", "--standalone", "--nproc_per_node", "2"], "ranks")):
        # each run its own reference cache: the 2 processes compute theirs (one computes, the other loads its file)
        proc = subprocess.run([*launcher, str(WORKER), str(out), run], capture_output=True, text=True, timeout=900,
                              env={**env, "FASTDPO_CACHE": str(out / f"{run}-cache")}, cwd=tempfile.gettempdir())
        assert proc.returncode == 0, proc.stderr[-5000:]
    return {run: [torch.load(out / f"{run}-{rank}.pt") for rank in range(1 if run == "single" else 2)]
            for run in ("single", "ranks")}


@pytest.mark.parametrize("case", CASES)
def test_two_processes_equal_one(runs, case):
    single, first, second = runs["single"][0][case], runs["ranks"][0][case], runs["ranks"][1][case]
    logs, dist_logs = single["logs"], first["logs"]
    assert len(logs) == len(dist_logs) == 3 and first["logs"] == second["logs"]
    if case.startswith("kto"):
        assert all(h["kl"] > 0 for h in logs)   # the KL term is in play, not clamped away
    assert set(dist_logs[0]) == set(logs[0])
    # kl and the rewards (β = 1) are differences of log-prob sums: their error is relative to those sums' size
    scale = max(abs(h["logps/chosen"]) for h in logs)
    for key in sorted(set(logs[0]) - {"epoch", "step", "learning_rate"}):
        relative = key in ("loss", "num_tokens", "grad_norm", "entropy", "packing_efficiency") or "logps" in key \
            or "logits" in key
        tolerance = dict(rel=1e-5) if relative else dict(rel=0, abs=1e-5 * scale)
        assert [h[key] for h in dist_logs] == pytest.approx([h[key] for h in logs], **tolerance), key
    # SGD keeps the update linear in the gradient; both ranks hold the same weights
    for name, w in single["weights"].items():
        assert torch.equal(first["weights"][name], second["weights"][name]), name
        assert (first["weights"][name] - w).norm() <= 1e-5 * w.norm(), name
