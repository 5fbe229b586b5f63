"""Launch parameters of the kernels: tile shapes per kernel, dtype and size bucket, and an optional autotune.

Every config listed here is compiled ahead of time for sm_80 and sm_90 by ``fastdpo.kernels.aot`` (CI test
``tests/kernels/test_aot.py``): none spills registers and each fits the target's shared memory. ``DEFAULTS`` is
what a launch uses; with ``FASTDPO_AUTOTUNE=1`` on a GPU the first launch of a (kernel, dtype, size bucket) times
the ``CANDIDATES`` once and keeps the fastest for the process. Deterministic runs never autotune: a different
vocabulary tile changes the reduction order. Under ``TRITON_INTERPRET=1`` small tiles keep the interpreter fast.
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


KERNELS = ("forward", "backward_dh", "backward_dw")
INTERPRETER = TileConfig(block_n=16, block_v=64, block_d=32, num_warps=1, num_stages=1)
_WIDE = TileConfig(128, 128, 64, 8, 2)

#: (kernel, "fp32" | "16bit") -> the default config; every entry passes the spill check.
DEFAULTS = {
    ("forward", "fp32"): TileConfig(64, 64, 32, 4, 2),
    ("forward", "16bit"): TileConfig(128, 128, 64, 8, 2),
    ("backward_dh", "fp32"): TileConfig(64, 64, 32, 4, 2),
    ("backward_dh", "16bit"): _WIDE,
    ("backward_dw", "fp32"): TileConfig(64, 64, 32, 4, 2),
    ("backward_dw", "16bit"): _WIDE,
}
#: Alternatives the autotune may pick from; also compiled by the AOT check.
_ALTERNATIVES = {
    "fp32": (TileConfig(32, 64, 32, 4, 2), TileConfig(64, 32, 32, 4, 3)),
    "16bit": (TileConfig(64, 128, 64, 4, 3), TileConfig(128, 64, 64, 4, 3)),
}
CANDIDATES = {key: (cfg, *_ALTERNATIVES[key[1]]) for key, cfg in DEFAULTS.items()}
_tuned: dict[tuple, TileConfig] = {}


def dtype_class(dtype: torch.dtype) -> str:
    return "fp32" if dtype == torch.float32 else "16bit"


def size_bucket(n: int, d: int) -> tuple[int, int]:
    """Powers of two of tokens (capped at 8192) and hidden size: configs are tuned per bucket, not per shape."""
    return min(1 << max(n - 1, 0).bit_length(), 8192), 1 << max(d - 1, 0).bit_length()


def tile_config(kernel: str, dtype: torch.dtype, n: int = 0, d: int = 0, bench=None) -> TileConfig:
    """The launch config of ``kernel`` for ``dtype`` at [n, d]; ``bench(cfg) -> seconds`` enables the autotune."""
    if interpreting():
        return INTERPRETER
    key = (kernel, dtype_class(dtype))
    if bench is None or os.environ.get("FASTDPO_AUTOTUNE") != "1" or torch.are_deterministic_algorithms_enabled():
        return DEFAULTS[key]
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
