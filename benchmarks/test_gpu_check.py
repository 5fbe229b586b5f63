"""The GPU runbook's dry run: the same code path on the CPU at tiny shapes, writing its report. It holds with or
without the peers installed (a missing one is a skipped row with its reason); times are never asserted."""

import importlib.util
import json

import gpu_check


def _dry_run(tmp_path, monkeypatch, skip: str) -> dict:
    monkeypatch.setenv("TRITON_INTERPRET", "1")     # main sets it for its workers; restored after the test
    rc = gpu_check.main(["--dry-run", "--out-dir", str(tmp_path), "--skip", skip])
    data = json.loads((tmp_path / "gpu-check.json").read_text())
    assert rc == 0, [(s["name"], s["error"]) for s in data["sections"]]
    assert data["dry_run"] and (tmp_path / "nvidia-smi.txt").exists()
    return {s["name"]: s for s in data["sections"]}


def test_dry_run_tests_kernels_and_filtering(tmp_path, monkeypatch):
    sections = _dry_run(tmp_path, monkeypatch, "dpo-step")
    assert sections["tests"]["data"]["returncode"] == 0 and "skipped" in sections["tests"]["data"]["summary"]
    assert "needs a CUDA GPU" in (tmp_path / "pytest.log").read_text()

    rows = {(r["impl"], r["n"]): r for r in sections["kernels"]["data"]}
    for name in ("fastdpo", "fastdpo-frozen", "fastdpo-fused", "fastdpo-filtered", "fastdpo-torch", "gemm-floor",
                 "gemm-floor-frozen", "eager"):
        assert "skipped" not in rows[name, 64], rows[name, 64]
    assert all(err <= 1e-5 for err in rows["fastdpo", 64]["rel_err"].values())
    assert set(rows["fastdpo-frozen", 64]["rel_err"]) == {"output", "d_hidden"}    # no d weight for a frozen head
    assert "GEMM" in rows["fastdpo", 64]["stages_ms"]
    for name, reason in (("liger-flce", "liger-kernel"), ("liger-per-token", "liger-kernel"),
                         ("cce", "cut-cross-entropy")):   # not installed, or installed but Triton on CUDA only
        assert reason in rows[name, 64]["skipped"] or "CUDA" in rows[name, 64]["skipped"]

    (filtered,) = [r for r in sections["filtering"]["data"] if r["impl"] == "fastdpo-filtered"]
    assert set(filtered["skipped_fraction"]) == {"d_hidden", "d_weight"}
    md = (tmp_path / "gpu-check.md").read_text()
    assert "fastdpo-frozen" in md and "Gradient filtering" in md and "not run: --skip" in md


def test_dry_run_dpo_step(tmp_path, monkeypatch):
    rows = {r["trainer"]: r for r in _dry_run(tmp_path, monkeypatch, "tests,kernels,filtering")["dpo-step"]["data"]}
    assert rows["fastdpo"]["layout"] == "shared prefix" and rows["fastdpo"]["probes"][0]["fits"]
    if importlib.util.find_spec("trl"):
        assert "skipped" not in rows["trl"], rows["trl"]
    assert (tmp_path / "dpo-step.log").exists()
