"""The issues' performance targets, checked against measured rows and printed as pass/fail lines."""

from __future__ import annotations

from .problems import Problem, target_problem
from .report import MiB, measured

PEERS = ("eager", "trl-chunked", "liger-flce", "liger-per-token", "cce")


def _find(rows: list[dict], impl: str, p: Problem) -> dict | None:
    key = (impl, p.n, p.h, p.v, p.dtype, p.device)
    return next((r for r in measured(rows) if (r["impl"], r["n"], r["h"], r["v"], r["dtype"], r["device"]) == key),
                None)


def _line(ok: bool, text: str) -> str:
    return f"{'PASS' if ok else 'FAIL'}: {text}"


def cpu_lines(rows: list[dict]) -> list[str]:
    shape = target_problem("cpu")
    where = "CPU N=4096 H=256 V=32000 fp32"
    fast, eager = _find(rows, "fastdpo", shape), _find(rows, "eager", shape)
    if not (fast and eager):
        return [f"not run: {where} (fastdpo and eager were not both measured at this shape)"]
    mem = fast["extra_peak_bytes"] / eager["extra_peak_bytes"]
    time = fast["time_s"] / eager["time_s"]
    return [
        _line(mem <= 0.10, f"{where}: fastdpo extra memory {fast['extra_peak_bytes'] / MiB:.0f} MiB = "
                           f"{mem:.3f}× eager's {eager['extra_peak_bytes'] / MiB:.0f} MiB (target ≤ 0.10×)"),
        _line(time <= 1.0, f"{where}: fastdpo fwd+bwd {fast['time_s'] * 1e3:.0f} ms = {time:.2f}× eager's "
                           f"{eager['time_s'] * 1e3:.0f} ms (target ≤ 1.0×)"),
    ]


def gpu_lines(rows: list[dict], shape: Problem | None = None) -> list[str]:
    """Issue 22's kernel targets (default shape: the Llama-3-8B head, N 8192, bf16, on CUDA): fastdpo within 1.15× of
    the GEMM floor measured in the same run (frozen head: of its 6·N·H·V floor), at most 64 MiB of scratch and one
    fp32 [N, H] accumulator beyond the gradients, faster than every peer measured."""
    shape = shape or target_problem("cuda")
    where = f"{shape.model} N={shape.n} H={shape.h} V={shape.v} {shape.dtype} on {shape.device}"
    row = lambda impl: _find(rows, impl, shape)
    fast = row("fastdpo")
    if fast is None:
        return [f"not run: {where} (fastdpo not measured at this shape)"]
    lines = []
    for impl, floor_name in (("fastdpo", "gemm-floor"), ("fastdpo-frozen", "gemm-floor-frozen")):
        ours, floor = row(impl), row(floor_name)
        if ours and floor:
            ratio = ours["time_s"] / floor["time_s"]
            lines.append(_line(ratio <= 1.15, f"{where}: {impl} {ours['time_s'] * 1e3:.1f} ms = {ratio:.2f}× "
                                              f"{floor_name}'s {floor['time_s'] * 1e3:.1f} ms (target ≤ 1.15×)"))
    allowed = 64 * MiB + 4 * shape.n * shape.h
    lines.append(_line(fast["beyond_grads_bytes"] <= allowed,
                       f"{where}: fastdpo {fast['beyond_grads_bytes'] / MiB:.0f} MiB beyond the gradients (target ≤ "
                       f"{allowed / MiB:.0f} MiB: 64 MiB + one fp32 [N, H])"))
    for peer in PEERS:
        theirs = row(peer)
        if theirs:
            speedup = theirs["time_s"] / fast["time_s"]
            lines.append(_line(speedup > 1, f"{where}: fastdpo {speedup:.2f}× faster than {peer} "
                                            f"({theirs['time_s'] * 1e3:.1f} ms; target > 1×)"))
    return lines
