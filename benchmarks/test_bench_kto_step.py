"""The KTO benchmark's dry run: both trainers, a tiny random model, a few HH-shaped pairs, the report written; it
checks that both trained on the same rows (the same work tokens over the epoch), never a time."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from benchlib.paths import child_env

pytest.importorskip("trl")


def test_dry_run_trains_both_on_the_same_rows(tmp_path):
    script = Path(__file__).resolve().parent / "bench_kto_step.py"
    cmd = [sys.executable, str(script), "--dry-run", "--out", str(tmp_path / "kto")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=child_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["trainer"]: r for r in json.loads((tmp_path / "kto.json").read_text())["rows"]}
    assert set(rows) == {"fastdpo", "trl"}
    work = {name: sum(s["work_tokens"] for s in r["steps"]) for name, r in rows.items()}
    assert work["fastdpo"] == work["trl"] > 0 and rows["fastdpo"]["rows"] == rows["trl"]["rows"] == 24
    assert all(r["work_tokens_per_s"] > 0 and r["peak_memory_mib"] > 0 for r in rows.values())
    assert "fastdpo / TRL:" in (tmp_path / "kto.md").read_text()
