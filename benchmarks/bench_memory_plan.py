"""The memory plan's estimate against the measured peak RSS of whole ``fastdpo train`` / ``fastdpo sft`` runs.

Each configuration runs for a few optimiser steps in a fresh process, one after the other. Recorded: the estimate the
run prints at its start (``[fastdpo] memory: estimated peak ...``), with the estimator's inputs (model shape, token
budget, checkpointing, extra weights: a child wrapper records the call of ``fastdpo.cli.memory.estimate_peak_bytes``
the plan chose, so that ``--render`` and a test re-evaluate the current estimator on them), the resident memory at
the plan, and the process's peak RSS (``os.wait4``'s ``ru_maxrss``). Rows are ``calibration`` (what
``fastdpo.cli.memory.ALLOCATOR_RETENTION`` is fitted to: ``--fit``), ``held-out`` (what the test checks, within 15%)
or ``diagnostic`` (a calibration run with glibc's freed-heap retention turned off, ``MALLOC_MMAP_THRESHOLD_``: its
live memory). A run leaves the converted model in a private ``FASTDPO_CACHE`` (converted once, before the first
measured run), so no run pays the conversion.

    python benchmarks/bench_memory_plan.py [--only NAME,...] [--dry-run]   # writes results/cpu-memory-plan.{json,md}
    python benchmarks/bench_memory_plan.py --render                        # the markdown again from the json
    python benchmarks/bench_memory_plan.py --fit                           # the retention the calibration rows give
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib.env import header, metadata
from benchlib.paths import DEFAULT_MODEL, HH_DATA, RESULTS_DIR, SHARED, child_env
from benchlib.report import write

GIB = 1 << 30
OUT = RESULTS_DIR / "cpu-memory-plan"
UF_CONVERSATIONAL = SHARED / "data" / "ultrafeedback-binarized" / "train.conversational.jsonl"
M, HH, UF = str(DEFAULT_MODEL), str(HH_DATA), str(UF_CONVERSATIONAL)
#: glibc option that returns every freed block over 128 KiB to the OS at once (no heap retention; slower)
NO_RETENTION = {"MALLOC_MMAP_THRESHOLD_": "131072"}
#: the README's SFT -> DPO chain, each cut to three optimiser steps: its SFT run writes the adapter that its DPO run
#: loads as policy and reference
SFT_CHAIN = ["sft", "--model", M, "--dataset", UF, "--max-samples", "120", "--eval-fraction", "0.1", "--use-peft",
             "--learning-rate", "2e-4", "--max-length", "192", "--max-tokens-per-batch", "1024",
             "--num-train-epochs", "1", "--logging-steps", "2", "--max-steps", "3", "--output-dir",
             "{tmp}/smollm2-uf-sft"]
DPO_CHAIN = ["train", "--model", M, "--dataset", UF, "--max-samples", "100", "--adapter", "{tmp}/smollm2-uf-sft",
             "--model-adapter-name", "policy", "--ref-adapter-name", "reference", "--learning-rate", "5e-4",
             "--beta", "0.1", "--max-length", "128", "--max-prompt-length", "48", "--max-tokens-per-batch", "1024",
             "--num-train-epochs", "1", "--logging-steps", "5", "--max-steps", "3"]
#: HH pairs cut at 512 tokens, the budget given (so one micro-batch per optimiser step): the calibration runs
HH_512 = ["train", "--model", M, "--dataset", HH, "--use-peft", "--max-length", "512"]

#: (name, role, argv after ``fastdpo``, extra environment), in the order they run. Two to six micro-batches a run:
#: the heap grows over the first two or three (each a different length, and the optimiser's moments allocated after
#: the first); few, as the runs share a 2-core CPU.
CONFIGS = [
    # the three under-estimates, held out: the default train on HH (the plan picks 2048 tokens, a pair of
    # 2 x 1024, two micro-batches a step), the SFT -> DPO chain's DPO run (a reference adapter; its SFT run writes
    # the adapter), fastdpo sft at its default budget (1024 tokens, four micro-batches a step)
    ("hh-default", "held-out", ["train", "--model", M, "--dataset", HH, "--use-peft", "--max-steps", "3"], {}),
    ("hh-512-3072", "calibration", [*HH_512, "--max-tokens-per-batch", "3072", "--max-steps", "2"], {}),
    ("sft-chain", "held-out", SFT_CHAIN, {}),
    ("dpo-chain-ref-adapter", "held-out", DPO_CHAIN, {}),
    ("sft-default", "held-out", ["sft", "--model", M, "--dataset", UF, "--use-peft", "--max-steps", "1"], {}),
    ("hh-512-3072-ckpt", "calibration", [*HH_512, "--max-tokens-per-batch", "3072", "--activation-checkpointing",
                                         "true", "--max-steps", "2"], {}),
    ("hh-512-1024", "held-out", [*HH_512, "--max-tokens-per-batch", "1024", "--max-steps", "3"], {}),
    ("sft-default no retention", "diagnostic", ["sft", "--model", M, "--dataset", UF, "--use-peft", "--max-steps",
                                                 "1"], NO_RETENTION),
    ("hh-512-3072 no retention", "diagnostic", [*HH_512, "--max-tokens-per-batch", "3072", "--max-steps", "2"],
     NO_RETENTION),
]
COMMON = ["--report-to", "none", "--save-strategy", "no"]

#: Runs ``python -m fastdpo ARGV`` and writes the estimator call behind the plan, its estimate and the resident memory
#: then (model and raw rows loaded; before tokenising and training) to $MEMORY_PLAN_OUT.
CHILD = """
import dataclasses, json, os, sys
from fastdpo.cli import main, memory
calls, estimate, apply = [], memory.estimate_peak_bytes, memory.apply_memory_plan
def recording_estimate(shape, tokens, **kw):
    calls.append(dict(shape=dataclasses.asdict(shape), tokens=tokens, **kw))
    return estimate(shape, tokens, **kw)
