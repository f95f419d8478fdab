"""The checkpoints a training run leaves besides Lightning's per-epoch ones: when it is
interrupted (SIGTERM, Ctrl-C, an error), and during an epoch, to resume from exactly there."""
from __future__ import annotations

import os
import time
from typing import Any, Optional

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Checkpoint


class InterruptedCheckpoint(Checkpoint):
    """Save ``<dirpath>/<filename>.ckpt`` when training stops on an exception, for inspection;
    removed again when a fit ends normally.

    What Lightning's ``OnExceptionCheckpoint`` does, without its side effect on resuming: with
    that callback among a Trainer's, ``fit(ckpt_path=None)`` means ``ckpt_path="last"`` (Lightning
    warns so, twice when there is none), and a fit restores the newest of this file and
    ``last.ckpt`` it finds in the folder. A run with ``resume=false`` in a folder used before
    would then continue the old training, and ``resume=true`` before the first epoch's end
    would restore a mid-epoch state. With this callback ``ckpt_path=None`` means from the start,
    and resuming stays what :func:`xbarflow.tracking.open_run` chose (``checkpoints/last.ckpt``,
    the last epoch boundary, with ``resume=true``).
    """

    FILE_EXTENSION = ".ckpt"

    def __init__(self, dirpath: str, filename: str = "interrupted") -> None:
        super().__init__()
        if not filename:
            raise ValueError("The filename cannot be empty")
        # set now, not in setup: an exception can come at any moment
        self.dirpath = dirpath
        self.filename = filename

    @property
    def ckpt_path(self) -> str:
        return os.path.join(self.dirpath, self.filename + self.FILE_EXTENSION)

    def on_exception(self, trainer: "pl.Trainer", *_: Any, **__: Any) -> None:
        trainer.save_checkpoint(self.ckpt_path, weights_only=False)  # the whole state; and no INFO line about it

    def teardown(self, trainer: "pl.Trainer", *_: Any, **__: Any) -> None:
        trainer.strategy.remove_checkpoint(self.ckpt_path)


class MidEpochCheckpoint(pl.Callback):
    """Write ``last.ckpt`` during an epoch too: every ``every_n_steps`` optimizer steps and/or when
    ``every_minutes`` of training have passed since the last save.

    A run of long steps (a technology-aware step with wire resistance on large arrays takes
    seconds) can spend hours in one epoch; with per-epoch checkpoints only, a stop loses the
    whole epoch. Lightning restores the weights, optimizer and step count from such a
    checkpoint, and the training loader (:class:`xbarflow.data.ResumableLoader`) its place in
    the epoch, so ``resume=true`` trains on exactly the batches the uninterrupted run would
    have. The last batch of an epoch is left to the per-epoch checkpoint. Under DDP the
    time-based decision is rank 0's, broadcast, so that every rank saves at the same step.

    Args:
        path: the file to write (the run's ``checkpoints/last.ckpt``).
        every_n_steps: save after every this many optimizer steps (None: off).
        every_minutes: save when this much wall time has passed since the last save (None: off).
    """

    def __init__(self, path: str, every_n_steps: Optional[int] = None, every_minutes: Optional[float] = None) -> None:
        super().__init__()
        self.path, self.every_n_steps, self.every_minutes = path, every_n_steps, every_minutes
        self._last_save = time.monotonic()

    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._last_save = time.monotonic()

    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        if batch_idx + 1 >= trainer.num_training_batches:
            return  # the epoch's end: the per-epoch checkpoint follows
        due = bool(self.every_n_steps) and trainer.global_step % self.every_n_steps == 0
        if self.every_minutes:
            late = time.monotonic() - self._last_save >= 60.0 * self.every_minutes
            due = due or bool(trainer.strategy.broadcast(late))
        if due:
            # the whole training state (as the per-epoch checkpoint); saying so also keeps Lightning
            # from logging "`weights_only` was not set" on the console at every save
            trainer.save_checkpoint(self.path, weights_only=False)
            self._last_save = time.monotonic()
