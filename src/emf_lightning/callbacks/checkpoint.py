"""ModelCheckpoint whose ``last.ckpt`` always holds the weights training ended with, written atomically."""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint

from emf_lightning.checkpoint_io import use_atomic_checkpoint_io


class FinalModelCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint, plus: at the end of training, ``last.ckpt`` is rewritten unless it already
    holds the final step; and every checkpoint file is written beside its target and renamed into place.

    With ``every_n_train_steps`` and a ``max_steps`` that is not a multiple of it (700 steps, checkpoints
    every 300), Lightning's own ``save_last`` leaves ``last.ckpt`` at the last multiple (step 600): its
    train-end hook only saves when no "last" was written during the run. Whoever then evaluates or resumes
    from ``last.ckpt`` would silently get older weights.

    Lightning's default writer goes through ``$TMPDIR``; across filesystems its final move is a copy onto the
    target, and a kill during it truncates the previous good ``last.ckpt``. ``setup`` therefore swaps the
    strategy's default ``TorchCheckpointIO`` for :class:`~emf_lightning.checkpoint_io.AtomicCheckpointIO` (a
    checkpoint plugin configured by the user is kept).
    """

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        use_atomic_checkpoint_io(trainer.strategy)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        # _last_global_step_saved is ModelCheckpoint's own record of the step it last wrote (any file).
        if self.save_last and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
