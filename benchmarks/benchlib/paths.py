"""Where the benchmarks find the shared model and data, and where they write results."""

import os
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parents[1]
REPO_DIR = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
SHARED = REPO_DIR.parent / "shared"
DEFAULT_MODEL = SHARED / "models" / "SmolLM2-135M-Instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf"
HH_DATA = SHARED / "data" / "hh-rlhf-harmless" / "test.jsonl.gz"
ULTRAFEEDBACK_DATA = SHARED / "data" / "ultrafeedback-binarized" / "train.standard.jsonl"


def child_env() -> dict[str, str]:
    """This process's environment with the repository root first on PYTHONPATH: child processes (workers started in
    ``benchmarks/``, test runs, launched trainers) import this checkout's fastdpo, installed or not."""
    paths = [str(REPO_DIR), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(dict.fromkeys(paths))}
