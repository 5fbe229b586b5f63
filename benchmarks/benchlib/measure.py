"""Measuring one implementation on one problem, in the calling process.

``check`` runs one step on the sampled rows (see ``benchlib.reference``) and returns the relative
errors against float64; it pays for code loading, compilation and autotuning at the problem's shapes.
A warm-up step on the full inputs follows (its time only sets the repeat count), then ``time_steps`` times up to
``repeats`` full steps, forward and backward apart, as many as fit in the point's time budget at the
warm-up step's pace (at least one), and records the extra peak memory over them (``benchlib.memory``;
the gradients are included). On CUDA the times are CUDA events around the forward and the backward;
on the CPU, host clocks (the work there is synchronous).
"""

from __future__ import annotations

import gc
import statistics
import time

import torch

from .impls import Impl
from .memory import PeakMemory
from .problems import Inputs, Problem
from .reference import References, rel_err


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class _Clock:
    """Marks on the device's timeline: CUDA events (read after a synchronize), or the host clock on the CPU."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, start, end) -> float:
        return start.elapsed_time(end) / 1e3 if self.cuda else end - start


def check(impl: Impl, problem: Problem, inputs: Inputs, refs: References) -> dict[str, float]:
    """Relative errors of the output, d hidden and d weight (none for a frozen head) against float64 (empty for a
    floor)."""
    inputs.clear_grads()
    if impl.output == "none":
        out = impl.build(inputs, problem)()
        impl.backward(out, inputs)
        _sync(problem.device)
        return {}
    masked_labels = impl.output == "dpo_loss"
    check_inputs = Inputs(inputs.hidden, inputs.weight,
                          refs.check_labels() if masked_labels else inputs.labels, refs.check_upstream())
    out = impl.build(check_inputs, problem)()
    impl.backward(out, check_inputs)
    ref = refs.get(impl.output)
    errors = {
        "output": rel_err(out if impl.output == "dpo_loss" else out[ref.rows], ref.output),
        "d_hidden": rel_err(inputs.hidden.grad[ref.rows], ref.d_hidden),
    }
    if impl.frozen:
        assert inputs.weight.grad is None, f"{impl.name}: a frozen head got a weight gradient"
    else:
        errors["d_weight"] = rel_err(inputs.weight.grad[ref.vocab_rows], ref.d_weight)
    inputs.clear_grads()
    return errors


def time_steps(impl: Impl, problem: Problem, inputs: Inputs, repeats: int) -> dict:
    """Median forward, backward and forward+backward seconds over ``repeats`` steps, and extra peak
    bytes over all of them."""
    forward = impl.build(inputs, problem)
    inputs.clear_grads()
    gc.collect()
    memory = PeakMemory(problem.device)
    memory.start()
    clock = _Clock(problem.device)
    marks = []
    for _ in range(repeats):
        inputs.clear_grads()
        t0 = clock.mark()
        out = forward()
        t1 = clock.mark()
        impl.backward(out, inputs)
        t2 = clock.mark()
        del out
        _sync(problem.device)   # one step in flight at a time: the peak is one step's
        marks.append((t0, t1, t2))
    fwd = [clock.seconds(t0, t1) for t0, t1, _ in marks]
    bwd = [clock.seconds(t1, t2) for _, t1, t2 in marks]
    extra = memory.extra()
    inputs.clear_grads()
    total = [f + b for f, b in zip(fwd, bwd)]
    return {
        "fwd_s": statistics.median(fwd), "bwd_s": statistics.median(bwd), "time_s": statistics.median(total),
        "times_s": total, "extra_peak_bytes": extra, "beyond_grads_bytes": extra - impl.grad_bytes(problem),
    }


def measure(impl: Impl, problem: Problem, inputs: Inputs, refs: References, repeats: int, budget_s: float) -> dict:
    """One result row: the problem, the check's errors, the timings and memory."""
    if impl.output != "none":
        refs.get(impl.output)   # computed once per problem, not on the first point's clock
    t0 = time.perf_counter()
    errors = check(impl, problem, inputs, refs)
    check_s = time.perf_counter() - t0
    step_s = time_steps(impl, problem, inputs, 1)["time_s"]   # the warm-up on the full inputs
    repeats = max(1, min(repeats, int((budget_s - (time.perf_counter() - t0)) / step_s)))
    timing = time_steps(impl, problem, inputs, repeats)
    return {"impl": impl.name, **problem.to_dict(), "repeats": repeats, "check_s": check_s, "rel_err": errors,
            **timing, "grad_bytes": impl.grad_bytes(problem), "floor_flop": impl.floor_flop(problem),
            "tflops": problem.flop / timing["time_s"] / 1e12,
            # the forward's one GEMM-equivalent and the backward's two
            "tflops_fwd": problem.flop / 3 / timing["fwd_s"] / 1e12,
            "tflops_bwd": problem.flop * 2 / 3 / timing["bwd_s"] / 1e12}
