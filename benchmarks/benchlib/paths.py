"""Where the benchmarks find the shared model and data, and where they write results."""

from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parents[1]
REPO_DIR = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
SHARED = REPO_DIR.parent / "shared"
DEFAULT_MODEL = SHARED / "models" / "SmolLM2-135M-Instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf"
HH_DATA = SHARED / "data" / "hh-rlhf-harmless" / "test.jsonl.gz"
ULTRAFEEDBACK_DATA = SHARED / "data" / "ultrafeedback-binarized" / "train.standard.jsonl"
