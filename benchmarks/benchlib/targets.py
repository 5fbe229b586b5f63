"""The issue's performance targets, checked against measured rows and printed as pass/fail lines."""

from __future__ import annotations

from .problems import Problem, target_problem
from .report import MiB, measured

LIGER_CUTE_MS = 50.4    # Liger's CuTe per-token kernel at the GPU target shape, as quoted in the issue


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


def gpu_lines(rows: list[dict], device_name: str) -> list[str]:
    shape = target_problem("cuda")
    where = "GPU (H100) N=8192 H=4096 V=128256 bf16"
    goals = ["fwd+bwd ≤ 40 ms", "extra memory ≤ 64 MiB beyond the gradients",
             f"≥ 1.2× faster than Liger's CuTe per-token kernel ({LIGER_CUTE_MS} ms quoted)",
             "≥ 1.3× faster than TRL's fused LM head (trl-chunked)",
             "≥ 1.3× faster than Liger's fused linear DPO (liger-dpo against fastdpo-dpo, the same loss)"]
    fast = _find(rows, "fastdpo", shape)
    if fast is None:
        why = "no GPU" if not any(r["device"] == "cuda" for r in rows) else "fastdpo not measured at this shape"
        return [f"not run ({why}): {where}: {goal}" for goal in goals]
    where = f"{where} on {device_name}"
    ms = fast["time_s"] * 1e3
    lines = [
        _line(ms <= 40, f"{where}: fastdpo fwd+bwd {ms:.1f} ms ({goals[0]})"),
        _line(fast["beyond_grads_bytes"] <= 64 * MiB,
              f"{where}: fastdpo {fast['beyond_grads_bytes'] / MiB:.0f} MiB beyond the gradients ({goals[1]})"),
        _line(LIGER_CUTE_MS / ms >= 1.2, f"{where}: {LIGER_CUTE_MS / ms:.2f}× ({goals[2]})"),
    ]
    for peer, ours, goal in (("trl-chunked", fast, goals[3]),
                             ("liger-dpo", _find(rows, "fastdpo-dpo", shape), goals[4])):
        theirs = _find(rows, peer, shape)
        if theirs is None or ours is None:
            lines.append(f"not run ({peer} or fastdpo not measured): {where}: {goal}")
        else:
            speedup = theirs["time_s"] / ours["time_s"]
            lines.append(_line(speedup >= 1.3, f"{where}: {speedup:.2f}× ({goal})"))
    return lines
