"""Gradients across ranks (CPU, gloo): after one optimiser step on 2 processes, under the Trainer's DDP and under FSDP2
(``fully_shard``, stepped by the trainer's own ``training_step``: accelerate shards with FSDP on accelerators only),
every trainable parameter equals a single process's with the same effective batch and is the same on both ranks, for
each reference mode: a live frozen copy, the PEFT policy with its adapter disabled, a reference adapter, and
precomputed log-probs."""

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parent
WORKER = TESTS / "_rank_gradients_worker.py"
MODES = ("live", "adapter-disabled", "reference-adapter", "precomputed")

pytestmark = pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not installed")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{run: [rank 0's {mode: {name: parameter}}, rank 1's ...]} for start (before the step), single, ddp and fsdp2."""
    out = tmp_path_factory.mktemp("rank-gradients")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS.parent.parent), os.environ.get("PYTHONPATH", "")]),
           "FASTDPO_CACHE": str(out / "cache")}
    for launcher, run in (([sys.executable], "single"),
                          (["torchrun", "--standalone", "--nproc_per_node", "2"], "ranks")):
        proc = subprocess.run([*launcher, str(WORKER), str(out), run], capture_output=True, text=True, timeout=900,
                              env=env, cwd=tempfile.gettempdir())
        assert proc.returncode == 0, proc.stderr[-5000:]
    return {run: [torch.load(out / f"{run}-{rank}.pt") for rank in range(1 if run in ("start", "single") else 2)]
            for run in ("start", "single", "ddp", "fsdp2")}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("run", ["ddp", "fsdp2"])
def test_one_step_on_two_ranks_equals_one_process(runs, run, mode):
    want, start = runs["single"][0][mode], runs["start"][0][mode]
    first, second = (r[mode] for r in runs[run])
    assert want.keys() == first.keys() == second.keys() and len(want) >= 9
    for name, w in want.items():
        assert torch.equal(first[name], second[name]), name
        assert (first[name] - w).norm() <= 1e-6 * w.norm(), name
        # the step moved the weight, and by the same update (SGD: the same gradient)
        update = w - start[name]
        assert update.norm() > 0 and (first[name] - start[name] - update).norm() <= 2e-5 * update.norm(), name


def test_what_cannot_run_under_fsdp_is_refused_when_the_trainer_is_built(tmp_path, monkeypatch):
    """Under FSDP the policy reaches the devices only when training starts, sharded: precomputing the reference with
    the policy itself, and TR-DPO's mixing of its weights into the reference, stop at construction, saying so."""
    from transformers import Trainer

    from _shared import config, lora, pairs, tiny_llama
    from fastdpo import DPOTrainer

    build = Trainer.create_accelerator_and_postprocess

    def as_under_fsdp(self):   # what `accelerate launch` with an FSDP config sets, on accelerators only
        build(self)
        self.is_fsdp_enabled = True

    monkeypatch.setattr(Trainer, "create_accelerator_and_postprocess", as_under_fsdp)
    with pytest.raises(ValueError, match="precompute_ref_log_probs with the policy with its adapters disabled as the "
                                         "reference cannot run under FSDP"):
        DPOTrainer(lora(tiny_llama()), args=config(tmp_path, precompute_ref_log_probs=True), train_dataset=pairs(4))
    with pytest.raises(ValueError, match=r"sync_ref_model \(TR-DPO\) cannot run under FSDP"):
        DPOTrainer(tiny_llama(), args=config(tmp_path, sync_ref_model=True), train_dataset=pairs(4))
