"""FSDP2 on CPU (gloo, 2 processes): the fused log-probs see the whole LM head, whether FSDP keeps it
gathered after the forward (held by the root unit) or re-shards it (a unit of its own: ``DTensor``,
gathered by ``fastdpo.train.forward._gathered``), and every gradient equals an unsharded run's.

accelerate runs FSDP only on accelerators (on CPU it falls back to DDP), so the trainer-level FSDP
launch is in tests/test_gpu.py; this is the CPU-capable part, with torch's ``fully_shard`` directly."""

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent

pytestmark = pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not installed")


@pytest.mark.parametrize("tied, shard_head, head_after_forward", [
    ("tied", "root-head", "Parameter"),          # SmolLM2's case: head = embeddings, in the root unit
    ("untied", "root-head", "Parameter"),
    ("untied", "shard-head", "DTensor"),         # the head its own unit: re-sharded after its forward
])
def test_fsdp2_loss_and_gradients_equal_unsharded(tmp_path, tied, shard_head, head_after_forward):
    out = tmp_path / "result.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(["torchrun", "--standalone", "--nproc_per_node", "2", str(TESTS / "_fsdp_worker.py"),
                           str(out), tied, shard_head],
                          capture_output=True, text=True, timeout=300, env=env, cwd=tempfile.gettempdir())
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["head_after_forward"] == head_after_forward
    assert result["loss"] == pytest.approx(result["reference_loss"], rel=1e-6)
    assert len(result["grad_rel_err"]) >= 9 and max(result["grad_rel_err"].values()) <= 1e-5, result["grad_rel_err"]
