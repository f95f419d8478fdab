"""The checkpoint a training run leaves when it is interrupted (SIGTERM, Ctrl-C, an error)."""
from __future__ import annotations

import os
from typing import Any

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
        trainer.save_checkpoint(self.ckpt_path)

    def teardown(self, trainer: "pl.Trainer", *_: Any, **__: Any) -> None:
        trainer.strategy.remove_checkpoint(self.ckpt_path)
