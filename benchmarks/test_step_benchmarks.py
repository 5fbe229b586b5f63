"""The SFT and vision DPO step benchmarks' whole paths (every trainer, each in a fresh process, the results files) at a
tiny size, so that a change that breaks it shows in CI rather than on the next quiet-machine run. (The DPO step benchmark's
path runs in ``test_gpu_check.py``'s dry run.) Times are not asserted."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from benchlib.paths import BENCH_DIR, DEFAULT_MODEL, ULTRAFEEDBACK_DATA, child_env


@pytest.mark.skipif(not (DEFAULT_MODEL.is_file() and ULTRAFEEDBACK_DATA.is_file()),
                    reason="the shared SmolLM2 GGUF or UltraFeedback sample is absent")
def test_sft_step_benchmark_dry_run(tmp_path):
    trainers = "fastdpo,trl" if subprocess.run([sys.executable, "-c", "import trl"]).returncode == 0 else "fastdpo"
    out = tmp_path / "sft"
    cmd = [sys.executable, "bench_sft_step.py", "--rows", "6", "--max-length", "64", "--max-tokens-per-batch", "128",
           "--rows-per-micro-batch", "2", "--gradient-accumulation-steps", "1", "--trainers", trainers,
           "--out", str(out)]
    proc = subprocess.run(cmd, cwd=BENCH_DIR, env=child_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(Path(f"{out}.json").read_text())["rows"]
    assert [r["trainer"] for r in rows] == trainers.split(",")
    assert all(r["work_tokens_per_s"] > 0 and r["peak_memory_mib"] > 0 for r in rows)


def test_vision_dpo_step_benchmark_dry_run(tmp_path):
    """The vision benchmark's whole path at a tiny size; the vision tower's runs per image are counts, not times:
    once per pair in fastdpo's shared layout, twice (chosen and rejected) unshared and in TRL, in each pass."""
    has_trl = subprocess.run([sys.executable, "-c", "import trl"]).returncode == 0
    trainers = "fastdpo,fastdpo-unshared" + ",trl" * has_trl
    out = tmp_path / "vision"
    cmd = [sys.executable, "bench_vision_dpo_step.py", "--dry-run", "--trainers", trainers, "--out", str(out)]
    proc = subprocess.run(cmd, cwd=BENCH_DIR, env=child_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(Path(f"{out}.json").read_text())["rows"]
    assert [r["trainer"] for r in rows] == trainers.split(",")
    assert all(r["pairs_per_s"] > 0 and r["peak_memory_mib"] > 0 for r in rows)
    runs = {r["trainer"]: (r["vision_per_image_policy"], r["vision_per_image_reference"]) for r in rows}
    assert runs["fastdpo"] == (1, 1) and runs["fastdpo-unshared"] == (2, 2)
    assert runs.get("trl", (2, 2)) == (2, 2)
