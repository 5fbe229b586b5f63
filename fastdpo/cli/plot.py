"""``fastdpo plot RUN_DIR``: a run's training curves (loss, rewards/margins, rewards/accuracies, rewards/chosen and
rewards/rejected, KTO's kl; train and eval) against optimiser steps, from its ``trainer_state.json``, as a PNG
(matplotlib).

``write_curves`` is what ``fastdpo train``, ``train-online``, ``sft`` and ``kto`` call at the end of a run
(``curves_after_training``); panels without data (an SFT run logs no rewards) are left out.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

from . import SUBCOMMANDS

CURVES_FILE = "training_curves.png"
#: panel title -> the metrics drawn in it (TRL's names; evaluation adds the ``eval_`` prefix)
PANELS = {
    "loss": ("loss",),
    "rewards/margins": ("rewards/margins",),
    "rewards/accuracies": ("rewards/accuracies",),
    "rewards/chosen vs rejected": ("rewards/chosen", "rewards/rejected"),
    "kl": ("kl",),   # KTO's reference point z0
}


def load_history(run_dir: str | Path) -> list[dict]:
    """``log_history`` of ``run_dir/trainer_state.json`` (``run_dir`` may also be that file or a checkpoint).

    Raises:
        FileNotFoundError: no trainer_state.json there.
        ValueError: the file is not a trainer state, or it holds no logged metrics.
    """
    path = Path(run_dir)
    path = path if path.is_file() else path / "trainer_state.json"
    if not path.is_file():
        raise FileNotFoundError(f"no trainer_state.json in {str(run_dir)!r}\nWhat to do: pass the --output-dir of a "
                                "finished fastdpo run, or one of its checkpoint-N directories")
    try:
        history = json.loads(path.read_text())["log_history"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is not a transformers trainer state ({e})\nWhat to do: pass the trainer_state.json "
                         "that transformers' Trainer.save_state wrote") from e
    if not any(key in entry for entry in history for keys in PANELS.values() for key in keys):
        raise ValueError(f"{path} holds no logged loss or rewards\nWhat to do: train with --logging-steps smaller than "
                         "the number of steps, or --eval-strategy steps/epoch")
    return history


def _series(history: list[dict], key: str) -> tuple[list[float], list[float]]:
    points = [(entry["step"], entry[key]) for entry in history if key in entry and "step" in entry]
    return [s for s, _ in points], [v for _, v in points]


def write_curves(run_dir: str | Path, output: str | Path | None = None) -> Path:
    """Plot the curves of ``run_dir`` (see ``load_history``) into ``output`` (default
    ``run_dir/training_curves.png``); returns its path.

    Raises:
        ModuleNotFoundError: matplotlib is not installed.
        as ``load_history``.
    """
    history = load_history(run_dir)
    if importlib.util.find_spec("matplotlib") is None:
        raise ModuleNotFoundError("fastdpo plot needs matplotlib\nWhat to do: pip install 'fastdpo[plot]' "
                                  "(or pip install matplotlib)")
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global figure state
    from matplotlib.ticker import MaxNLocator

    panels = {title: keys for title, keys in PANELS.items()
              if any(_series(history, p + k)[0] for k in keys for p in ("", "eval_"))}
    columns = min(2, len(panels))
    rows = -(-len(panels) // columns)
    figure = Figure(figsize=(5.2 * columns, 3.4 * rows), layout="constrained")
    for i, (title, keys) in enumerate(panels.items()):
        axes = figure.add_subplot(rows, columns, i + 1)
        for k, key in enumerate(keys):
            colour = f"C{k}"
            label = key.removeprefix("rewards/") if len(keys) > 1 else None
            steps, values = _series(history, key)
            if steps:
                axes.plot(steps, values, color=colour, label=f"train {label or ''}".strip())
            steps, values = _series(history, "eval_" + key)
            if steps:
                axes.plot(steps, values, "o--", color=colour, label=f"eval {label or ''}".strip())
        if title == "rewards/accuracies":
            axes.axhline(0.5, color="grey", linewidth=0.8, linestyle=":")   # chance
        elif title not in ("loss", "kl"):
            axes.axhline(0.0, color="grey", linewidth=0.8, linestyle=":")
        axes.set(title=title, xlabel="step")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
        axes.legend(fontsize="small")
    root = Path(run_dir) if Path(run_dir).is_dir() else Path(run_dir).parent
    output = Path(output) if output is not None else root / CURVES_FILE
    figure.suptitle(str(root.resolve().name))
    figure.savefig(output, dpi=90)
    return output


def curves_after_training(run_dir: str | Path) -> Path | None:
    """``write_curves(run_dir)`` at the end of a run, with a line saying where; None (and a line saying why)
    when matplotlib is missing or nothing was logged. Never raises for those: the run itself succeeded."""
    try:
        path = write_curves(run_dir)
    except (ModuleNotFoundError, ValueError) as e:
        print(f"[fastdpo] no training curves: {e}".replace("\n", "; "), flush=True)
        return None
    print(f"[fastdpo] training curves: {path}", flush=True)
    return path


def main(argv: list[str], name: str = "plot") -> None:
    """Run ``fastdpo plot RUN_DIR [-o FILE.png]``."""
    parser = argparse.ArgumentParser(prog=f"fastdpo {name}", description=SUBCOMMANDS[name][0])
    parser.add_argument("run_dir", metavar="RUN_DIR",
                        help="A run's --output-dir (or a checkpoint-N directory, or a trainer_state.json).")
    parser.add_argument("-o", "--output", metavar="FILE.png",
                        help=f"Where to write the picture (default: RUN_DIR/{CURVES_FILE}).")
    args = parser.parse_args(argv)
    print(write_curves(args.run_dir, args.output))
