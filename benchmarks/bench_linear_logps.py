"""Forward+backward time and extra peak memory of ``linear_logps`` against the eager reference.

The eager reference is TRL's legacy path: materialised fp32 logits -> log_softmax -> gather.
Each (implementation, shape) runs in a fresh process so peak memory is its own:
  * CUDA: ``torch.cuda.max_memory_allocated`` above the memory held before the step;
  * CPU: peak RSS (``ru_maxrss``) above the RSS before the step, after a small warm-up that loads
    the libraries' code and thread pools.
The figure counts the gradients of hidden and weight, which every implementation produces alike.
Time is the median of ``--repeats`` timed steps after one warm-up step.

    python benchmarks/bench_linear_logps.py                      # CPU: the issue's shape + SmolLM2's
    python benchmarks/bench_linear_logps.py --shape 8192,4096,128256 --dtype bfloat16   # GPU, Llama-3
    python benchmarks/bench_linear_logps.py --out benchmarks/results/cpu   # also write .json + .md
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from importlib.metadata import PackageNotFoundError, version

IMPLS = ("eager", "fastdpo")
DEFAULT_SHAPES = ("4096,256,32000", "4096,576,49152")


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _step_fn(impl: str, n: int, h: int, v: int, dtype: torch.dtype, device: str):
    import fastdpo

    g = torch.Generator(device=device).manual_seed(0)
    hidden = (torch.randn(n, h, generator=g, device=device) / h ** 0.25).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g, device=device) / h ** 0.25).to(dtype).requires_grad_()
    labels = torch.randint(0, v, (n,), generator=g, device=device)
    upstream = torch.randn(n, generator=g, device=device)

    def step():
        hidden.grad = weight.grad = None
        if impl == "eager":
            logits = (hidden @ weight.T).float()
            logps = torch.log_softmax(logits, -1).gather(1, labels[:, None]).squeeze(1)
        else:
            logps = fastdpo.linear_logps(hidden, weight, labels)
        (logps * upstream).sum().backward()

    return step


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(impl: str, n: int, h: int, v: int, dtype: torch.dtype, device: str, repeats: int) -> dict:
    """One implementation at one shape, in this process (call it in a fresh one)."""
    if device == "cpu":
        _step_fn(impl, 64, h, 128, dtype, device)()   # load code paths at a tiny shape
    step = _step_fn(impl, n, h, v, dtype, device)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - base
    else:
        base = _rss_bytes()
        step()
        extra = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    return {
        "impl": impl, "n": n, "h": h, "v": v, "dtype": str(dtype).removeprefix("torch."), "device": device,
        "time_s": median, "times_s": times, "extra_peak_bytes": extra,
        "tflops": 6 * n * h * v / median / 1e12,
    }


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def run_matrix(shapes, dtype: str, device: str, repeats: int) -> list[dict]:
    rows = []
    for shape in shapes:
        for impl in IMPLS:
            cmd = [sys.executable, __file__, "--child", impl, "--shape", shape, "--dtype", dtype,
                   "--device", device, "--repeats", str(repeats)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| N | H | V | dtype | impl | fwd+bwd ms | extra peak MiB | TFLOP/s | time / eager | memory / eager |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    eager = {(r["n"], r["h"], r["v"]): r for r in rows if r["impl"] == "eager"}
    for r in rows:
        e = eager.get((r["n"], r["h"], r["v"]))
        lines.append(
            f"| {r['n']} | {r['h']} | {r['v']} | {r['dtype']} | {r['impl']} | {r['time_s'] * 1e3:.1f} | "
            f"{r['extra_peak_bytes'] / 2**20:.1f} | {r['tflops']:.3f} | "
            f"{r['time_s'] / e['time_s']:.2f} | {r['extra_peak_bytes'] / e['extra_peak_bytes']:.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", action="append", help="N,H,V (repeatable)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", help="path prefix for the .json and .md results")
    p.add_argument("--child", choices=IMPLS, help=argparse.SUPPRESS)
    args = p.parse_args()
    dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    shapes = args.shape or list(DEFAULT_SHAPES)
    if args.child:
        n, h, v = (int(x) for x in shapes[0].split(","))
        print(json.dumps(measure(args.child, n, h, v, getattr(torch, dtype), args.device, args.repeats)))
        return
    rows = run_matrix(shapes, dtype, args.device, args.repeats)
    meta = {
        "device": device_name(args.device), "torch": torch.__version__, "triton": _version("triton"),
        "date": time.strftime("%Y-%m-%d"),
        "git": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent).stdout.strip(),
    }
    md = f"Device: {meta['device']} · torch {meta['torch']} · triton {meta['triton']} · {meta['date']} · git {meta['git']}\n\n"
    md += table(rows)
    print(md)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(f"{args.out}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
        Path(f"{args.out}.md").write_text(md + "\n")


if __name__ == "__main__":
    main()
