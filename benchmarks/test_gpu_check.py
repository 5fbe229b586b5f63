"""The GPU runbook's dry run: the same code path on the CPU at a tiny shape, writing its report."""

import json

import gpu_check


def test_dry_run_writes_report(tmp_path):
    # The DPO step is left out here (minutes on the CPU); benchmarks/bench_dpo_step.py has its own check.
    rc = gpu_check.main(["--dry-run", "--out-dir", str(tmp_path), "--skip", "dpo-step",
                         "--impls", "fastdpo,fastdpo-torch,eager,liger-flce"])
    assert rc == 0
    data = json.loads((tmp_path / "gpu-check.json").read_text())
    assert data["dry_run"] and data["tests"]["returncode"] == 0
    rows = {r["impl"]: r for r in data["kernels"]}
    assert "skipped" not in rows["fastdpo"] and "skipped" not in rows["fastdpo-torch"]
    assert "CUDA" in rows["liger-flce"]["skipped"]
    assert all(err <= 1e-5 for err in rows["fastdpo"]["rel_err"].values())
    md = (tmp_path / "gpu-check.md").read_text()
    assert data["meta"]["device"] in md and "fastdpo-torch" in md
