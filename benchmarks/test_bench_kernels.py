"""pytest-benchmark: every implementation at a small shape (N 256, H 64, V 2048, fp32), fwd+bwd timed.

    pytest -q benchmarks --benchmark-json=benchmark.json

Each test checks the implementation's output, d hidden and d weight against float64 (all rows) and
asserts only that agreement, never a time; the errors go to the JSON's ``extra_info``. A peer that is
not installed, or needs a GPU, skips with the reason. A GEMM floor has no output: its step is checked to do exactly
the FLOP it stands for (8·N·H·V, 6·N·H·V frozen).
"""

import pytest
import torch
from benchlib.impls import IMPLS
from benchlib.measure import check
from benchlib.problems import Problem, make_inputs
from benchlib.reference import References
from torch.utils.flop_counter import FlopCounterMode

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
PROBLEM = Problem(256, 64, 2048, "float32", DEVICE, "ci")
# fp32 everywhere; on CUDA some peers' Triton dots round their fp32 operands to TF32
TOL = 2e-3 if DEVICE == "cuda" else 1e-5


@pytest.fixture(scope="module")
def data():
    inputs = make_inputs(PROBLEM)
    return inputs, References(PROBLEM, inputs)


@pytest.mark.parametrize("name", list(IMPLS))
def test_fwd_bwd(benchmark, name, data):
    impl = IMPLS[name]
    reason = impl.unavailable(DEVICE)
    if reason:
        pytest.skip(reason)
    inputs, refs = data
    forward = impl.build(inputs, PROBLEM)
    if impl.output == "none":
        with FlopCounterMode(display=False) as flop:
            impl.backward(forward(), inputs)
        assert flop.get_total_flops() == impl.floor_flop(PROBLEM)
    else:
        errors = check(impl, PROBLEM, inputs, refs)
        benchmark.extra_info["rel_err"] = errors
        assert errors and all(err <= TOL for err in errors.values()), errors

    def step():
        inputs.clear_grads()
        impl.backward(forward(), inputs)
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    benchmark.pedantic(step, rounds=5, warmup_rounds=1)
