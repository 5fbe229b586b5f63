"""The whole benchmark suite on whatever device is present; results to ``benchmarks/results/``.

Parts (``--parts``, all by default):
  * kernels: every implementation of ``benchlib.impls`` on the model shapes of
    ``benchlib.problems.kernel_matrix`` (forward, backward, fwd+bwd time; extra peak memory;
    effective TFLOP/s and the fraction of the GEMM floor; relative errors against float64);
  * scaling: time and memory against N and against V, drawn as ``<tag>-scaling-n.png`` and
    ``<tag>-scaling-v.png``;
  * packing: packing efficiency of TRL's padded and fastdpo's packed micro-batches on the whole HH
    and UltraFeedback samples (tokenisation only);
  * dpo-step: one DPO training step, fastdpo's trainer against TRL's (``bench_dpo_step.py``).
Writes ``<tag>-suite.json`` and ``<tag>-suite.md`` (device, versions, git revision, the target
pass/fail lines, every table, and what was skipped and why).

    python benchmarks/run_suite.py          # everything; on a shared 2-core CPU kernels + scaling + packing
                                            # took 19 min, the DPO step adds 5 (more under load)
    python benchmarks/run_suite.py --parts kernels --models Llama-3-8B --n 8192 --dtypes bfloat16   # GPU subset
    python benchmarks/run_suite.py --render RESULTS/cpu-suite.json     # redo .md + plots from a run's JSON
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import bench_dpo_step
from benchlib import packing_efficiency
from benchlib.env import default_device, header, metadata
from benchlib.impls import IMPLS
from benchlib.paths import DEFAULT_MODEL, HH_DATA, RESULTS_DIR, ULTRAFEEDBACK_DATA
from benchlib.plots import scaling_plot
from benchlib.problems import MODELS, kernel_matrix, scaling_sweeps
from benchlib.report import kernel_table, legend, skipped_list, write
from benchlib.runner import Planner, run_matrix
from benchlib.targets import cpu_lines, gpu_lines

PARTS = ("kernels", "scaling", "packing", "dpo-step")
SCALING_IMPLS = ("eager", "trl-chunked", "liger-dpo", "cce", "fastdpo")
PACKING_DATA = {"HH-RLHF harmless (test)": HH_DATA, "UltraFeedback binarized (train sample)": ULTRAFEEDBACK_DATA}

FIGURES = """Per point: medians of the timed steps after a warm-up step (up to --repeats of them, fewer where the
per-point time limit allows no more; the JSON has each point's count); fwd+bwd is the median of whole steps.
TFLOP/s = 6·N·H·V / fwd+bwd time; "of floor" = the same ratio to the GEMM floor's (four plain GEMMs of
the step's sizes: forward, recompute, two gradients; timed in this run) = floor time / time. Extra memory:
peak above what was held before the timed steps (CPU: peak RSS; CUDA: max_memory_allocated), gradients
included; "beyond grads" subtracts d hidden + d weight in the input dtype. Relative error ‖x − x₆₄‖/‖x₆₄‖
of the output (per-token log-probs on 256 sampled rows, or the DPO loss), d hidden (those rows) and d weight
(the rows' labels and 2048 sampled vocabulary rows) against float64, measured with only the sampled rows scored (see
benchmarks/benchlib/reference.py). Tokens are 2·max(2, N/2048) sequences, the first half chosen, the
second rejected; logits have unit scale (random inputs)."""


def _parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=default_device(), choices=["cpu", "cuda"])
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, from {', '.join(PARTS)}")
    p.add_argument("--impls", default=",".join(IMPLS), help="kernel-level implementations (default: all)")
    p.add_argument("--models", help=f"comma-separated, from {', '.join(MODELS)} (default: per device)")
    p.add_argument("--n", help="comma-separated token counts (default: per device)")
    p.add_argument("--dtypes", help="comma-separated (default: bfloat16,float32 on CUDA, float32 on CPU)")
    p.add_argument("--repeats", type=int, help="timed steps per point (default: 10 on CUDA, 3 on CPU)")
    p.add_argument("--scaling-impls", default=",".join(SCALING_IMPLS))
    p.add_argument("--scaling-repeats", type=int, help="timed steps per scaling point (default: 5 on CUDA, 1 on CPU)")
    p.add_argument("--max-point-s", type=float,
                   help="seconds per point: skip points estimated to take longer, time fewer repeats where "
                        "they would not fit (default: 120 on CUDA, 60 on CPU)")
    p.add_argument("--max-memory-gib", type=float, default=20, help="CPU: skip points estimated to need more")
    p.add_argument("--isolate", action="store_true", help="a fresh process per point")
    p.add_argument("--dpo-step-args", default="", help="extra arguments for bench_dpo_step.py, one string")
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    p.add_argument("--tag", help="results file prefix (default: the device type)")
    p.add_argument("--render", type=Path, metavar="SUITE_JSON",
                   help="only rewrite the markdown and plots of an existing <tag>-suite.json")
    return p.parse_args(argv)


def _split(value: str | None, cast=str):
    return [cast(x) for x in value.split(",")] if value else None


def kernels(args) -> list[dict]:
    problems = kernel_matrix(args.device, _split(args.models), _split(args.n, int), _split(args.dtypes))
    planner = Planner(args.device, args.repeats, args.max_point_s, args.max_memory_gib)
    return run_matrix(problems, args.impls.split(","), planner, isolate=args.isolate)


def scaling(args) -> dict[str, list[dict]]:
    planner = Planner(args.device, args.scaling_repeats, args.max_point_s, args.max_memory_gib)
    return {axis: run_matrix(problems, args.scaling_impls.split(","), planner, isolate=args.isolate)
            for axis, problems in scaling_sweeps(args.device).items()}


def packing(args) -> list[dict]:
    return packing_efficiency.run(PACKING_DATA, str(DEFAULT_MODEL))


def dpo_step(args) -> dict:
    rows, md = bench_dpo_step.run_trainers(["--device", args.device, *args.dpo_step_args.split()])
    return {"rows": rows, "markdown": md}


def render(data: dict, prefix: Path) -> str:
    """The markdown of a result set (``data`` as written to the JSON); draws its scaling plots."""
    meta = data["meta"]
    sections = [f"# fastdpo benchmark suite: {meta['device']}", header(meta),
                "## Targets\n\n" + "\n".join(f"- {line}" for line in data["targets"])]
    if "kernels" in data:
        rows = data["kernels"]
        sections += ["## Kernel level: fused LM head + log-probs, forward and backward", FIGURES, kernel_table(rows),
                     "### Skipped\n\n" + (skipped_list(rows) or "nothing"),
                     "### What is timed\n\n" + legend(dict.fromkeys(r["impl"] for r in rows))]
    if "scaling" in data:
        sections.append("## Scaling in N and V")
        for axis, rows in data["scaling"].items():
            png = Path(f"{prefix}-scaling-{axis}.png")
            scaling_plot(rows, axis, png, f"fwd+bwd against {axis.upper()}")
            sections += [f"![scaling in {axis.upper()}]({png.name})", kernel_table(rows), skipped_list(rows)]
    if "packing" in data:
        doc = packing_efficiency.__doc__.split("\n\n", 1)[1].strip()
        sections.append(f"## Packing efficiency (whole samples, max_length 1024)\n\n{doc}\n\n"
                        + packing_efficiency.table(data["packing"]))
    if "dpo_step" in data:
        sections.append("## End to end: one DPO training step\n\n" + data["dpo_step"]["markdown"])
    not_run = [part for part in PARTS if part.replace("-", "_") not in data]
    if not_run:
        sections.append(f"Parts not run in this invocation: {', '.join(not_run)}.")
    return "\n\n".join(filter(None, sections))


def main(argv=None) -> None:
    args = _parse(argv)
    if args.render:
        data = json.loads(args.render.read_text())
        prefix = args.render.with_name(args.render.name.removesuffix("-suite.json"))
        write(Path(f"{prefix}-suite"), data, render(data, prefix))
        return
    cuda = args.device == "cuda"
    args.repeats = args.repeats or (10 if cuda else 3)
    args.scaling_repeats = args.scaling_repeats or (5 if cuda else 1)
    args.max_point_s = args.max_point_s or (120 if cuda else 60)
    parts = args.parts.split(",")
    prefix = args.out_dir / f"{args.tag or args.device}"
    data: dict = {"meta": metadata(args.device), "args": {k: str(v) for k, v in vars(args).items()}}
    t0 = time.perf_counter()
    runs = {"kernels": kernels, "scaling": scaling, "packing": packing, "dpo-step": dpo_step}
    for part in PARTS:
        if part in parts:
            print(f"{part}:", flush=True)
            data[part.replace("-", "_")] = runs[part](args)
    kernel_rows = data.get("kernels", [])
    data["targets"] = cpu_lines(kernel_rows) + gpu_lines(kernel_rows)
    data["wall_s"] = time.perf_counter() - t0
    write(Path(f"{prefix}-suite"), data, render(data, prefix))
    print("\n".join(data["targets"]))
    print(f"wrote {prefix}-suite.md and .json in {data['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
