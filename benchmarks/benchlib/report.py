"""Markdown tables of kernel results, and writing a result set (.json + .md)."""

from __future__ import annotations

import json
from pathlib import Path

from .impls import EAGER, FLOOR, IMPLS

MiB = 1 << 20
PROBLEM_KEYS = ("model", "n", "h", "v", "dtype", "device")


def problem_key(row: dict) -> tuple:
    return tuple(row[k] for k in PROBLEM_KEYS)


def measured(rows: list[dict]) -> list[dict]:
    return [r for r in rows if "skipped" not in r]


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a and b else "–"


def errors(row: dict) -> str:
    """out / dH / dW relative errors; "–" where not checked (a floor; dW of a frozen head)."""
    err = row["rel_err"]
    return " / ".join(f"{err[k]:.1e}" if k in err else "–" for k in ("output", "d_hidden", "d_weight")) if err else "–"


def kernel_table(rows: list[dict]) -> str:
    """One line per measured (problem, implementation); ratios against eager and the GEMM floor of
    the same problem and run."""
    lines = [
        "| model | N | H | V | dtype | impl | fwd ms | bwd ms | fwd+bwd ms | TFLOP/s | of floor | × eager time "
        "| extra MiB | beyond grads MiB | × eager memory | rel. err out / dH / dW |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    by_key = {(problem_key(r), r["impl"]): r for r in measured(rows)}
    for r in measured(rows):
        eager = by_key.get((problem_key(r), EAGER), {})
        floor = by_key.get((problem_key(r), FLOOR), {})
        lines.append(
            f"| {r['model']} | {r['n']} | {r['h']} | {r['v']} | {r['dtype']} | {r['impl']} | "
            f"{r['fwd_s'] * 1e3:.1f} | {r['bwd_s'] * 1e3:.1f} | {r['time_s'] * 1e3:.1f} | {r['tflops']:.3f} | "
            f"{_ratio(floor.get('time_s'), r['time_s'])} | {_ratio(r['time_s'], eager.get('time_s'))} | "
            f"{r['extra_peak_bytes'] / MiB:.1f} | {r['beyond_grads_bytes'] / MiB:.1f} | "
            f"{_ratio(r['extra_peak_bytes'], eager.get('extra_peak_bytes'))} | {errors(r)} |"
        )
    return "\n".join(lines)


def skipped_list(rows: list[dict]) -> str:
    """Skipped points: one line per reason and set of implementations, naming the problems."""
    by_problem: dict[str, dict[str, list[str]]] = {}
    for r in rows:
        if "skipped" in r:
            where = f"{r['model']} N={r['n']} H={r['h']} V={r['v']} {r['dtype']}"
            by_problem.setdefault(where, {}).setdefault(r["skipped"], []).append(r["impl"])
    groups: dict[tuple, list[str]] = {}
    for where, reasons in by_problem.items():
        for reason, impls in reasons.items():
            groups.setdefault((reason, tuple(impls)), []).append(where)
    return "\n".join(f"- {', '.join(impls)} at {'; '.join(where)}: {reason}"
                     for (reason, impls), where in groups.items())


def legend(names) -> str:
    """What each implementation's timed step is."""
    return "\n".join(f"- **{name}**: {IMPLS[name].what}" for name in names)


def write(prefix: Path, data: dict, markdown: str) -> None:
    prefix.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{prefix}.json").write_text(json.dumps(data, indent=2) + "\n")
    Path(f"{prefix}.md").write_text(markdown.rstrip() + "\n")
