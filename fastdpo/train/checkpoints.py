"""Checkpoints that appear whole or not at all, for any ``transformers.Trainer``."""

from __future__ import annotations

import os
import shutil

from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

try:   # a function since transformers 5.x, a Trainer method before
    from transformers.trainer_utils import rotate_checkpoints
except ImportError:
    rotate_checkpoints = None


class AtomicCheckpointMixin:
    """Mix in before ``transformers.Trainer``: the Trainer writes ``checkpoint-N`` under ``output_dir/.staging``
    and the main process moves it into place with one rename, so a process killed mid-save leaves no
    half-written ``checkpoint-N`` for ``--resume-from-checkpoint`` to pick."""

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
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.output_dir = run_dir
        self.accelerator.wait_for_everyone()   # every rank has written its RNG state
        if self.args.should_save:
            final = os.path.join(run_dir, name)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(os.path.join(staging, name), final)
            best = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.best_global_step}")
            if self.state.best_global_step and os.path.isdir(best):
                self.state.best_model_checkpoint = best
                self.state.save_to_json(os.path.join(final, TRAINER_STATE_NAME))
            self._rotate(run_dir)
        self.accelerator.wait_for_everyone()

    def _rotate(self, run_dir: str) -> None:
        """The Trainer's own deletion of checkpoints beyond ``save_total_limit``."""
        if rotate_checkpoints is None:
            self._rotate_checkpoints(use_mtime=True, output_dir=run_dir)
        else:
            rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)
