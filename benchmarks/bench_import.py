"""Import cost of fastdpo against torch's own: wall time and peak RSS of fresh interpreters, interleaved so that
each statement sees the same machine load, median of ``--repeats``. Writes ``results/<device>-import.{json,md}``.

    python benchmarks/bench_import.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

STATEMENTS = {
    "import torch": "import torch",
    "import fastdpo": "import fastdpo",
    "from fastdpo import linear_logps": "from fastdpo import linear_logps",
    "import fastdpo.train (trainer stack)": "import fastdpo.train",
}
PROBE = ("import resource, time; t = time.perf_counter(); {stmt}; "
         "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)")
RESULTS = Path(__file__).resolve().parent / "results"


def measure(stmt: str) -> tuple[float, float]:
    """(seconds from the first statement to the end, peak RSS MiB) of one fresh interpreter."""
    out = subprocess.run([sys.executable, "-c", PROBE.format(stmt=stmt)], capture_output=True, text=True, check=True,
                         cwd="/")
    seconds, rss = out.stdout.split()
    return float(seconds), float(rss)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device-name", default="cpu")
    args = parser.parse_args()
    runs = {name: [] for name in STATEMENTS}
    for _ in range(args.repeats):
        for name, stmt in STATEMENTS.items():
            runs[name].append(measure(stmt))
    torch_s = statistics.median(s for s, _ in runs["import torch"])
    rows = [{"statement": name, "median_s": statistics.median(s for s, _ in r),
             "peak_rss_mib": statistics.median(m for _, m in r),
             "vs_torch": statistics.median(s for s, _ in r) / torch_s} for name, r in runs.items()]
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"{args.device_name}-import"
    stem.with_suffix(".json").write_text(json.dumps({"repeats": args.repeats, "rows": rows}, indent=2) + "\n")
    lines = [f"Import cost, median of {args.repeats} fresh interpreters (`python {Path(__file__).name}`)", "",
             "| statement | median s | × import torch | peak RSS MiB |", "|---|---|---|---|"]
    lines += [f"| `{r['statement']}` | {r['median_s']:.2f} | {r['vs_torch']:.2f} | {r['peak_rss_mib']:.0f} |"
              for r in rows]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
