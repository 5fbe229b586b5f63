"""The GPU runbook: one command that returns numbers from a lent H100/H200, about 8 minutes (at most 9.5).

    bash benchmarks/gpu_run.sh "$OUT"     # THE command on the GPU machine: carried wheels (.whl/) first, then this
    python benchmarks/gpu_check.py --dry-run --out-dir /tmp/gpu-check    # the same path on the CPU, tiny shapes (CI)

It runs from a plain copy of the repository (no install, no git, no ../shared); its child processes import this
checkout's fastdpo (``benchlib.paths.child_env``). Sections, in order, each guarded (one that fails loses nothing of
the others), each within its own time cap (``CAPS_S``, all of them within ``--budget-s``), each written to
``--out-dir`` as soon as it ends:

1. tests: ``pytest tests/test_gpu.py tests/models/test_prefix_sharing_gpu.py``: the kernels against float64 at full
   model size, an FSDP2 launch, flex/flash prefix-sharing parity.
2. kernels: the Llama-3-8B head (N 8192, H 4096, V 128256, bf16), then N 4096 if the first left time for it:
   fastdpo (default design, exact), fastdpo-frozen (d hidden only), fastdpo-fused and fastdpo-filtered (the Triton
   kernels, exact and filtered), fastdpo-torch, the GEMM floors (8·N·H·V and, frozen, 6·N·H·V through torch.mm),
   eager and the peers (``KERNEL_IMPLS``; ``benchlib.impls`` says what each timed step is). Per row: forward,
   backward and total medians (CUDA events, 10 repeats after a warm-up), extra peak memory, errors against float64,
   TFLOP/s at the floor's FLOP and the time over the floor's; the roofline model's prediction
   (``benchlib.roofline``, where this checkout has it) and measured / predicted; for fastdpo and fastdpo-frozen the
   kernel time of one profiled step by category (``benchlib.profile``) beside the model's stages.
3. filtering: fastdpo exact, fused and filtered on peaked logits (``benchlib.problems.peaked_inputs``: synthetic, fitted
   to SmolLM2's on HH text; no model's states travel), with the share of tiles the filter skipped.
4. dpo-step: fastdpo's trainer (packed, prefix sharing) against TRL's (padded) on a random Llama-3.2-1B-shaped model
   and HH-shaped pairs (``bench_dpo_step.py --random-model``): work tokens/s, peak memory, and the longest micro-batch
   each trains within 40 GiB.

Files in ``--out-dir``: gpu-check.json (every figure, the device, driver, CUDA and package versions), gpu-check.md
(the tables, printed at the end too), pytest.log, nvidia-smi.txt, workers.log (the kernel workers' stderr),
dpo-step.log (the trainers' stderr); ``gpu_run.sh`` adds gpu-check.log (this script's output). Exits 1 when a section
failed.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import bench_dpo_step
import torch
from benchlib.env import header, metadata
from benchlib.impls import IMPLS
from benchlib.paths import REPO_DIR, child_env
from benchlib.problems import MODELS, PEAKED, Problem
from benchlib.report import errors, measured, problem_key, skipped_list, write
from benchlib.runner import Planner, run_matrix
from benchlib.targets import gpu_lines

MiB = 1 << 20
CAPS_S = {"tests": 210, "kernels": 150, "filtering": 45, "dpo-step": 150}
DRY_RUN_CAP_FACTOR = 4          # the dry run's caps: the CPU under Triton's interpreter is slower at its tiny shapes
TESTS = ("tests/test_gpu.py", "tests/models/test_prefix_sharing_gpu.py")
KERNEL_IMPLS = ("fastdpo", "fastdpo-frozen", "fastdpo-fused", "fastdpo-filtered", "fastdpo-torch", "gemm-floor",
                "gemm-floor-frozen", "eager", "trl-chunked", "liger-flce", "liger-per-token", "cce")
FILTER_IMPLS = ("fastdpo", "fastdpo-fused", "fastdpo-filtered")
PROFILED = ("fastdpo", "fastdpo-frozen")
FLOORS = {False: "gemm-floor", True: "gemm-floor-frozen"}     # frozen -> the floor a row is held against


@dataclass
class Section:
    """One section's outcome: ``status`` is "ok", "failed" (an exception, failing tests) or "not run" (``--skip``,
    or no time left in the budget)."""
    name: str
    title: str
    status: str = "not run"
    wall_s: float = 0.0
    markdown: str = ""
    data: object = None
    error: str | None = None


@dataclass
class Run:
    """What the sections share: the arguments, the output folder and the clock."""
    dry_run: bool
    out_dir: Path
    budget_s: float
    device: str
    device_name: str = ""
    start: float = field(default_factory=time.monotonic)

    def cap_s(self, section: str) -> float:
        """The section's cap, within what is left of the whole run's budget."""
        cap = CAPS_S[section] * (DRY_RUN_CAP_FACTOR if self.dry_run else 1)
        return min(cap, self.budget_s - (time.monotonic() - self.start))


def nvidia_smi() -> tuple[str, dict[str, str]]:
    """nvidia-smi's report and its query line, and the driver and CUDA versions read from them."""
    if shutil.which("nvidia-smi") is None:
        return "nvidia-smi not found\n", {}
    query = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.limit,"
             "temperature.gpu,persistence_mode", "--format=csv"]
    text = "".join(subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout
                   for cmd in (["nvidia-smi"], query))
    found = {key: m.group(1) for key, pattern in (("driver", r"Driver Version:\s*([\d.]+)"),
                                                  ("cuda_driver", r"CUDA Version:\s*([\d.]+)"))
             if (m := re.search(pattern, text))}
    return text, found


