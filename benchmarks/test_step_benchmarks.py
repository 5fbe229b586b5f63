"""The SFT step benchmark's whole path (both trainers, each in a fresh process, the results files) at a tiny size,
so that a change that breaks it shows in CI rather than on the next quiet-machine run. (The DPO step benchmark's
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
