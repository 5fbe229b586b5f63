"""The roofline model (``benchlib/roofline.py``) against FLOP counted from the code it models.

Two counts, because two kinds of product run:

* ATen GEMMs (``torch.mm`` / ``torch.addmm`` into the chunk buffers: the chunked and torch designs): counted by
  ``torch.utils.flop_counter.FlopCounterMode`` while fastdpo's chunked code runs forward + backward on the CPU.
* Triton ``tl.dot`` (the fused design): invisible to FlopCounterMode; counted here from the kernels' launch grids
  and loops (programs × loop trips × 2·BLOCK_N·BLOCK_V·BLOCK_D per dot, with the tiles of
  ``fastdpo.kernels.launch``), which must equal 10·N·H·V up to the padding of partial tiles.
"""

import math

import pytest
import torch
from benchlib.roofline import predict
from torch.utils.flop_counter import FlopCounterMode

import fastdpo
from fastdpo.kernels.launch import default_config

N, H, V = 96, 64, 1000
LLAMA = dict(n=8192, h=4096, v=128256)


def _gemm_flop(p) -> float:
    return sum(s.flop for s in p.stages if ".gemm" in s.name)


# 4·96·256 bytes: 4 vocabulary chunks of 256 rows (the last 232), all tokens; 4·48·128 + the fp32 dW chunk:
# 8 chunks of 128 rows and 2 token tiles of 48.
@pytest.mark.parametrize("scratch", [4 * N * 256, 4 * 48 * 128 + 4 * 128 * H])
@pytest.mark.parametrize("frozen", [False, True], ids=["trained", "frozen"])
def test_chunked_gemm_flop_equal_flop_counter(monkeypatch, scratch, frozen):
    from fastdpo.ops import chunked

    monkeypatch.setitem(chunked.SCRATCH_BYTES, "cpu", scratch)
    monkeypatch.setattr(chunked, "MIN_CHUNK", 128)     # several chunks at this small V
    # the model takes the code's chunks (chunk_plan): a count that matched with one chunk would prove less
    plan = chunked.chunk_plan(N, V, H, scratch)
    assert math.ceil(V / plan.v_chunk) > 1
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, H, generator=gen, requires_grad=True)
    weight = torch.randn(V, H, generator=gen).requires_grad_(not frozen)
    labels = torch.randint(0, V, (N,), generator=gen)
    with FlopCounterMode(display=False) as counter:
        logps = fastdpo.linear_logps(hidden, weight, labels, backend="torch")
        logps.backward(torch.randn(N, generator=gen))
    assert (weight.grad is None) == frozen
    p = predict("chunked", N, H, V, frozen=frozen, dtype_bytes=4, scratch_bytes=scratch)
    assert counter.get_total_flops() == _gemm_flop(p), counter.get_flop_counts()
    assert _gemm_flop(p) == (6 if frozen else 8) * N * H * V


def _triton_dot_flop(n, h, v, frozen, dtype_cls, arch=90, scratch=64 << 20) -> dict[str, int]:
    """tl.dot FLOP per kernel from the launch grids of fastdpo/kernels (a padded tile counts in full)."""
    dot = lambda c: 2 * c.block_n * c.block_v * c.block_d
    d_steps = lambda c: math.ceil(h / c.block_d)        # project_tile and each product loop over BLOCK_D slices
    f = default_config("forward", dtype_cls, arch)
    # _lse_forward_kernel: grid (token tiles, splits); the splits' vocabulary ranges are whole BLOCK_V tiles but
    # the last, so together they hold cdiv(V, BLOCK_V) tiles, one projection each
    out = {"fwd.kernel": math.ceil(n / f.block_n) * math.ceil(v / f.block_v) * d_steps(f) * dot(f)}
    c = default_config("backward_dh", dtype_cls, arch)
    # _dh_kernel: grid (token tiles,); each program sweeps every vocabulary tile: recompute + dz·W
    out["bwd.dh"] = math.ceil(n / c.block_n) * math.ceil(v / c.block_v) * 2 * d_steps(c) * dot(c)
    if not frozen:
        c = default_config("backward_dw", dtype_cls, arch)
        # _dw_kernel: one launch per weight chunk (linear_backward's fp32 chunk of scratch bytes for a 16-bit
        # weight), grid (vocabulary tiles of the chunk,); each program sweeps every token tile: recompute + dzᵀ·h
        chunk = v if dtype_cls == "fp32" else max(c.block_v, scratch // (4 * h) // c.block_v * c.block_v)
        out["bwd.dw"] = sum(math.ceil(min(chunk, v - v0) / c.block_v) for v0 in range(0, v, chunk)) \
            * math.ceil(n / c.block_n) * 2 * d_steps(c) * dot(c)
    return out


@pytest.mark.parametrize("frozen", [False, True], ids=["trained", "frozen"])
@pytest.mark.parametrize("dtype_cls", ["16bit", "fp32"])
@pytest.mark.parametrize("shape", [LLAMA, dict(n=1000, h=100, v=5000)], ids=["llama-8192", "odd"])
def test_fused_dot_flop_from_launch_grid(frozen, dtype_cls, shape):
    n, h, v = shape.values()
    grid = _triton_dot_flop(n, h, v, frozen, dtype_cls)
    exact = (6 if frozen else 10) * n * h * v
    total = sum(grid.values())
    if shape is LLAMA:      # every dimension a multiple of every tile: no padding
        assert total == exact
    else:                   # padding only: at most one partial tile (≤ 128) per dimension
        assert exact < total <= (6 if frozen else 10) * (n + 128) * (h + 128) * (v + 128)
    p = predict("fused", n, h, v, frozen=frozen, dtype_bytes=2 if dtype_cls == "16bit" else 4)
    assert {s.name: s.flop for s in p.stages if s.name in grid} == grid


@pytest.mark.parametrize("frozen", [False, True], ids=["trained", "frozen"])
def test_chunked_within_15_percent_of_floor(frozen):
    """Issue 19's bar for the default CUDA design: Llama-3-8B head, bf16, N 8192, H200."""
    p = predict("chunked", **LLAMA, frozen=frozen, device="H200")
    floor = predict("gemm-floor", **LLAMA, frozen=frozen, device="H200")
    assert sum(s.flop for s in floor.stages) == (6 if frozen else 8) * math.prod(LLAMA.values())
    assert p.floor_ms == floor.total_ms
    assert p.ratio <= 1.15, [(s.name, round(s.ms, 2)) for s in p.stages]
