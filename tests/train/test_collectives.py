"""Collectives in step (2 CPU processes, gloo, torchrun): whatever one rank's micro-batches hold — a non-finite
loss, no pairs at all — every rank makes the same collective calls in the same order, so the run finishes (or stops
on every rank with the same error) instead of hanging, and the counts in the log are every rank's."""

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from _shared import SMOLLM2_GGUF

TESTS = Path(__file__).resolve().parent

pytestmark = [pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not installed"),
              pytest.mark.skipif(not SMOLLM2_GGUF.is_file(), reason="shared SmolLM2 tokenizer not present")]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """{case: (rank 0's result, rank 1's result)} of one 2-process launch of _collectives_worker.py."""
    out = tmp_path_factory.mktemp("collectives")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS.parent.parent), os.environ.get("PYTHONPATH", "")]),
           "FASTDPO_CACHE": str(out / "cache")}
    proc = subprocess.run(["torchrun", "--standalone", "--nproc_per_node", "2", str(TESTS / "_collectives_worker.py"),
                           str(out)], capture_output=True, text=True, timeout=600, env=env, cwd=tempfile.gettempdir())
    assert proc.returncode == 0, proc.stderr[-5000:]
    return {case: tuple(json.loads((out / f"{case}-{rank}.json").read_text()) for rank in range(2))
            for case in ("dpo-skip", "dpo-stop", "dpo-skip-fsdp2", "online", "online-fsdp2")}


def test_nonfinite_loss_on_one_rank_is_skipped_on_that_rank_and_counted_over_both(ranks):
    first, second = ranks["dpo-skip"]
    assert first["logs"] == second["logs"] and first["weights"] == second["weights"] and first["finite"]
    assert len(first["logs"]) == 2 and first["tally"] == second["tally"] == [2, 2]
    # every step: rank 1's pairs skipped (summed into the log on both ranks), rank 0's trained
    assert [h["skipped_pairs"] for h in first["logs"]] == second["rows"]
    assert all(h["loss"] == h["loss"] and h["rewards/chosen"] == h["rewards/chosen"] for h in first["logs"])


def test_nonfinite_loss_on_one_rank_is_skipped_under_fsdp2(ranks):
    """FSDP2 reduce-scatters in hooks on the forward's graph: rank 1's zero loss goes through it."""
    first, second = ranks["dpo-skip-fsdp2"]
    assert first["weights"] == second["weights"] and first["finite"] and first["window"] == second["window"]
    assert first["window"]["skipped_pairs"] == second["rows"][0] and first["window"]["loss"] == first["window"]["loss"]


def test_nonfinite_loss_on_one_rank_stops_every_rank_with_the_same_error(ranks):
    first, second = ranks["dpo-stop"]
    assert first["error"] == second["error"]
    assert first["error"].startswith("non-finite DPO loss at step 1, training pair(s) [")
    assert "on process 1; the weights were not updated" in first["error"] and "on process 0" not in first["error"]


def test_online_micro_batches_without_pairs_on_one_rank(ranks):
    first, second = ranks["online"]
    assert first["logs"] == second["logs"] and first["weights"] == second["weights"] and first["finite"]
    assert set(second["rows"]) == {0} and 0 not in first["rows"] and first["tally"] == [2, 2]
    assert all(h["judge/unparseable"] == 0.5 and h["loss"] == h["loss"] for h in first["logs"])


def test_online_micro_batches_without_pairs_on_one_rank_under_fsdp2(ranks):
    """FSDP2 all-gathers in every forward: rank 1, with no pair, still runs a forward, a reference forward and a
    backward (on a placeholder pair, weighted 0), and the ranks sample in step though rank 0 stops sooner."""
    first, second = ranks["online-fsdp2"]
    assert second["rows"] == [0] and first["rows"] == [2]
    assert first["weights"] == second["weights"] and first["finite"]
    assert first["window"] == second["window"] and first["window"]["judge/unparseable"] == 0.5
