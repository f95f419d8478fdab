"""Lightning module: trains a converted model in standard, noise-aware or technology-aware mode."""
from __future__ import annotations

from typing import Callable, Optional

import pytorch_lightning as pl
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy

from ..config import ConfigError
from ..crossbar.variation import Chip
from ..nn.calibration import calibrate_column_gains, calibrate_converters
from ..nn.convert import set_mode, xbar_layers
from .noise import forward_with_weight_noise

# Training chips live in their own seed range so they never coincide with evaluation chips.
TRAIN_CHIP_SEED_BASE = 10**9


class TrainingDiverged(ConfigError):
    """The loss or the weights stopped being finite: the step size is too large for the network.

    A :class:`~xbarflow.config.ConfigError` (a setting to change, not a bug): the entry point
    answers it with one line and exit 2, and the run, already open, is marked FAILED.
    """


class CrossbarClassifier(pl.LightningModule):
    """Classifier whose crossbar layers run ideal (``standard``), ideal with fresh weight noise per
    step (``noise_aware``, :mod:`xbarflow.training.noise`) or non-ideal (``tech_aware``) in training.

    Args:
        model: a converted model (:func:`xbarflow.nn.convert`).
        training: the ``training`` config (mode, optimizer, lr, scheduler, epochs, ...).
        num_classes: number of classes.
        make_chip: seed -> chip, or ``None`` when there is no random variation; with
            ``training.resample_chip`` each step trains on a fresh chip.
        seed: run seed; step ``n`` trains on the chip (``noise_aware``: the weight noise) with seed
            ``TRAIN_CHIP_SEED_BASE + seed * 10**6 + n`` (reproducible, resumable).
    """

    def __init__(self, model: nn.Module, training, num_classes: int,
                 make_chip: Callable[[int], Optional[Chip]], seed: int = 0):
        super().__init__()
        self.model = model
        self.training_cfg = training
        self.make_chip = make_chip
        self.seed = seed
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        if not training.column_gain or training.mode != "tech_aware":
            for layer in xbar_layers(model):
                layer.log_column_gain.requires_grad_(False)

    @property
    def tech_aware(self) -> bool:
        """True while training on the crossbar model (after ``pretrain_epochs`` ideal epochs)."""
        t = self.training_cfg
        return t.mode == "tech_aware" and self.current_epoch >= t.pretrain_epochs

    @property
    def step_seed(self) -> int:
        """Seed of this step's training chip or weight noise."""
        return TRAIN_CHIP_SEED_BASE + self.seed * 10**6 + self.global_step

    def forward(self, x):
        return self.model(x)

    def _train_mode(self):
        if not self.tech_aware:
            set_mode(self.model, "ideal")
            return
        chip = None
        if self.training_cfg.resample_chip:
            chip = self.make_chip(TRAIN_CHIP_SEED_BASE + self.seed * 10**6 + self.global_step)
        set_mode(self.model, "chip", chip) if chip is not None else set_mode(self.model, "nominal")

    def _eval_mode(self):
        # validation tracks what the mode optimises: the ideal network, or the nominal crossbar
        set_mode(self.model, "nominal" if self.tech_aware else "ideal")

    def on_train_batch_start(self, batch, batch_idx):
        t = self.training_cfg
        if self.tech_aware and batch_idx == 0:
            entering = self.current_epoch == t.pretrain_epochs
            # converter ranges: calibrated ones follow the weights at every crossbar epoch;
            # learned ones start from a calibration when the crossbar phase starts
            calibrate_converters(self.model, batch[0], learned=entering)
            if entering and t.column_gain:
                # start the gains at their least-squares values (on the calibrated converters)
                self._train_mode()
                calibrate_column_gains(self.model, batch[0])
        self._train_mode()

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.training_cfg.mode == "noise_aware":
            logits = forward_with_weight_noise(self.model, x, self.training_cfg.noise, self.step_seed)
        else:
            logits = self.model(x)
        loss = F.cross_entropy(logits, y)
        if not torch.isfinite(loss):
            raise self._diverged(loss)
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        # after the optimizer step: weights that overflowed would reach the crossbar model
        # (conductances from NaN) in the next step or in validation
        params = [p.detach() for p in self.parameters()]
        if params and not bool(torch.stack([torch.isfinite(p).all() for p in params]).all()):
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            raise self._diverged(loss, "the weights are no longer finite")

    def _diverged(self, loss, what: str = "") -> TrainingDiverged:
        t = self.training_cfg
        value = float(loss.detach()) if isinstance(loss, torch.Tensor) else float("nan")
        # the step size: the learning rate, and with SGD's or Adam's L2 term lr * weight_decay
        decay = f" or training.weight_decay (got {t.weight_decay:g})" if t.weight_decay > 0 else ""
        return TrainingDiverged(f"training diverged in epoch {self.current_epoch} (loss {value:.3g}"
                                f"{', ' + what if what else ''}): lower training.lr (got {t.lr:g}){decay}")

    def on_validation_epoch_start(self):
        self._eval_mode()

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.val_acc.update(self.model(x), y)

    def on_validation_epoch_end(self):
        # percent, like every accuracy xbarflow logs
        self.log("val/acc", 100.0 * self.val_acc.compute(), prog_bar=True)
        self.val_acc.reset()

    def configure_optimizers(self):
        t = self.training_cfg
        if t.optimizer == "adam":
            opt = torch.optim.Adam(self.parameters(), lr=t.lr, weight_decay=t.weight_decay)
        else:
            opt = torch.optim.SGD(self.parameters(), lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
        if t.scheduler == "cosine":
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=t.epochs)
            return {"optimizer": opt, "lr_scheduler": sched}
        return opt
