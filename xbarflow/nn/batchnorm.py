"""BatchNorm on a chip: per-chip re-estimation of the running statistics (``eval.bn_recalibration``).

BatchNorm stays digital and normalises with running statistics measured on the network it was
trained with (model note, section 11). A chip whose arrays attenuate or scale an output turns
that scale into an offset after BatchNorm, and the offsets compound through a deep network:
a ResNet-20 whose software accuracy is 87 % reads 10 % on every RRAM chip with its trained
statistics. Re-estimating the statistics on training images read through the chip removes the
chip-wide part, digitally and without any weight change (Joshi et al., Nature Communications
2020, "AdaBS"; Li et al. 2016, "AdaBN").

:func:`reestimate_batchnorm` does it for the model in its current mode (a chip at a read
time, or the nominal crossbar); :func:`saved_batchnorm_stats` puts the trained statistics back
afterwards, so that one chip's statistics never leak into the next, nor into the logged model.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator, List

import torch
import torch.nn as nn

BN_RECALIBRATIONS = ("none", "chip")
_STATS = ("running_mean", "running_var", "num_batches_tracked")


def batchnorm_layers(model: nn.Module) -> List[nn.modules.batchnorm._BatchNorm]:
    """Every BatchNorm (1d, 2d, 3d) of ``model`` that keeps running statistics, in module order."""
    return [m for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@contextmanager
def saved_batchnorm_stats(model: nn.Module) -> Iterator[nn.Module]:
    """Restore every BatchNorm's running mean, variance, batch count, momentum and train/eval
    flag on exit (after a chip's re-estimation)."""
    layers = batchnorm_layers(model)
    saved = [({k: getattr(m, k).clone() for k in _STATS}, m.momentum, m.training) for m in layers]
    try:
        yield model
    finally:
        with torch.no_grad():
            for m, (stats, momentum, training) in zip(layers, saved, strict=True):
                for k, v in stats.items():
                    getattr(m, k).copy_(v)
                m.momentum = momentum
                m.train(training)


@torch.no_grad()
def reestimate_batchnorm(model: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Replace every BatchNorm's running statistics by those of ``batches`` read through ``model``.

    The model runs in its current crossbar mode (a chip, the nominal crossbar): the statistics
    are those of the activations that chip produces. Only the BatchNorm layers switch to
    training behaviour (batch statistics, accumulated with ``momentum=None``: the running
    mean is the plain average of the batch means); every other module keeps its own mode,
    so a crossbar layer reads the chip as in evaluation. ``torch.optim.swa_utils.update_bn``
    does the same but puts the whole model into training mode, which is not what a chip
    does. The statistics of a BatchNorm are taken with the earlier BatchNorms normalising
    by the batch's own statistics: with one calibration batch (the default: ``eval.batch_size``
    >= ``eval.bn_samples``) those are exactly the re-estimated ones, so every layer sees the
    activations it will see in deployment. The caller restores the trained statistics
    (:func:`saved_batchnorm_stats`); the momentum and training flags are left changed.

    Args:
        model: a converted model, in the mode to calibrate for.
        batches: input batches ``(N, *in_shape)`` of training images (never the test split),
            on the model's device.

    Returns:
        The number of images read.
    """
    layers = batchnorm_layers(model)
    if not layers:
        return 0
    for m in layers:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    n = 0
    for x in batches:
        model(x)
        n += len(x)
    for m in layers:
        m.eval()
    if n == 0:
        raise ValueError("BatchNorm re-estimation needs at least one calibration image")
    return n
