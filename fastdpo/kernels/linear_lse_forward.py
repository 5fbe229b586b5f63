"""Forward stage of the fused linear log-probs: online logsumexp over vocabulary tiles.

Each program owns ``BLOCK_N`` tokens and one split of the vocabulary, sweeps its vocabulary tiles
(``z = h @ W_tile.T``, transform, running max and rescaled sum) and writes per-split partials that
``linear_forward`` merges. Optional statistics ride the same sweep. No [N, V] tensor is written.
"""

import torch
import triton
import triton.language as tl
import triton.testing

from .indexed_dot import indexed_dot
from .launch import dot_precision, interpreting, tile_config, transform_args, upcast_dot
from .tiles import fold_lse, logit_tile


@triton.jit
def _lse_forward_kernel(
    H, W, B, Labels,
    Lse, ExpLogit, Lse2z, SumLogit, MaxOther,
    N, V, D, v_per_split,
    stride_hn, stride_hd, stride_wv, stride_wd,
    logit_scale, softcap, inv_temperature,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    EXP_LOGIT: tl.constexpr, LSE_2Z: tl.constexpr, SUM_LOGIT: tl.constexpr, MAX_OTHER: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = offs_n < N
    v_begin = split * v_per_split
    v_end = tl.minimum(v_begin + v_per_split, V)
    labels = tl.load(Labels + offs_n, mask=row_ok, other=-1)

    m = tl.full([BLOCK_N], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_N], tl.float32)
    sum_ez = tl.zeros([BLOCK_N], tl.float32)      # sum exp(z - m) * z
    sum_e2 = tl.zeros([BLOCK_N], tl.float32)      # sum exp(2 (z - m))
    sum_z = tl.zeros([BLOCK_N], tl.float32)
    max_other = tl.full([BLOCK_N], float("-inf"), tl.float32)

    for v0 in range(v_begin, v_end, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        col_ok = offs_v < v_end
        z = logit_tile(H, W, B, offs_n, offs_v, row_ok, col_ok, D, stride_hn, stride_hd, stride_wv, stride_wd,
                       logit_scale, softcap, inv_temperature, HAS_BIAS, HAS_SOFTCAP,
                       BLOCK_N, BLOCK_V, BLOCK_D, DOT_PRECISION, UPCAST)
        m, s, sum_ez, sum_e2, sum_z, max_other = fold_lse(
            z, col_ok[None, :], offs_v[None, :] == labels[:, None], m, s, sum_ez, sum_e2, sum_z, max_other,
            EXP_LOGIT, LSE_2Z, SUM_LOGIT, MAX_OTHER)

    out = split * N + offs_n
    tl.store(Lse + out, m + tl.log(s), mask=row_ok)
    if EXP_LOGIT:
        tl.store(ExpLogit + out, sum_ez / s, mask=row_ok)
    if LSE_2Z:
        tl.store(Lse2z + out, tl.log(sum_e2) + 2.0 * m, mask=row_ok)
    if SUM_LOGIT:
        tl.store(SumLogit + out, sum_z, mask=row_ok)
    if MAX_OTHER:
        tl.store(MaxOther + out, max_other, mask=row_ok)


def _num_splits(n: int, v: int, block_n: int, block_v: int) -> int:
    """Split the vocabulary when there are too few token tiles to fill the device."""
    if interpreting() or not torch.cuda.is_available():
        return 1
    token_tiles = triton.cdiv(n, block_n)
    target = 2 * torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    max_splits = max(1, triton.cdiv(v, 8 * block_v))   # keep >= 8 vocab tiles per split
    return max(1, min(max_splits, triton.cdiv(target, token_tiles)))


def _launch(cfg, hidden, weight, bias, labels, transform, primitives, num_splits):
    """Per-split partials {"lse", primitive: [splits, N] fp32} of one launch with ``cfg``."""
    n, d = hidden.shape
    v = weight.shape[0]
    splits = num_splits or _num_splits(n, v, cfg.block_n, cfg.block_v)
    v_per_split = triton.cdiv(triton.cdiv(v, splits), cfg.block_v) * cfg.block_v
    splits = triton.cdiv(v, v_per_split)
    parts = {name: torch.empty(splits, n, device=hidden.device, dtype=torch.float32)
             for name in ("lse", *primitives)}
    dummy = parts["lse"]
    scale, softcap, inv_t, has_softcap = transform_args(transform)
    _lse_forward_kernel[(triton.cdiv(n, cfg.block_n), splits)](
        hidden, weight, bias if bias is not None else dummy, labels,
        parts["lse"], parts.get("expected_logit", dummy), parts.get("lse_2z", dummy),
        parts.get("sum_logit", dummy), parts.get("max_other", dummy),
        n, v, d, v_per_split,
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
        scale, softcap, inv_t,
        HAS_BIAS=bias is not None, HAS_SOFTCAP=has_softcap,
        EXP_LOGIT="expected_logit" in primitives, LSE_2Z="lse_2z" in primitives,
        SUM_LOGIT="sum_logit" in primitives, MAX_OTHER="max_other" in primitives,
        DOT_PRECISION=dot_precision(hidden.dtype), UPCAST=upcast_dot(hidden.dtype),
        BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return parts


def linear_forward(hidden, weight, bias, labels, transform, primitives, deterministic=False, num_splits=None):
    """Label logit, logsumexp and the requested statistic primitives of ``transform(hidden @ weight.T + bias)``.

    Args:
        hidden: [N, D] fp32/bf16/fp16, rows all carrying a valid label. weight: [V, D], same dtype.
        bias: [V] or None. labels: [N] int64 in [0, V). transform: a ``LogitTransform``.
        primitives: subset of {"expected_logit", "lse_2z", "sum_logit", "max_other"}.
        deterministic: never autotune the launch config (``fastdpo.kernels.launch``).
        num_splits: vocabulary splits (None picks from the device's size).
    Returns:
        (label_logit [N] fp32, lse [N] fp32, {primitive: [N] fp32}).
    """
    args = (hidden, weight, bias, labels, transform, primitives, num_splits)
    bench = lambda cfg: triton.testing.do_bench(lambda: _launch(cfg, *args), warmup=5, rep=20)
    cfg = tile_config("forward", hidden.dtype, *hidden.shape, bench=bench, deterministic=deterministic)
    parts = _launch(cfg, *args)
    lse_parts = parts.pop("lse")
    lse = torch.logsumexp(lse_parts, 0)
    merged = {}
    if "expected_logit" in parts:      # each split's E[z] weighted by its share of the mass
        merged["expected_logit"] = (parts["expected_logit"] * torch.exp(lse_parts - lse)).sum(0)
    if "lse_2z" in parts:
        merged["lse_2z"] = torch.logsumexp(parts["lse_2z"], 0)
    if "sum_logit" in parts:
        merged["sum_logit"] = parts["sum_logit"].sum(0)
    if "max_other" in parts:
        merged["max_other"] = parts["max_other"].amax(0)
    return indexed_dot(hidden, weight, bias, labels, transform), lse, merged
