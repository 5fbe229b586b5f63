"""Forward and backward time and extra peak memory of ``linear_logps`` against the eager reference
(and, with ``--impls``, any implementation of ``benchlib.impls``).

The eager reference is TRL's legacy path: materialised fp32 logits -> log_softmax -> gather.
Extra peak memory is measured above the memory held before the timed steps, gradients included:
  * CUDA: ``torch.cuda.max_memory_allocated``;
  * CPU: peak RSS (``VmHWM``, reset per point) in a worker process (``--isolate``: a fresh process
    per point).
Time is the median of ``--repeats`` timed steps after a warm-up step that also checks the output and
both gradients against float64 (see ``benchlib``). ``run_suite.py`` runs the whole matrix.

    python benchmarks/bench_linear_logps.py                      # CPU: the issue's shape + SmolLM2's
    python benchmarks/bench_linear_logps.py --shape 8192,4096,128256 --dtype bfloat16   # GPU, Llama-3
    python benchmarks/bench_linear_logps.py --out benchmarks/results/cpu-linear-logps   # also .json + .md
"""

from __future__ import annotations

import argparse
from pathlib import Path

from benchlib.env import default_device, header, metadata
from benchlib.impls import IMPLS
from benchlib.problems import Problem
from benchlib.report import kernel_table, legend, skipped_list, write
from benchlib.runner import Planner, run_matrix

DEFAULT_SHAPES = ("4096,256,32000", "4096,576,49152")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", action="append", help="N,H,V (repeatable)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--device", default=default_device(), choices=["cpu", "cuda"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--impls", default="eager,fastdpo", help=f"comma-separated, from {', '.join(IMPLS)}")
    p.add_argument("--isolate", action="store_true", help="a fresh process per point")
    p.add_argument("--max-point-s", type=float, default=600, help="skip points estimated to take longer")
    p.add_argument("--out", help="path prefix for the .json and .md results")
    args = p.parse_args()
    dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    problems = [Problem(*(int(x) for x in shape.split(",")), dtype, args.device)
                for shape in args.shape or DEFAULT_SHAPES]
    names = args.impls.split(",")
    planner = Planner(args.device, args.repeats, args.max_point_s, max_memory_gib=20)
    rows = run_matrix(problems, names, planner, isolate=args.isolate)
    meta = metadata(args.device)
    md = "\n\n".join(filter(None, [header(meta), kernel_table(rows), skipped_list(rows), legend(names)]))
    print(md)
    if args.out:
        write(Path(args.out), {"meta": meta, "rows": rows}, md)


if __name__ == "__main__":
    main()
