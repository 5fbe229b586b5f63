"""Checkpoints that appear whole or not at all, a clear stop when one cannot be written, and a clean stop on
SIGTERM, for any ``transformers.Trainer``."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from transformers import TrainerCallback
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

try:   # a function since transformers 5.x, a Trainer method before
    from transformers.trainer_utils import rotate_checkpoints
except ImportError:
    rotate_checkpoints = None

logger = logging.getLogger(__name__)

RESUME = "rerun the same command with --resume-from-checkpoint true (Python: trainer.train(resume_from_checkpoint=True))"


class CheckpointSaveError(OSError):
    """A checkpoint could not be written (a full disk, a lost mount); the previous one is intact."""


class AtomicCheckpointMixin:
    """Mix in before ``transformers.Trainer``: the Trainer writes ``checkpoint-N`` under ``output_dir/.staging``
    and the main process moves it into place with one rename, so a process killed mid-save leaves no
    half-written ``checkpoint-N`` for ``--resume-from-checkpoint`` to pick. A save that fails stops training on
    every process with a ``CheckpointSaveError`` (the staged files removed, the previous checkpoint untouched);
    SIGTERM saves and stops after the current step (``SaveOnSigterm``)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.sigterm = SaveOnSigterm(self._on_any_process)
        self.add_callback(self.sigterm)

    def train(self, *args, **kwargs):
        with self.sigterm.handling():
            return super().train(*args, **kwargs)

    def _on_any_process(self, flag: bool) -> bool:
        """Whether ``flag`` holds on any process: a collective, so every process calls it at the same point."""
        if self.args.world_size == 1:
            return flag
        return bool(self.accelerator.reduce(torch.tensor([float(flag)], device=self.args.device), "sum").item())

    def _save_checkpoint(self, model, trial):
        if trial is not None:   # hyperparameter search keeps the Trainer's own layout
            return super()._save_checkpoint(model, trial)
        run_dir = self.args.output_dir
        staging = os.path.join(run_dir, ".staging")
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)   # what a killed save left behind
        self.accelerator.wait_for_everyone()
        self.args.output_dir = staging
        error = None
        try:
            super()._save_checkpoint(model, trial)
        except Exception as e:   # every process must hear of it below, rather than wait for this one forever
            error = e
        finally:
            self.args.output_dir = run_dir
        if self._on_any_process(error is not None):   # also: every process has written its RNG state
            if self.args.should_save:
                shutil.rmtree(staging, ignore_errors=True)   # gives back the space the failed save took
            raise CheckpointSaveError(_save_failed(name, run_dir, error)) from error
        if self.args.should_save:
            staged, final = os.path.join(staging, name), os.path.join(run_dir, name)
            best = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.best_global_step}")
            if self.state.best_global_step and (best == final or os.path.isdir(best)):
                # the Trainer looked for the best checkpoint under .staging: rewritten before the rename, so
                # that no file of a renamed checkpoint is ever written again
                self.state.best_model_checkpoint = best
                self.state.save_to_json(os.path.join(staged, TRAINER_STATE_NAME))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(staged, final)
            self._rotate(run_dir)
        self.accelerator.wait_for_everyone()

    def _rotate(self, run_dir: str) -> None:
        """The Trainer's own deletion of checkpoints beyond ``save_total_limit``."""
        if rotate_checkpoints is None:
            self._rotate_checkpoints(use_mtime=True, output_dir=run_dir)
        else:
            rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)


def _save_failed(name: str, run_dir: str, error: Exception | None) -> str:
    """The message of a failed save: what failed and why, the free space, the checkpoint left, what to do."""
    cause = f"{type(error).__name__}: {error}" if error is not None else "it failed on another process"
    free = shutil.disk_usage(run_dir).free / 2**30
    last = get_last_checkpoint(run_dir)
    kept = f"the previous checkpoint, {last}, is intact" if last else "no earlier checkpoint exists"
    return (f"could not write {name} in {run_dir} ({cause}); a full disk is the usual cause ({free:.1f} GiB free "
            f"there now). Training stopped; the half-written {name} was removed and {kept}.\n"
            f"What to do: free space (or lower --save-total-limit, or choose another --output-dir), then {RESUME}.")


class SaveOnSigterm(TrainerCallback):
    """On SIGTERM (a scheduler's preemption, ``kill``) while ``handling``, the current optimiser step finishes, a
    checkpoint is saved and training stops, so the run ends normally (the command exits 0) and a warning says how
    to resume. A second SIGTERM acts as it would without this. ``on_any_process`` (a collective) makes every
    process stop after the same step, also when only some received the signal."""

    def __init__(self, on_any_process: Callable[[bool], bool]):
        self.on_any_process = on_any_process
        self.received = self.stopped = False
        self.previous = None

    @contextmanager
    def handling(self) -> Iterator[None]:
        """SIGTERM handled by this while the block runs (by the main thread, the only one that may set handlers)."""
        self.received = self.stopped = False
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        self.previous = signal.signal(signal.SIGTERM, self._receive)
        try:
            yield
        finally:
            self._restore()

    def _receive(self, signum, frame) -> None:
        self.received = True
        self._restore()

    def _restore(self) -> None:
        # None: a handler set outside Python, which cannot be set back; the default stands in for it
        signal.signal(signal.SIGTERM, signal.SIG_DFL if self.previous is None else self.previous)

    def on_step_end(self, args, state, control, **kwargs):
        if self.on_any_process(self.received):
            control.should_save = control.should_training_stop = self.stopped = True

    def on_train_end(self, args, state, control, **kwargs):
        if self.stopped and state.is_world_process_zero:
            logger.warning("SIGTERM: stopped after step %d of %d and saved %s. To continue, %s.", state.global_step,
                           state.max_steps, os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"),
                           RESUME)
