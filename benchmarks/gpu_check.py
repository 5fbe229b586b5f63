"""The first minutes on a lent GPU (one H100/H200, about 8 minutes): tests, kernel suite, one DPO step.

1. ``pytest -q tests/test_gpu.py`` (the kernels at full model size against float64);
2. the kernel suite (``benchlib``) at the Llama-3-8B head (N 8192, H 4096, V 128256) and the Qwen2.5-0.5B head
   (H 896, V 151936), bf16: fastdpo (Triton), fastdpo's PyTorch path on CUDA, eager, TRL's chunked head,
   Liger (fused linear CE and fused linear DPO) and Cut Cross-Entropy, a fresh process per implementation;
3. one DPO training step, fastdpo's trainer against TRL's (``bench_dpo_step.py``; the shared SmolLM2 unless
   ``--dpo-model`` names a local ~0.5B checkpoint: the GPU machine has no network).

Writes ``<out-dir>/gpu-check.{json,md}`` with the device name; exits non-zero when the tests fail. ``--dry-run``
runs the same code path on the CPU at tiny shapes (CI: ``benchmarks/test_gpu_check.py``).

    python benchmarks/gpu_check.py                 # on the GPU machine
    python benchmarks/gpu_check.py --dry-run --out-dir /tmp/gpu-check
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import bench_dpo_step
from benchlib.env import header, metadata
from benchlib.paths import REPO_DIR, RESULTS_DIR
from benchlib.problems import MODELS, Problem
from benchlib.report import kernel_table, skipped_list, write
from benchlib.runner import Planner, run_matrix

IMPLS = ("fastdpo", "fastdpo-torch", "eager", "trl-chunked", "liger-flce", "liger-dpo", "cce")
HEADS = ("Llama-3-8B", "Qwen2.5-0.5B")


def problems(dry_run: bool) -> list[Problem]:
    if dry_run:
        return [Problem(256, 64, 2048, "float32", "cpu", "dry-run")]
    return [Problem(8192, MODELS[m].hidden, MODELS[m].vocab, "bfloat16", "cuda", m) for m in HEADS]


def run_tests(dry_run: bool) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "tests/test_gpu.py"]
    if dry_run:
        cmd += ["-k", "not fsdp2"]      # skips on a CPU anyway; keeps the dry run from starting accelerate
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO_DIR, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        return {"returncode": 124, "summary": "timed out after 300 s", "wall_s": time.perf_counter() - t0}
    tail = (proc.stdout + proc.stderr).strip().splitlines()
    return {"returncode": proc.returncode, "summary": tail[-1] if tail else "", "wall_s": time.perf_counter() - t0}


def dpo_step(args) -> dict:
    argv = ["--device", "cpu" if args.dry_run else "cuda", "--trainers", "fastdpo,trl"]
    argv += ["--pairs", "4", "--steps", "2", "--max-length", "64"] if args.dry_run else ["--pairs", "48", "--steps", "3"]
    if args.dpo_model:
        argv += ["--model", args.dpo_model]
    rows, md = bench_dpo_step.run_trainers(argv)
    return {"rows": rows, "markdown": md}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="the same path on the CPU at tiny shapes")
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    p.add_argument("--impls", default=",".join(IMPLS))
    p.add_argument("--max-point-s", type=float, default=45.0, help="per kernel point (8 minutes in all)")
    p.add_argument("--dpo-model", help="a local checkpoint for the DPO step (default: the shared SmolLM2)")
    p.add_argument("--skip", default="", help="comma-separated parts to leave out: tests, kernels, dpo-step")
    args = p.parse_args(argv)
    device = "cpu" if args.dry_run else "cuda"
    skip = set(filter(None, args.skip.split(",")))
    t0 = time.perf_counter()
    data: dict = {"meta": metadata(device), "dry_run": args.dry_run}
    sections = [f"# GPU check: {data['meta']['device']}" + (" (dry run)" if args.dry_run else ""), header(data["meta"])]
    if "tests" not in skip:
        data["tests"] = run_tests(args.dry_run)
        sections.append(f"## tests/test_gpu.py\n\n`{data['tests']['summary']}` (exit {data['tests']['returncode']})")
        print(sections[-1], flush=True)
    if "kernels" not in skip:
        planner = Planner(device, 2 if args.dry_run else 5, args.max_point_s, 8)
        # one worker process per implementation: no peer's allocator or compiled kernels leak into another's figures
        data["kernels"] = [row for name in args.impls.split(",")
                           for row in run_matrix(problems(args.dry_run), [name], planner)]
        sections += ["## Kernel level (fwd+bwd, one process per implementation)", kernel_table(data["kernels"]),
                     "### Skipped\n\n" + (skipped_list(data["kernels"]) or "nothing")]
    if "dpo-step" not in skip:
        data["dpo_step"] = dpo_step(args)
        sections.append("## One DPO step: fastdpo against TRL\n\n" + data["dpo_step"]["markdown"])
    data["wall_s"] = time.perf_counter() - t0
    sections.append(f"Wall time {data['wall_s']:.0f} s.")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    write(args.out_dir / "gpu-check", data, "\n\n".join(sections))
    print(f"wrote {args.out_dir / 'gpu-check'}.md and .json in {data['wall_s']:.0f} s")
    return data.get("tests", {}).get("returncode", 0)


if __name__ == "__main__":
    sys.exit(main())
