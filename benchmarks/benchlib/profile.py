"""Where one step's time goes: a ``torch.profiler`` step with device activity, kernel time summed by category.

Categories on CUDA: ``GEMM`` (cuBLAS/CUTLASS kernels: names with gemm, cutlass, cublas, nvjet, xmma or sm80_/sm90_),
each Triton kernel by its name (Triton names a kernel after its function: a bare identifier), and
``elementwise/other`` (PyTorch's own kernels, memsets, copies). On the CPU (the dry run) the operators' own time:
``GEMM`` for the matrix products, ``elementwise/other`` for the rest; Triton's interpreter runs as Python and is not
seen there.
"""

from __future__ import annotations

import re
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from .impls import Impl
from .problems import Inputs, Problem

_GEMM = re.compile(r"gemm|cutlass|cublas|nvjet|xmma|sm80_|sm90_", re.IGNORECASE)
_CPU_GEMMS = {"aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm"}
OTHER = "elementwise/other"


def category(kernel: str) -> str:
    if _GEMM.search(kernel):
        return "GEMM"
    return kernel if re.fullmatch(r"\w+", kernel) else OTHER


def stage_ms(impl: Impl, problem: Problem, inputs: Inputs) -> dict[str, float]:
    """Milliseconds per category over one forward + backward step, largest first."""
    cuda = problem.device == "cuda"
    forward = impl.build(inputs, problem)
    inputs.clear_grads()
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        impl.backward(forward(), inputs)
        if cuda:
            torch.cuda.synchronize()
    inputs.clear_grads()
    totals: dict[str, float] = defaultdict(float)
    if cuda:
        for event in prof.events():
            if event.device_type == torch.autograd.DeviceType.CUDA:
                totals[category(event.name)] += event.time_range.elapsed_us() / 1e3
    else:
        for op in prof.key_averages():
            totals["GEMM" if op.key in _CPU_GEMMS else OTHER] += op.self_cpu_time_total / 1e3
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))
