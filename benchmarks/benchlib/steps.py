"""Training-step benchmarks (DPO and SFT): count what each optimiser step trained on, time it, run each trainer in a
fresh process one after another, and summarise a run the same way for every trainer."""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

from .env import header, metadata
from .paths import child_env


class StepRecorder:
    """Wraps a collator to count rows and tokens, and a ``TrainerCallback`` to time optimiser steps.

    ``work_tokens(row)`` is the per-row count every trainer shares (padding and layout excluded). The data loader
    collates ahead of training (accelerate fetches one micro-batch early), so counts wait in a queue and each
    micro-batch's are booked when the trainer ends that micro-batch (``on_substep_end`` / ``on_step_end``)."""

    def __init__(self, collate, work_tokens: Callable[[dict], int]):
        self.collate = collate
        self.work_tokens = work_tokens
        self.collated: deque[dict] = deque()
        self.pending = dict.fromkeys(("rows", "real_tokens", "processed_tokens", "work_tokens"), 0)
        self.steps: list[dict] = []
        self._t0 = None

    def __call__(self, rows):
        batch = self.collate(rows)
        ids = batch["input_ids"]
        real = int(batch["attention_mask"].sum()) if "attention_mask" in batch else ids.numel()
        self.collated.append({"rows": len(rows), "real_tokens": real, "processed_tokens": ids.numel(),
                              "work_tokens": sum(self.work_tokens(row) for row in rows)})
        return batch

    def _book_micro_batch(self):
        for key, value in self.collated.popleft().items():
            self.pending[key] += value

    def callback(self):
        from transformers import TrainerCallback

        recorder = self

        class _Timer(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                recorder._t0 = time.perf_counter()

            def on_substep_end(self, args, state, control, **kwargs):
                recorder._book_micro_batch()

            def on_step_end(self, args, state, control, **kwargs):
                recorder._book_micro_batch()
                recorder.steps.append({"time_s": time.perf_counter() - recorder._t0, **recorder.pending})
                recorder.pending = dict.fromkeys(recorder.pending, 0)

        return _Timer()


def peak_memory_mib(cuda: bool) -> float:
    """The process's peak so far: CPU peak RSS, CUDA ``max_memory_allocated``."""
    import torch

    return (torch.cuda.max_memory_allocated() if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**20


def attach(trainer, work_tokens: Callable[[dict], int], cuda: bool) -> StepRecorder:
    """Put a ``StepRecorder`` between ``trainer`` and its collator; notes the peak memory before training (imports,
    model, data), so that the summary can tell training's own memory from the process's floor."""
    recorder = StepRecorder(trainer.data_collator, work_tokens)
    recorder.setup_peak_mib = peak_memory_mib(cuda)
    trainer.data_collator = recorder
    trainer.add_callback(recorder.callback())
    return recorder


def summary(recorder: StepRecorder, cuda: bool) -> dict:
    """Figures every step benchmark reports over the recorded steps after the first (it pays for warm-up): per-row
    processed tokens, median step time, work and real tokens/s (summed tokens over summed step time), packing
    efficiency, the process's peak memory and its peak before training, and the steps themselves."""
    steps = recorder.steps[1:]
    total = {k: sum(s[k] for s in steps) for k in ("time_s", "rows", "real_tokens", "processed_tokens", "work_tokens")}
    return {
        "processed_tokens_per_row": total["processed_tokens"] / total["rows"],
        "median_step_s": statistics.median(s["time_s"] for s in steps),
        "rows_per_step": total["rows"] / len(steps),
        "work_tokens_per_s": total["work_tokens"] / total["time_s"],
        "real_tokens_per_s": total["real_tokens"] / total["time_s"],
        "packing_efficiency": total["real_tokens"] / total["processed_tokens"],
        "peak_memory_mib": peak_memory_mib(cuda),
        "setup_peak_memory_mib": recorder.setup_peak_mib,
        "steps": recorder.steps,
    }


def run_children(script: str, argv: list[str], names: list[str], extra: list[str] = (), *,
                 timeout_s: float | None = None, log: str | None = None) -> list[dict]:
    """Run ``script argv --child NAME *extra`` for each name, one at a time (each trainer has the machine to itself,
    and its peak RSS is its own); the child prints its result as the last line of JSON. ``timeout_s`` bounds all of
    them: each child may take what is left of it over the children left. A child that fails, or runs past its share,
    becomes ``{"trainer": name, "skipped": why}``. ``log``: a file to append each child's stderr to."""
    rows = []
    deadline = time.monotonic() + timeout_s if timeout_s is not None else None
    for i, name in enumerate(names):
        cmd = [sys.executable, script, *argv, "--child", name, *extra]
        timeout = (deadline - time.monotonic()) / (len(names) - i) if deadline is not None else None
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env(), timeout=timeout)
            stdout, stderr, why = proc.stdout, proc.stderr, None if proc.returncode == 0 else f"exit {proc.returncode}"
        except subprocess.TimeoutExpired as exc:
            stdout, stderr, why = "", _text(exc.stderr), f"timed out after {timeout:.0f} s"
        if log:
            with open(log, "a") as f:
                f.write(f"===== {name}: {why or 'ok'}\n{stderr}\n")
        if why:
            rows.append({"trainer": name, "skipped": f"{why}: {(stderr.strip().splitlines() or ['?'])[-1]}"})
            print(f"{name}: skipped: {stderr[-2000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(stdout.strip().splitlines()[-1]))
    return rows


def _text(output: bytes | str | None) -> str:
    """A timed-out child's captured output (bytes, whatever ``text=True`` asked)."""
    return output.decode(errors="replace") if isinstance(output, bytes) else output or ""


def main(parser: Callable, run: Callable[[str, object], dict], report: Callable[[object], tuple[list[dict], str]]):
    """A step benchmark's entry point. With ``--child NAME``: ``run(NAME, args)``, printed as the last line of JSON.
    Otherwise ``report(args)`` runs the children and gives (rows, markdown), printed and written to ``--out``.json
    (metadata, arguments, rows) and .md, headed by the metadata taken before the children ran (its load average is
    then the machine's, not theirs)."""
    args = parser().parse_args()
    if args.child:
        print(json.dumps(run(args.child, args)))
        return
    meta = metadata(args.device)
    rows, md = report(args)
    md = header(meta) + "\n\n" + md
    print(md)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(f"{args.out}.json").write_text(json.dumps({"meta": meta, "args": vars(args), "rows": rows}, indent=2))
        Path(f"{args.out}.md").write_text(md + "\n")


def trl_ratios(rows: list[dict], target: str) -> list[str]:
    """The line under a two-trainer table: fastdpo's work tokens/s and peak memory as multiples of TRL's (none where
    either did not run), with the issue's ``target``."""
    by_name = {r["trainer"]: r for r in rows}
    if not {"fastdpo", "trl"} <= set(by_name):
        return []
    f, t = by_name["fastdpo"], by_name["trl"]
    return [f"\nfastdpo / TRL: {f['work_tokens_per_s'] / t['work_tokens_per_s']:.2f}x work tokens/s, "
            f"{f['peak_memory_mib'] / t['peak_memory_mib']:.2f}x peak memory (target {target})"]