def recording_apply(*a, **kw):
    new_args, plan = apply(*a, **kw)
    chosen = next(c for c in calls if (c["tokens"], c["checkpointing"]) == (plan.tokens, plan.checkpointing))
    status = dict(line.split(":", 1) for line in open("/proc/self/status"))
    with open(os.environ["MEMORY_PLAN_OUT"], "w") as f:
        json.dump(dict(estimator_inputs=chosen, estimate_bytes=plan.estimate,
                       rss_at_plan_bytes=int(status["VmRSS"].split()[0]) * 1024), f)
    return new_args, plan
memory.estimate_peak_bytes, memory.apply_memory_plan = recording_estimate, recording_apply
sys.exit(main(sys.argv[1:]))
"""


def run(name: str, argv: list[str], env: dict, tmp: Path) -> dict:
    """One configuration in a fresh process: its plan, printed estimate, peak RSS and wall time."""
    argv = argv + COMMON + ([] if "--output-dir" in argv else ["--output-dir", f"{{tmp}}/{name.replace(' ', '-')}"])
    argv = [a.format(tmp=tmp) for a in argv]
    plan_file = tmp / "plan.json"
    plan_file.unlink(missing_ok=True)
    log = tmp / f"{name.replace(' ', '-')}.log"
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-c", CHILD, *argv], stdout=out, stderr=subprocess.STDOUT,
                                env={**child_env(), **env, "MEMORY_PLAN_OUT": str(plan_file),
                                     "FASTDPO_CACHE": str(tmp / "cache")})
        _, status, usage = os.wait4(proc.pid, 0)
    text = log.read_text()
    if status != 0:
        raise RuntimeError(f"{name} failed ({status}); the end of {log}:\n{text[-3000:]}")
    plan = json.loads(plan_file.read_text())
    printed = next(line for line in text.splitlines() if "memory: estimated peak" in line)
    return {"date": time.strftime("%Y-%m-%d %H:%M"), "load_avg_1min": os.getloadavg()[0],
            "seconds": round(time.perf_counter() - start), "measured_bytes": usage.ru_maxrss * 1024,
            "printed": printed.strip(), **plan}


def command_line(argv: list[str], env: dict) -> str:
    shown = [a.replace(str(SHARED), "../shared").replace("{tmp}/", "") for a in argv]
    prefix = "".join(f"{k}={v} " for k, v in env.items())
    return f"{prefix}fastdpo {shlex.join(shown)}"


def current_estimate(row: dict) -> int:
    """The estimate of this checkout's ``estimate_peak_bytes`` on the row's recorded inputs."""
    from fastdpo.cli.memory import ModelShape, estimate_peak_bytes

    inputs = dict(row["estimator_inputs"])
    return estimate_peak_bytes(ModelShape(**inputs.pop("shape")), inputs.pop("tokens"), **inputs)


def fitted_retention(rows: list[dict]) -> float:
    """The ``ALLOCATOR_RETENTION`` that makes the estimate of the calibration rows match on average: the estimate is
    linear in it, so each row gives it exactly (printed per row) and the mean is the fit."""
    from fastdpo.cli import memory

    shares = []
    for row in (r for r in rows if r["role"] == "calibration"):
        at = {}
        for retention in (0.0, 1.0):
            memory.ALLOCATOR_RETENTION = retention
            at[retention] = current_estimate(row)
        shares.append((row["measured_bytes"] - at[0.0]) / (at[1.0] - at[0.0]))
        print(f"{row['name']}: retention {shares[-1]:.3f}")
    return sum(shares) / len(shares)


def markdown(data: dict) -> str:
    lines = [
        "# The memory plan's estimate against measured peak RSS",
        "",
        header(data["meta"]),
        "",
        "`python benchmarks/bench_memory_plan.py`: each run a fresh process for a few optimiser steps, on "
        "SmolLM2-135M-Instruct (fp32) + LoRA r16 (dropout 0.05); **estimate** is this checkout's "
        "`fastdpo.cli.memory.estimate_peak_bytes` on the inputs the run's plan recorded (the model's shape, the "
        "micro-batch tokens, checkpointing, extra weights; `--render` re-evaluates it), **printed** the estimate the "
        "run printed at its start (the estimator of its day), **at plan** the resident memory when the plan ran (model "
        "and raw rows loaded), **measured** the process's peak RSS (`ru_maxrss`). Roles: **calibration** runs are "
        "what the estimator's one fitted constant (`ALLOCATOR_RETENTION`) is fitted to, **held-out** runs what "
        "`tests/cli/test_cli_memory.py::test_estimate_is_within_15_percent_of_held_out_runs` checks, "
        "**diagnostic** runs repeat a calibration run with glibc's heap retention off "
        "(`MALLOC_MMAP_THRESHOLD_=131072`: every freed block over 128 KiB goes back to the OS), which leaves the "
        "process's live memory.",
        "",
        "| run | role | micro-batch tokens | checkpointing | at plan GiB | printed GiB | estimate GiB | measured GiB "
        "| estimate / measured |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in data["rows"]:
        inputs, estimate = row["estimator_inputs"], current_estimate(row)
        at_plan = f"{row['rss_at_plan_bytes'] / GIB:.2f}" if "rss_at_plan_bytes" in row else "-"
        lines.append(f"| {row['name']} | {row['role']} | {inputs['tokens']} | {'on' if inputs['checkpointing'] else 'off'}"
                     f" | {at_plan} | {row['estimate_bytes'] / GIB:.2f} | {estimate / GIB:.2f} | "
                     f"{row['measured_bytes'] / GIB:.2f} | {estimate / row['measured_bytes']:.2f} |")
    lines += ["", "Commands (paths relative to the repository's parent; each run also had "
              f"`{shlex.join(COMMON)}` and an `--output-dir`):", ""]
    lines += [f"- {row['name']}: `{row['command']}`" for row in data["rows"]]
    if data.get("notes"):
        lines += ["", data["notes"]]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated names (keeps the other rows of an existing results file)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    parser.add_argument("--render", action="store_true", help="rewrite the markdown from the json, run nothing")
    parser.add_argument("--fit", action="store_true", help="print ALLOCATOR_RETENTION fitted to the calibration rows")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    if args.fit:
        print(f"ALLOCATOR_RETENTION = {fitted_retention(json.loads(Path(f'{args.out}.json').read_text())['rows']):.3f}")
        return
    if args.render:
        data = json.loads(Path(f"{args.out}.json").read_text())
        write(args.out, data, markdown(data))
        return
    names = args.only.split(",") if args.only else [c[0] for c in CONFIGS]
    unknown = set(names) - {c[0] for c in CONFIGS}
    if unknown:
        parser.error(f"unknown configuration(s): {', '.join(sorted(unknown))}")
    configs = [c for c in CONFIGS if c[0] in names]
    if args.dry_run:
        for name, role, argv, env in configs:
            print(f"{name} ({role}): {command_line(argv, env)}")
        return
    previous = json.loads(Path(f"{args.out}.json").read_text()) if args.only and Path(f"{args.out}.json").exists() \
        else {"rows": []}
    rows = {row["name"]: row for row in previous["rows"]}
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        tmp = Path(tmp)
        # the GGUF converted once into the private cache, so that no measured run pays for the conversion
        subprocess.run([sys.executable, "-c", "from fastdpo.models import load_causal_lm, resolve_model; "
                        f"load_causal_lm(resolve_model({M!r}))"], check=True, env={**child_env(),
                                                                                  "FASTDPO_CACHE": str(tmp / "cache")})
        if any(c[0] == "dpo-chain-ref-adapter" for c in configs) and not any(c[0] == "sft-chain" for c in configs):
            configs.insert(0, next(c for c in CONFIGS if c[0] == "sft-chain"))   # the adapter the DPO run loads
        for name, role, argv, env in configs:
            result = run(name, argv, env, tmp)
            rows[name] = {"name": name, "role": role, "command": command_line(argv, env), **result}
            print(f"{name}: estimate {result['estimate_bytes'] / GIB:.2f} GiB, measured "
                  f"{result['measured_bytes'] / GIB:.2f} GiB ({result['seconds']} s)", flush=True)
            order = [c[0] for c in CONFIGS]   # written after every run: a failed run keeps the others
            data = {"meta": metadata("cpu"), "notes": previous.get("notes", ""),
                    "rows": sorted(rows.values(), key=lambda r: order.index(r["name"]))}
            write(args.out, data, markdown(data))


if __name__ == "__main__":
    main()
