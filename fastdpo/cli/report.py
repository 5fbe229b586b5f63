"""The end-of-run summary of the train commands: first → last of the train and eval metrics, as a short table, with
a binomial 95% interval for the eval accuracies."""

from __future__ import annotations

import math

#: the metrics of the tables, in their order (TRL's names; evaluation adds the ``eval_`` prefix)
METRICS = ("loss", "rewards/margins", "rewards/accuracies")
SFT_METRICS = ("loss", "mean_token_accuracy")
KTO_METRICS = ("loss", "rewards/margins", "kl")


def wilson_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval (95% for z = 1.96) of a binomial proportion ``successes / n``.

    Raises:
        ValueError: ``n < 1`` or ``successes`` outside [0, n].
    """
    if n < 1 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n and n >= 1, got {successes} of {n}")
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def _value(key: str, value: float, eval_pairs: int | None) -> str:
    if not key.endswith("accuracies"):
        return f"{value:+.4f}" if "rewards" in key else f"{value:.4f}"
    if key.startswith("eval_") and eval_pairs:
        low, high = wilson_interval(round(value * eval_pairs), eval_pairs)
        return f"{value:.3f} [{low:.2f}, {high:.2f}]"
    return f"{value:.3f}"


def first_last_table(history: list[dict], eval_pairs: int | None = None, metrics: tuple[str, ...] = METRICS) -> str:
    """Rows ``split metric  first  →  last  (steps)`` for the logged train and eval ``metrics`` of ``history``
    (``trainer.state.log_history``); eval pair accuracies with their Wilson 95% interval over ``eval_pairs`` pairs.
    Empty when nothing was logged."""
    rows = []
    for prefix, split in (("", "train"), ("eval_", "eval")):
        for metric in metrics:
            points = [(e["step"], e[prefix + metric]) for e in history if prefix + metric in e and "step" in e]
            if points:
                (s0, v0), (s1, v1) = points[0], points[-1]
                rows.append((f"{split} {metric}", _value(prefix + metric, v0, eval_pairs),
                             _value(prefix + metric, v1, eval_pairs), f"step {s0} → {s1}"))
    if not rows:
        return ""
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [f"  {name:<{widths[0]}}  {first:>{widths[1]}}  →  {last:<{widths[2]}}  ({steps})"
             for name, first, last, steps in rows]
    if eval_pairs and any(r[0] == "eval rewards/accuracies" for r in rows):
        lines.append(f"  (eval over {eval_pairs} pairs; [..] = binomial 95% interval, Wilson)")
    return "\n".join(["first → last:", *lines])


def finished(wall_time_s: float, peak_rss_mib: float, output_dir: str, table: str,
             estimated_peak_mib: float | None = None) -> str:
    """The last lines a train command prints: wall time, peak RSS (and the estimate made at start), where the run
    was saved, then the first → last table."""
    estimate = f" (estimated {estimated_peak_mib / 1024:.1f} GiB)" if estimated_peak_mib is not None else ""
    return (f"[fastdpo] done in {duration(wall_time_s)}; peak RSS {peak_rss_mib / 1024:.1f} GiB{estimate}; saved to "
            f"{output_dir}" + (f"\n{table}" if table else ""))


def duration(seconds: float) -> str:
    """``1 h 02 min``, ``12 min 03 s`` or ``42 s``."""
    minutes, s = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {s:02d} s" if minutes else f"{s} s"
