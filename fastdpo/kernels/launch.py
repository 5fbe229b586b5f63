"""Launch parameters of the fused kernels: tile shapes per kernel, dtype and size bucket, an optional autotune, and
where they run at all.

Every config listed here is compiled ahead of time for sm_80, sm_90 and sm_100 by ``fastdpo.kernels.aot`` (CI test
``tests/kernels/test_aot.py``; ``benchmarks/gpu_replica.sh`` under the GPU machine's Triton 3.6): none spills
registers under Triton 3.6 or 3.9 and each fits the target's shared memory. ``DEFAULTS`` is
what a launch uses; with ``FASTDPO_AUTOTUNE=1`` on a GPU the first forward launch of a (dtype, size bucket) times
the ``CANDIDATES`` once and keeps the fastest for the process (the backward kernels keep their defaults: a trial
launch would have to write throwaway gradient buffers as large as the real ones). Deterministic runs never
autotune: a different vocabulary tile changes the reduction order. Under ``TRITON_INTERPRET=1`` small tiles
keep the interpreter fast.
"""

import os
from dataclasses import dataclass

import torch


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclass(frozen=True)
class TileConfig:
    block_n: int
    block_v: int
    block_d: int
    num_warps: int
    num_stages: int


INTERPRETER = TileConfig(block_n=16, block_v=64, block_d=32, num_warps=1, num_stages=1)

#: (kernel, "fp32" | "16bit") -> the default config; each passes the spill check on sm_80, sm_90 and sm_100.
#: (fp32 forward: BLOCK_D 16, as 32 spills 16-24 stack bytes on sm_80 under Triton 3.6 or, one stage, sm_100 under 3.9.)
DEFAULTS = {
    ("forward", "fp32"): TileConfig(32, 64, 16, 4, 2),
    ("forward", "16bit"): TileConfig(128, 64, 64, 8, 3),
    ("backward_dh", "fp32"): TileConfig(64, 64, 32, 8, 2),
    ("backward_dh", "16bit"): TileConfig(64, 64, 64, 8, 3),
    ("backward_dw", "fp32"): TileConfig(64, 64, 32, 8, 2),
    ("backward_dw", "16bit"): TileConfig(64, 64, 64, 8, 3),
}
#: sm_90 only (wgmma keeps the accumulators out of the register file): a 128-token tile halves the d weight kernel's
#: fp32 slice traffic. It spills on sm_80 and sm_100; the d hidden kernel's 128-row vocabulary tile spills on sm_90
#: under Triton 3.6 (80 stack bytes).
SM90 = {("backward_dw", "16bit"): TileConfig(128, 64, 64, 8, 3)}
#: The forward's autotune space (the default first), pruned to configs without spills; compiled by the AOT check.
CANDIDATES = {
    ("forward", "16bit"): (DEFAULTS[("forward", "16bit")], TileConfig(64, 128, 64, 8, 3)),
}
_tuned: dict[tuple, TileConfig] = {}


def dtype_class(dtype: torch.dtype) -> str:
    return "fp32" if dtype == torch.float32 else "16bit"


def size_bucket(n: int, d: int) -> tuple[int, int]:
    """Powers of two of tokens (capped at 8192) and hidden size: configs are tuned per bucket, not per shape."""
    return min(1 << max(n - 1, 0).bit_length(), 8192), 1 << max(d - 1, 0).bit_length()


def default_config(kernel: str, dtype_cls: str, arch: int) -> TileConfig:
    """The default config of ``kernel`` for a dtype class on an sm_``arch`` target (80, 90, 100, ...)."""
    key = (kernel, dtype_cls)
    return SM90.get(key, DEFAULTS[key]) if arch == 90 else DEFAULTS[key]


def fused_unsupported(arch: int) -> str | None:
    """Why the fused kernels (``linear_forward``/``linear_backward``) must not launch on sm_``arch`` with the installed
    Triton, or None. Triton 3.6 rejects the filtering backward for sm_100 (``PassManager::run failed`` in
    ``TritonNvidiaGPUOptimizeTMemLayoutsPass``) and spills its fp32 variants there; 3.9 compiles them all cleanly
    (``benchmarks/results/kernels-aot.md``). The versions between are untested, so they are refused too."""
    import triton

    if arch >= 100 and tuple(int(x) for x in triton.__version__.split(".")[:2]) < (3, 9):
        return f"Triton {triton.__version__} miscompiles the fused kernels for sm_{arch} (3.9 or newer does not)"
    return None


def tile_config(kernel: str, dtype: torch.dtype, n: int = 0, d: int = 0, bench=None,
                deterministic: bool = False) -> TileConfig:
    """The launch config of ``kernel`` for ``dtype`` at [n, d] on the current CUDA device; ``bench(cfg) -> seconds``
    enables the autotune."""
    if interpreting():
        return INTERPRETER
    key = (kernel, dtype_class(dtype))
    if (key not in CANDIDATES or bench is None or deterministic or os.environ.get("FASTDPO_AUTOTUNE") != "1"
            or torch.are_deterministic_algorithms_enabled()):
        major, minor = torch.cuda.get_device_capability()
        return default_config(kernel, key[1], 10 * major + minor)
    bucket = (*key, *size_bucket(n, d))
    if bucket not in _tuned:
        _tuned[bucket] = min(CANDIDATES[key], key=bench)
    return _tuned[bucket]


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 products follow torch's TF32 switch, as ``torch.matmul`` does on the same tensors."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 and not interpreting():
        return "tf32"
    return "ieee"


def upcast_dot(dtype: torch.dtype) -> bool:
    """The interpreter's ``tl.dot`` is wrong on bf16 operands (fp32/fp16 are right): upcast there."""
    return interpreting() and dtype == torch.bfloat16


def transform_args(transform) -> tuple[float, float, float, bool]:
    """Kernel scalars of a ``fastdpo.ops.transform.LogitTransform``."""
    has_softcap = transform.softcap is not None
    return (
        float(transform.logit_scale),
        float(transform.softcap) if has_softcap else 1.0,
        float(transform.inv_temperature),
        has_softcap,
    )
