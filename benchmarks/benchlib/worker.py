"""Worker process: measures a list of points and prints one result line per point as it goes.

    python -m benchlib.worker < job.json      (run from benchmarks/; see ``benchlib.runner``)

The job is ``{"points": [{"impl": name, "problem": {...}}, ...], "repeats": int, "budget_s": float,
"profile": [impl names]}`` (see ``benchlib.measure``; the rows of the implementations in ``profile`` get the
per-category kernel times of one profiled step, ``benchlib.profile``). Points of one problem share its inputs and
float64 references, so consecutive points should share a problem. An exception in one point becomes that row's
``skipped`` reason and the worker goes on, unless it broke the CUDA context: then the worker exits and the runner
reports the point and starts a fresh worker for the rest.
"""

from __future__ import annotations

import gc
import json
import sys
import traceback

import torch

from .impls import IMPLS
from .measure import measure
from .problems import Problem, make_inputs
from .profile import stage_ms
from .reference import References

ROW_PREFIX = "BENCH-ROW "     # libraries print to stdout too; result lines carry this prefix


def _reason(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:300] if lines else ''}"


def _cuda_lost() -> bool:
    """Whether the CUDA context is broken (an illegal address and the like stick: every later call fails too)."""
    try:
        torch.cuda.synchronize()
        return False
    except RuntimeError:
        return True


def main() -> None:
    job = json.load(sys.stdin)
    current, inputs, refs = None, None, None
    for point in job["points"]:
        problem = Problem(**point["problem"])
        if problem != current:
            inputs = refs = None    # free the previous problem's tensors first
            gc.collect()
            inputs = make_inputs(problem)
            refs = References(problem, inputs)
            current = problem
        impl = IMPLS[point["impl"]]
        try:
            row = measure(impl, problem, inputs, refs, job["repeats"], job["budget_s"])
            if impl.extras:
                row.update(impl.extras(inputs, problem))
            if impl.name in job.get("profile", ()):
                row["stages_ms"] = stage_ms(impl, problem, inputs)
        except Exception as exc:    # a peer that fails at run time is reported, not fatal
            traceback.print_exc(file=sys.stderr)
            if problem.device == "cuda" and _cuda_lost():   # the runner reports this point and starts a fresh worker
                print(f"{_reason(exc)} (CUDA context lost)", file=sys.stderr, flush=True)
                sys.exit(3)
            row = {"impl": impl.name, **problem.to_dict(), "skipped": _reason(exc)}
            inputs.clear_grads()
        print(ROW_PREFIX + json.dumps(row), flush=True)
        gc.collect()
        if problem.device == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
