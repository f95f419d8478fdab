"""Per-chip calibration of the digital periphery (``eval.compensation``).

Two fits, both on a calibration batch, both written into the layers' digital column
gains (``log_column_gain``), layer by layer in execution order so that a later layer
is fitted on the outputs of the already compensated earlier ones:

* ``global`` (:func:`calibrate_global_gains`): one scalar per layer, after IBM aihwkit's
  ``GlobalDriftCompensation`` (v1.1.0, ``aihwkit/inference/compensation/drift.py``):
  its ``readout`` is the mean absolute output, and ``apply`` returns the factor
  ``ref_value / current_value``. aihwkit reads the tile out on one-hot inputs and takes
  the reference right after programming; here the readout is the layer's output on the
  calibration batch and the reference is the *nominal* crossbar (programmed devices,
  no variation, no drift) on the same input, so the factor undoes whatever scales the
  chip's output as a whole (chip-to-chip factor, mean drift) and nothing else.
* ``column``: per-column least-squares gains against the software layer's product of
  the same input: :func:`xbarflow.nn.calibration.calibrate_column_gains`, reused as is.

:func:`saved_column_gains` puts the trained gains back afterwards, so one chip's
compensation never leaks into the next.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn as nn

from .calibration import calibrate_column_gains, channels_and_bias
from .layers import _XbarMixin

COMPENSATIONS = ("none", "global", "column")


def global_gain(reference: torch.Tensor, output: torch.Tensor, floor: float = 1e-30) -> torch.Tensor:
    """aihwkit's global drift-compensation factor: ``mean |reference| / mean |output|``.

    Args:
        reference: the reference outputs (any shape).
        output: the outputs to correct, same shape and units.
        floor: lower bound of the denominator (an all-zero output leaves a finite factor).

    Returns:
        A scalar tensor (dimensionless).
    """
    return reference.abs().mean() / output.abs().mean().clamp_min(floor)


def _nominal_forward(layer: _XbarMixin, x: torch.Tensor) -> torch.Tensor:
    """The layer's output on ``x`` with nominal devices; its mode, chip and read count are kept."""
    saved = (layer.mode, layer.chip, layer._reads)
    layer.mode, layer.chip = "nominal", None
    try:
        # forward, not __call__: the calibration hook must not fire again (every _XbarMixin is a Module)
        return layer.forward(x)  # type: ignore[attr-defined]
    finally:
        layer.mode, layer.chip, layer._reads = saved


@torch.no_grad()
def calibrate_global_gains(model: nn.Module, x: torch.Tensor, min_gain: float = 1e-3) -> None:
    """Multiply every crossbar layer's gains by one factor that matches the nominal crossbar.

    One forward pass of ``model`` on ``x`` in its current mode (a chip). For each layer,
    the factor is :func:`global_gain` of the nominal layer's output (bias removed) over the
    layer's output (bias removed) on the same input; a chip that differs from the nominal
    devices only by a chip-wide conductance factor (no parasitic resistance, no ADC) is
    restored exactly.

    Args:
        model: a converted model in mode ``chip`` (``nominal`` gives factors of exactly 1).
        x: a calibration batch (training images).
        min_gain: floor of the factor.
    """
    handles = []

    def hook(layer, inputs, output):
        _, shape, bias = channels_and_bias(layer, output)
        reference = _nominal_forward(layer, inputs[0]) - bias
        current = output - bias
        factor = global_gain(reference, current).clamp_min(min_gain)
        layer.log_column_gain.add_(factor.log())
        return current * factor + bias

    for m in model.modules():
        if isinstance(m, _XbarMixin):
            handles.append(m.register_forward_hook(hook))
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()


def compensate(model: nn.Module, compensation: str, x: torch.Tensor) -> None:
    """Calibrate the digital periphery of ``model`` (in its current mode) on the batch ``x``.

    Args:
        compensation: ``none`` (nothing), ``global`` or ``column`` (see the module doc).
        x: calibration images (from the training split).
    """
    if compensation == "none":
        return
    if compensation == "global":
        calibrate_global_gains(model, x)
    elif compensation == "column":
        calibrate_column_gains(model, x)
    else:
        raise ValueError(f"compensation must be one of {', '.join(COMPENSATIONS)} (got {compensation!r})")


@contextmanager
def saved_column_gains(model: nn.Module) -> Iterator[nn.Module]:
    """Restore every crossbar layer's digital gains on exit (after a chip's compensation)."""
    layers = [m for m in model.modules() if isinstance(m, _XbarMixin)]
    saved = [m.log_column_gain.detach().clone() for m in layers]
    try:
        yield model
    finally:
        with torch.no_grad():
            for m, g in zip(layers, saved, strict=True):
                m.log_column_gain.copy_(g)
