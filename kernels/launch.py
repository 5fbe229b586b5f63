"""Launch parameters shared by the kernels' launch helpers.

The GPU block sizes are starting points, not yet tuned on hardware (the benchmark issue tunes
them); under ``TRITON_INTERPRET=1`` larger vocabulary tiles keep the interpreter's Python loop short.
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


def tile_config(dtype: torch.dtype) -> TileConfig:
    if interpreting():
        return TileConfig(block_n=16, block_v=64, block_d=32, num_warps=1, num_stages=1)
    if dtype == torch.float32:
        return TileConfig(block_n=64, block_v=64, block_d=32, num_warps=4, num_stages=2)
    return TileConfig(block_n=128, block_v=128, block_d=64, num_warps=8, num_stages=3)


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