def tests_section(run: Run) -> tuple[object, str, bool]:
    # -v: each test's outcome is in the log as it ends, so a run stopped at the cap still says which passed
    cmd = [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", *TESTS]
    log = run.out_dir / "pytest.log"
    cap_s = run.cap_s("tests")
    with open(log, "w") as f:
        # its own process group: at the cap the trainings the tests launch stop with it, not later on the GPU
        proc = subprocess.Popen(cmd, cwd=REPO_DIR, env=child_env(), stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=cap_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = None
    lines = log.read_text().strip().splitlines()
    summary = f"stopped at the {cap_s:.0f} s cap" if rc is None else (lines[-1].strip("= ") if lines else "")
    md = f"`{' '.join(cmd[3:])}`: **{summary}** (exit {rc}; pytest.log has the whole output)"
    return {"returncode": rc, "summary": summary}, md, rc == 0


def kernel_problems(run: Run) -> list[Problem]:
    if run.dry_run:
        return [Problem(n, 32, 512, "float32", "cpu", "dry-run") for n in (64, 32)]
    m = MODELS["Llama-3-8B"]
    return [Problem(n, m.hidden, m.vocab, "bfloat16", "cuda", m.name) for n in (8192, 4096)]


def filter_problem(run: Run) -> Problem:
    if run.dry_run:
        return Problem(64, 32, 512, "bfloat16", "cpu", "dry-run peaked", "peaked")
    m = MODELS["Llama-3-8B"]
    return Problem(8192, m.hidden, m.vocab, "bfloat16", "cuda", f"{m.name} peaked", "peaked")


def measure_rows(run: Run, section: str, problems: list[Problem], impls: tuple[str, ...]) -> list[dict]:
    """Rows of ``impls`` on each problem in one worker per problem; a problem is left out (its rows say why) when less
    of the section's cap is left than the first problem took."""
    deadline = time.monotonic() + run.cap_s(section)
    planner = Planner(run.device, 2 if run.dry_run else 10, 30.0, 8, deadline=deadline,
                      stderr_log=run.out_dir / "workers.log")
    rows, first_s = [], None
    for problem in problems:
        left = deadline - time.monotonic()
        if first_s is not None and left < first_s:
            why = f"not run: {left:.0f} s of the time cap left, the first problem took {first_s:.0f} s"
            rows += [{"impl": name, **problem.to_dict(), "skipped": why} for name in impls]
            continue
        t0 = time.monotonic()
        rows += run_matrix([problem], list(impls), planner, profile=PROFILED)
        first_s = first_s or time.monotonic() - t0
    return rows


def add_predictions(rows: list[dict], device_name: str) -> str:
    """The roofline model's prediction for each measured row with a design (``row["roofline"]``); a note on what
    was predicted."""
    try:
        from benchlib.roofline import predict
    except ImportError:
        return "No predictions: benchlib/roofline.py is not in this checkout."
    chip = "H100" if "H100" in device_name else "H200"
    for r in measured(rows):
        impl = IMPLS[r["impl"]]
        if impl.design is None:
            continue
        try:
            p = predict(impl.design, r["n"], r["h"], r["v"], frozen=impl.frozen,
                        dtype_bytes=2 if r["dtype"] != "float32" else 4, device=chip)
            r["roofline"] = {"design": impl.design, "device": chip, "total_ms": p.total_ms, "floor_ms": p.floor_ms,
                             "stages": [{"name": s.name, "flop": s.flop, "bytes": s.bytes, "ms": s.ms}
                                        for s in p.stages],
                             "measured_over_predicted": r["time_s"] * 1e3 / p.total_ms}
        except Exception as exc:    # a design or shape the model does not cover: said in the row, the rest stands
            r["roofline"] = {"design": impl.design, "error": f"{type(exc).__name__}: {exc}"}
    return f"Predictions: the roofline model (benchlib/roofline.py) for {chip}, per row's design."


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}"


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a and b else "–"


def kernel_table(rows: list[dict]) -> str:
    """One line per measured row: times, TFLOP/s at the floor's FLOP (8·N·H·V, 6·N·H·V frozen), time over the GEMM
    floor's of the same problem and head, memory, errors, the prediction and measured / predicted, and where the row
    filtered, the share of tiles skipped."""
    done = measured(rows)
    floors = {(problem_key(r), r["impl"]): r for r in done if r["impl"] in FLOORS.values()}
    filtered = any("skipped_fraction" in r for r in done)
    lines = ["| problem | impl | fwd ms | bwd ms | fwd+bwd ms | TFLOP/s | × floor | extra MiB | beyond grads MiB "
             "| rel. err out / dH / dW | predicted ms | measured / predicted |" + " skipped tiles dH / dW |" * filtered,
             "|---" * (12 + filtered) + "|"]
    for r in done:
        floor = floors.get((problem_key(r), FLOORS[IMPLS[r["impl"]].frozen]), {})
        pred = r.get("roofline", {})
        predicted = f"{pred['total_ms']:.1f}" if "total_ms" in pred else pred.get("error", "–")
        line = (f"| {r['model']} N={r['n']} | {r['impl']} | {_ms(r['fwd_s'])} | {_ms(r['bwd_s'])} | "
                f"{_ms(r['time_s'])} | {r['floor_flop'] / r['time_s'] / 1e12:.1f} | "
                f"{_ratio(r['time_s'], floor.get('time_s'))} | {r['extra_peak_bytes'] / MiB:.0f} | "
                f"{r['beyond_grads_bytes'] / MiB:.0f} | {errors(r)} | {predicted} | "
                f"{_ratio(r['time_s'] * 1e3, pred.get('total_ms'))} |")
        if filtered:
            skip = r.get("skipped_fraction")
            line += f" {skip['d_hidden']:.1%} / {skip['d_weight']:.1%} |" if skip else " – |"
        lines.append(line)
    return "\n".join(lines)


def stage_tables(rows: list[dict]) -> str:
    """For each profiled row: the measured kernel time by category beside the roofline model's stages."""
    out = []
    for r in rows:
        if "stages_ms" not in r:
            continue
        stages = r.get("roofline", {}).get("stages", [])
        measured = list(r["stages_ms"].items())
        lines = [f"**{r['impl']}**, {r['model']} N={r['n']}: one profiled step, "
                 f"{sum(ms for _, ms in measured):.1f} ms of kernels (median step {_ms(r['time_s'])} ms)", "",
                 "| measured: kernels | ms | predicted: stage | GFLOP | GB | ms |", "|---|---|---|---|---|---|"]
        for i in range(max(len(measured), len(stages))):
            kernel = f"{measured[i][0]} | {measured[i][1]:.2f}" if i < len(measured) else " | "
            stage = (f"{stages[i]['name']} | {stages[i]['flop'] / 1e9:.0f} | {stages[i]['bytes'] / 1e9:.2f} | "
                     f"{stages[i]['ms']:.2f}") if i < len(stages) else " | | "
            lines.append(f"| {kernel} | {stage} |")
        out.append("\n".join(lines))
    return "\n\n".join(out)


def kernels_section(run: Run) -> tuple[object, str, bool]:
    problems = kernel_problems(run)
    rows = measure_rows(run, "kernels", problems, KERNEL_IMPLS)
    note = add_predictions(rows, run.device_name)
    md = "\n\n".join(filter(None, [
        note, kernel_table(rows), stage_tables(rows), "\n".join(f"- {line}" for line in gpu_lines(rows, problems[0])),
        "Not measured:\n\n" + (skipped_list(rows) or "nothing")]))
    return rows, md, True


def filtering_section(run: Run) -> tuple[object, str, bool]:
    rows = measure_rows(run, "filtering", [filter_problem(run)], FILTER_IMPLS)
    note = add_predictions(rows, run.device_name)
    md = (f"Peaked logits, synthetic (``benchlib.problems.peaked_inputs``, knobs {PEAKED}; fitted to SmolLM2-135M on HH "
          f"text, where the filter skips 10.8% of 64x128 and 23.0% of 64x64 tiles). {note}\n\n" + kernel_table(rows))
    return rows, md, True


def dpo_argv(run: Run, cap_s: float) -> list[str]:
    """bench_dpo_step.py's arguments: fastdpo and, where installed, TRL, both processes within the cap. On the GPU the
    timed micro-batches process at most 8192 tokens each (TRL: 4 pairs of at most 2 x 1024 tokens), well within
    40 GiB, and the probes start there."""
    trainers = "fastdpo,trl" if importlib.util.find_spec("trl") else "fastdpo"
    shape = (["--device", "cpu", "--random-model", "tiny", "--pairs", "24", "--max-length", "128", "--steps", "2",
              "--gradient-accumulation-steps", "1", "--max-tokens-per-batch", "512", "--pairs-per-micro-batch", "2",
              "--probes", "2"] if run.dry_run else
             ["--device", "cuda", "--random-model", "llama-3.2-1b", "--pairs", "512", "--max-length", "1024",
              "--steps", "4", "--gradient-accumulation-steps", "2", "--max-tokens-per-batch", "8192",
              "--pairs-per-micro-batch", "4", "--probes", "5"])
    # packed_sdpa: prefix sharing on CUDA without flash-attn and without compiling (flex_attention, fastdpo train's
    # CUDA default, compiles for each new shape: minutes a run can't spare)
    return [*shape, "--trainers", trainers, "--attention", "packed_sdpa", "--probe", "--memory-limit-gib", "40",
            "--timeout-s", f"{cap_s:.0f}", "--log", str(run.out_dir / "dpo-step.log")]


def dpo_section(run: Run) -> tuple[object, str, bool]:
    argv = dpo_argv(run, run.cap_s("dpo-step"))
    rows, md = bench_dpo_step.run_trainers(argv)
    if "trl" not in argv[argv.index("--trainers") + 1]:
        md += "\n\ntrl is not installed: carry its wheels (benchmarks/README.md) for the comparison."
    md += "\n\n" + "\n".join(dpo_target_lines(rows))
    return rows, md, any(r["trainer"] == "fastdpo" and "skipped" not in r for r in rows)


def dpo_target_lines(rows: list[dict]) -> list[str]:
    """Issue 22's DPO-step targets against TRL, as PASS / FAIL lines."""
    ours = next((r for r in rows if r["trainer"] == "fastdpo" and "skipped" not in r), None)
    trl = next((r for r in rows if r["trainer"] == "trl" and "skipped" not in r), None)
    if not (ours and trl):
        return ["- not compared: fastdpo and TRL did not both run"]
    speed = ours["work_tokens_per_s"] / trl["work_tokens_per_s"]
    lines = [f"- {'PASS' if speed >= 1.5 else 'FAIL'}: fastdpo {speed:.2f}× TRL's work tokens/s (target ≥ 1.5×)"]
    best, base = bench_dpo_step.longest_fit(ours), bench_dpo_step.longest_fit(trl)
    if best and base:
        ratio = best["processed_tokens"] / base["processed_tokens"]
        lines.append(f"- {'PASS' if ratio >= 2 else 'FAIL'}: fastdpo's longest micro-batch within 40 GiB "
                     f"{best['processed_tokens']} tokens = {ratio:.2f}× TRL's {base['processed_tokens']} (target ≥ 2×)")
    return lines


SECTIONS: dict[str, tuple[str, Callable[[Run], tuple[object, str, bool]]]] = {
    "tests": ("GPU tests", tests_section),
    "kernels": ("Kernels: forward + backward, per-token log-probs", kernels_section),
    "filtering": ("Gradient filtering on peaked logits", filtering_section),
    "dpo-step": ("DPO step: fastdpo against TRL", dpo_section),
}


def run_section(run: Run, section: Section, fn: Callable[[Run], tuple[object, str, bool]]) -> None:
    if run.cap_s(section.name) < 10:
        section.markdown = f"not run: {run.budget_s:.0f} s budget spent"
        return
    print(f"## {section.title}", flush=True)
    t0 = time.monotonic()
    try:
        section.data, section.markdown, ok = fn(run)
        section.status = "ok" if ok else "failed"
    except Exception:   # one section's failure must not lose the others
        section.status, section.error = "failed", traceback.format_exc()[-3000:]
        section.markdown = f"failed:\n\n```\n{section.error}\n```"
    section.wall_s = time.monotonic() - t0
    print(section.markdown, flush=True)


def report(meta: dict, sections: list[Section], dry_run: bool) -> str:
    parts = [f"# GPU check: {meta['device']}" + (" (dry run)" if dry_run else ""), header(meta),
             f"Driver {meta.get('driver', '–')}, CUDA {meta.get('cuda_driver', '–')} (driver) / "
             f"{meta.get('torch_cuda') or '–'} (torch)."]
    if dry_run:
        parts.append("A dry run: the GPU run's code path on the CPU at tiny shapes. Its times and PASS/FAIL lines "
                     "measure nothing of the GPU targets.")
    for s in sections:
        parts.append(f"## {s.title} ({s.status}, {s.wall_s:.0f} s)\n\n{s.markdown}")
    return "\n\n".join(parts)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="the same path on the CPU at tiny shapes")
    p.add_argument("--out-dir", type=Path, required=True)
    p.add_argument("--budget-s", type=float, default=560.0, help="the whole run's time (sections stop within it)")
    p.add_argument("--skip", default="", help=f"comma-separated sections to leave out, of {', '.join(SECTIONS)}")
    args = p.parse_args(argv)
    if args.dry_run:    # the Triton kernels under the interpreter, in every child process (none imported triton yet)
        os.environ["TRITON_INTERPRET"] = "1"
    device = "cpu" if args.dry_run else "cuda"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    smi, versions = nvidia_smi()
    (args.out_dir / "nvidia-smi.txt").write_text(smi)
    meta = {**metadata(device), **versions, "torch_cuda": torch.version.cuda}
    run = Run(args.dry_run, args.out_dir, args.budget_s, device, meta["device"])
    skip = set(filter(None, args.skip.split(",")))
    sections = [Section(name, title) for name, (title, _) in SECTIONS.items()]
    for section in sections:
        if section.name in skip:
            section.markdown = "not run: --skip"
        else:
            run_section(run, section, SECTIONS[section.name][1])
        md = report(meta, sections, args.dry_run)
        write(args.out_dir / "gpu-check", {"meta": meta, "dry_run": args.dry_run,
                                                   "sections": [asdict(s) for s in sections]}, md)
    print("\n" + md)
    print(f"\nwrote {args.out_dir}/gpu-check.md and .json in {time.monotonic() - run.start:.0f} s")
    return 1 if any(s.status == "failed" for s in sections) else 0


if __name__ == "__main__":
    sys.exit(main())
