"""Scaling plots: fwd+bwd time and extra memory beyond the gradients against N or V (PNG)."""

from __future__ import annotations

from pathlib import Path

from .report import MiB, measured

AXES = {"n": ("N (tokens)", "H={h}, V={v}"), "v": ("V (vocabulary)", "N={n}, H={h}")}


def _short(x: int) -> str:
    return f"{x / 1000:g}k" if x >= 1000 else str(x)


def scaling_plot(rows: list[dict], axis: str, path: Path, title: str) -> None:
    """Two panels, log-log: time and memory beyond the gradients, one line per implementation; the
    gradients' own size (d hidden + d weight) dashed for scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(measured(rows), key=lambda r: r[axis])
    if not rows:
        return
    xlabel, fixed = AXES[axis]
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    for impl in dict.fromkeys(r["impl"] for r in rows):
        mine = [r for r in rows if r["impl"] == impl]
        xs = [r[axis] for r in mine]
        ax_t.plot(xs, [r["time_s"] * 1e3 for r in mine], "o-", label=impl)
        # a step whose peak is below its gradients (some are freed or reused) plots at 1 MiB
        ax_m.plot(xs, [max(r["beyond_grads_bytes"] / MiB, 1) for r in mine], "o-", label=impl)
    grads = {r[axis]: r["grad_bytes"] / MiB for r in rows}
    ax_m.plot(list(grads), list(grads.values()), "k--", lw=1, label="gradients (dH + dW)")
    ticks = sorted({r[axis] for r in rows})
    for ax, ylabel in ((ax_t, "fwd+bwd time (ms)"), (ax_m, "extra peak memory beyond gradients (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [_short(x) for x in ticks])
        ax.minorticks_off()
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    ax_m.legend(fontsize=8)
    r0 = rows[0]
    fig.suptitle(f"{title}: {fixed.format(**r0)}, {r0['dtype']}, {r0['device']}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
