"""The GPU runbook's dry run: the same code path on the CPU at tiny shapes, writing its report. It holds with or
without the peers installed (a missing one is a skipped row with its reason); times are never asserted."""

import importlib.util
import json
import sys
from types import SimpleNamespace

import gpu_check
import pytest


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


def _row(impl: str, ms: float, **extra) -> dict:
    return {"impl": impl, "model": "Llama-3-8B", "n": 8192, "h": 4096, "v": 128256, "dtype": "bfloat16",
            "device": "cuda", "distribution": "random", "fwd_s": ms / 3e3, "bwd_s": 2 * ms / 3e3, "time_s": ms / 1e3,
            "floor_flop": 8 * 8192 * 4096 * 128256, "extra_peak_bytes": 1 << 30, "beyond_grads_bytes": 1 << 20,
            "rel_err": {}, **extra}


def test_roofline_predictions_beside_each_row(monkeypatch):
    """benchlib.roofline's predict(design, n, h, v, frozen=, dtype_bytes=, device=) fills each row's prediction, the
    table shows it with measured / predicted, and the profiled kernels stand beside the model's stages."""
    calls = []

    def predict(design, n, h, v, *, frozen=False, dtype_bytes=2, device="H200"):
        calls.append((design, frozen, dtype_bytes, device))
        stages = [SimpleNamespace(name="logits GEMM", flop=2 * n * h * v, bytes=2 * v * h, ms=20.0),
                  SimpleNamespace(name="dz", flop=0, bytes=2 * n * v, ms=5.0)]
        return SimpleNamespace(stages=stages, total_ms=50.0, floor_ms=43.6)

    monkeypatch.setitem(sys.modules, "benchlib.roofline", SimpleNamespace(predict=predict))
    rows = [_row("fastdpo", 60.0, stages_ms={"GEMM": 45.0, "_dz_kernel": 9.0}), _row("gemm-floor", 50.0),
            _row("eager", 200.0), {"impl": "cce", "skipped": "cut-cross-entropy is not installed"}]
    assert "H200" in gpu_check.add_predictions(rows, "NVIDIA H200")
    assert calls == [("chunked", False, 2, "H200"), ("gemm-floor", False, 2, "H200")]   # eager has no design
    assert rows[0]["roofline"]["measured_over_predicted"] == pytest.approx(1.2)
    table = gpu_check.kernel_table(rows)
    (line,) = [line for line in table.splitlines() if "| fastdpo |" in line]
    # times, TFLOP/s at 8·N·H·V, × the floor's 50 ms, memory, errors, prediction, measured / predicted
    assert line == "| Llama-3-8B N=8192 | fastdpo | 20.0 | 40.0 | 60.0 | 573.8 | 1.20 | 1024 | 1 | – | 50.0 | 1.20 |"
    stages = gpu_check.stage_tables(rows)
    assert "| GEMM | 45.00 | logits GEMM |" in stages and "| _dz_kernel | 9.00 | dz |" in stages
