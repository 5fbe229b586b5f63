"""Parent side: which points to run, and running them in worker processes.

A point is skipped, with its reason, when its implementation cannot run here (not installed, needs a
GPU), or when its estimated memory or time exceeds the limits. The estimates are deliberately rough:
time = the least a point takes (a check step and one timed step), each 1.5 × the GEMM floor at the
rate measured on this device; memory = the inputs, gradients and fp32 accumulators, plus four fp32
[N, V] tensors for implementations that materialise logits. The same time limit is each point's
budget: a worker times fewer repeats where the check step shows they would not fit.

Points run in one worker process (``benchlib.worker``) that streams a result line per point; when a
worker dies (killed for memory, a crash in a kernel) the point it was on is reported as failed and a
fresh worker takes the rest. ``isolate=True`` gives every point a fresh process. A ``deadline`` (a
``time.monotonic()`` value) stops the worker there: the point it was on and those after it are reported
as not run.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path

import torch

from .impls import IMPLS
from .paths import BENCH_DIR, child_env
from .problems import DTYPES, Problem
from .worker import ROW_PREFIX

GiB = 1 << 30


def gemm_rate(device: str, dtype: str) -> float:
    """FLOP/s of one [2048, 1024] × [1024, 8192] product on ``device``: median of 3 after a warm-up."""
    a = torch.randn(2048, 1024, device=device).to(DTYPES[dtype])
    b = torch.randn(1024, 8192, device=device).to(DTYPES[dtype])
    times = []
    for _ in range(4):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return 2 * 2048 * 1024 * 8192 / statistics.median(times[1:])


def memory_limit(device: str, cap_gib: float) -> int:
    if device == "cuda":
        return int(0.9 * torch.cuda.get_device_properties(0).total_memory)
    with open("/proc/meminfo") as f:
        available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable"))
    return int(min(cap_gib * GiB, 0.8 * available))


def estimate_bytes(problem: Problem, materialises: bool) -> int:
    inputs = problem.grad_bytes                  # hidden and weight; their gradients as much again
    fp32_acc = (problem.n + problem.v) * problem.h * 4
    logits = 4 * problem.n * problem.v * 4 if materialises else 0
    return 2 * inputs + fp32_acc + logits


class Planner:
    """Splits points into runnable ones and skipped rows, with the reasons."""

    def __init__(self, device: str, repeats: int, max_point_s: float, max_memory_gib: float, *,
                 deadline: float | None = None, stderr_log: Path | None = None):
        self.device, self.repeats, self.max_point_s = device, repeats, max_point_s
        self.deadline, self.stderr_log = deadline, stderr_log     # see run_points
        self.max_bytes = memory_limit(device, max_memory_gib)
        self._rates: dict[str, float] = {}

    def estimate_s(self, problem: Problem) -> float:
        if problem.dtype not in self._rates:
            self._rates[problem.dtype] = gemm_rate(self.device, problem.dtype)
        return 2 * 1.5 * problem.flop / self._rates[problem.dtype]

    def why_not(self, impl_name: str, problem: Problem) -> str | None:
        impl = IMPLS[impl_name]
        reason = impl.unavailable(self.device)
        if reason:
            return reason
        need = estimate_bytes(problem, impl.materialises)
        if need > self.max_bytes:
            return f"needs about {need / GiB:.0f} GiB, over the {self.max_bytes / GiB:.0f} GiB limit"
        seconds = self.estimate_s(problem)
        if seconds > self.max_point_s:
            return f"about {seconds:.0f} s on this device, over the {self.max_point_s:.0f} s per point limit"
        return None

    def split(self, points: list[tuple[str, Problem]]) -> tuple[list[tuple[str, Problem]], list[dict]]:
        runnable, skipped = [], []
        for name, problem in points:
            reason = self.why_not(name, problem)
            if reason:
                skipped.append({"impl": name, **problem.to_dict(), "skipped": reason})
            else:
                runnable.append((name, problem))
        return runnable, skipped


NOT_RUN = "not run: the time cap was reached"


def _run_worker(points: list[tuple[str, Problem]], job: dict, log, deadline: float | None,
                stderr_log: Path | None) -> tuple[list[dict], str | None]:
    """Rows of the points a worker completed, and why it died (None when it finished)."""
    job = {"points": [{"impl": name, "problem": p.to_dict()} for name, p in points], **job}
    # stderr to a file: a pipe nobody reads until the end would block a worker that warns a lot
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, "-m", "benchlib.worker"], cwd=BENCH_DIR, env=child_env(), text=True,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err)
        stopped = threading.Event()

        def stop():
            stopped.set()
            proc.kill()

        timer = threading.Timer(max(0.0, deadline - time.monotonic()), stop) if deadline is not None else None
        if timer:
            timer.start()
        proc.stdin.write(json.dumps(job))
        proc.stdin.close()
        rows = []
        for line in proc.stdout:
            if line.startswith(ROW_PREFIX):
                row = json.loads(line[len(ROW_PREFIX):])
                log(row)
                rows.append(row)
        proc.wait()
        if timer:
            timer.cancel()
        err.seek(0)
        stderr = err.read()
    if stderr_log:
        with open(stderr_log, "a") as f:
            f.write(f"===== worker for {', '.join(sorted({name for name, _ in points}))}: exit {proc.returncode}\n"
                    f"{stderr}\n")
    if stopped.is_set():
        return rows, NOT_RUN
    if proc.returncode == 0 or len(rows) == len(points):
        return rows, None
    code = proc.returncode
    why = f"killed by signal {-code}" + (" (out of memory?)" if code == -9 else "") if code < 0 else f"exit {code}"
    tail = stderr.strip().splitlines()[-1:] or [""]
    return rows, f"worker died: {why}; {tail[0][:300]}"


def run_points(points: list[tuple[str, Problem]], repeats: int, budget_s: float, *, isolate: bool = False,
               profile: tuple[str, ...] = (), deadline: float | None = None, stderr_log: Path | None = None,
               log=print) -> list[dict]:
    """Result rows for ``points`` (runnable ones), in order; the implementations in ``profile`` also get a
    profiled step's kernel times by category (``benchlib.profile``). Workers stop at ``deadline`` (the points
    left are reported as not run); their stderr is appended to ``stderr_log``."""
    pending = deque(points)
    rows = []
    while pending:
        batch = [pending.popleft() for _ in range(1 if isolate else len(pending))]
        job = {"repeats": repeats, "budget_s": budget_s, "profile": list(profile)}
        done, died = _run_worker(batch, job, log, deadline, stderr_log)
        rows += done
        if died == NOT_RUN:
            for name, problem in [*batch[len(done):], *pending]:
                row = {"impl": name, **problem.to_dict(), "skipped": NOT_RUN}
                log(row)
                rows.append(row)
            break
        if died:
            name, problem = batch[len(done)]
            row = {"impl": name, **problem.to_dict(), "skipped": died}
            log(row)
            rows.append(row)
            pending.extendleft(reversed(batch[len(done) + 1:]))
    return rows


def log_row(row: dict) -> None:
    where = f"{row['model']} N={row['n']} H={row['h']} V={row['v']} {row['dtype']}"
    if "skipped" in row:
        print(f"  {where} {row['impl']}: skipped: {row['skipped']}", flush=True)
    else:
        print(f"  {where} {row['impl']}: fwd+bwd {row['time_s'] * 1e3:.1f} ms, "
              f"extra {row['extra_peak_bytes'] / 2**20:.1f} MiB, rel. err {row['rel_err']}", flush=True)


def run_matrix(problems: list[Problem], impl_names: list[str], planner: Planner, *, isolate: bool = False,
               profile: tuple[str, ...] = ()) -> list[dict]:
    """Rows for every (problem, implementation), skipped ones included, in problem-major order."""
    points = [(name, p) for p in problems for name in impl_names]
    runnable, skipped = planner.split(points)
    for row in skipped:
        log_row(row)
    done = run_points(runnable, planner.repeats, planner.max_point_s, isolate=isolate, profile=profile,
                      deadline=planner.deadline, stderr_log=planner.stderr_log, log=log_row)
    by_point = {(r["impl"], Problem(**{k: r[k] for k in Problem.__dataclass_fields__})): r for r in done + skipped}
    return [by_point[point] for point in points]
