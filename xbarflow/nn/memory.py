"""Memory a converted model's crossbar simulation needs, layer by layer (before any allocation).

Two parts: the simulated arrays (:mod:`xbarflow.crossbar.memory`, independent of the batch),
and what grows with the batch (:func:`activation_memory`): the network's activations, and,
with column ADCs, every tile row's partial output, which the layer forms and converts before
the digital sum (``n_r`` times the layer's own output, ``n_r`` the tile rows).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..crossbar.effective import adc_groups, adc_reads_per_chunk, outputs_per_adc_range
from ..crossbar.memory import ArrayMemory, array_memory
from .calibration import calibration_groups_per_chunk
from .layers import _XbarMixin

# Bytes per float of what grows with the batch, as multiples of the counts below. Measured on
# the paper CNN (32-64 channels, 4096-512-10) on 64x64 and 256x256 tiles, 8-bit DAC and ADC,
# peak resident memory a step adds in a fresh process (XBARFLOW_MALLOC=default, as for the
# arrays), rounded up:
# * training keeps every module's output and its gradient: 2.1-2.7 x the outputs' sum;
# * evaluation frees as it goes: 1.5 x the largest output and its input;
# * the ADC's partial outputs: in evaluation (no gradient) they go through in chunks of at
#   most ADC_CHUNK_PARTIALS (:func:`~xbarflow.crossbar.effective.adc_apply`), counted 3.5 x
#   per layer (quantiser temporaries; the C allocator keeps each layer's blocks); 1.8 x in a
#   training step with fixed or calibrated ranges and 3.7 x with learned ones (LSQ keeps the
#   inputs, the outputs and where they saturate for the backward);
# * converter calibration (one batch, :func:`~xbarflow.nn.calibration.calibrate_converters`)
#   goes layer by layer: the layer's im2col view of the whole batch (built, then copied to one
#   row per read) and one chunk of partial outputs (whole ADC groups, see
#   :func:`~xbarflow.nn.calibration.calibration_groups_per_chunk`) with the percentile's sorted
#   copy; the largest layer counts, 1.5 x each (the paper CNN on 64x64 and 256x256 tiles,
#   per-tile and per-column ranges, separate and interleaved columns, batches of 256 and 512:
#   -15 % to +32 % of the measured peak).
ACT_TRAIN_COPIES = 2.75
ACT_EVAL_COPIES = 1.5
ADC_EVAL_COPIES = 3.5
CALIBRATION_INPUT_COPIES = 1.5
ADC_CALIBRATION_COPIES = 1.5
ADC_TRAIN_COPIES = 2.0
ADC_TRAIN_LEARNED_COPIES = 4.0


class _AdcLayer(NamedTuple):
    """Per sample counts of one crossbar layer with an ADC (floats, reads: rows of its im2col view)."""

    per_sample: int   # partial outputs: reads x tile rows x outputs
    chunk_reads: int  # reads an evaluation chunk converts at once
    reads: int        # 1 for a linear layer, the output positions of a convolution
    inputs: int       # its array inputs: reads x fan-in
    n_r: int          # tile rows
    per_group: int    # layer outputs that share an ADC range (1 per column pair, or a tile's)
    fan_out: int


@dataclass(frozen=True)
class ActivationMemory:
    """What a step holds that grows with the batch, per sample and in bytes.

    Attributes:
        outputs: floats per sample, summed over every module's output.
        largest: floats per sample of the largest module output.
        adc_partials: floats per sample of the tile rows' partial outputs, summed over the
            crossbar layers with an ADC (0 without).
        adc_eval_chunks: floats of partial outputs one evaluation batch forms at once, summed
            over those layers (each converts its reads in chunks).
        train_bytes: a training step at the training batch (0 when the run does not train).
        eval_bytes: an evaluation batch.
        calibration_bytes: the converter calibration batch (0 when nothing is calibrated).
    """

    outputs: int
    largest: int
    adc_partials: int
    adc_eval_chunks: int
    train_bytes: float
    eval_bytes: float
    calibration_bytes: float


@dataclass(frozen=True)
class ModelMemory:
    """Estimated peak memory of a model's crossbar simulation.

    Attributes:
        layers: ``(qualified name, (fan_in, fan_out), ArrayMemory)`` of every crossbar layer.
        peak_bytes: the largest of the run's phases (evaluation, converter calibration, a
            training step), each its arrays (summed over the layers) plus what grows with
            its batch.
        activations: what grows with the batch (``None`` when the input shape was not given:
            then the arrays only).
        phase: the phase of the peak: ``"evaluate"``, ``"calibrate"`` or ``"train"``.
    """

    layers: List[Tuple[str, Tuple[int, int], ArrayMemory]]
    peak_bytes: float
    activations: Optional[ActivationMemory] = None
    phase: str = "evaluate"

    def largest(self) -> Tuple[str, Tuple[int, int], ArrayMemory]:
        """The layer whose arrays take the most memory."""
        return max(self.layers, key=lambda entry: entry[2].train_bytes)

    @property
    def batch_bytes(self) -> float:
        """The part of the peak that grows with the batch (0 without activations)."""
        if self.activations is None:
            return 0.0
        return {"evaluate": self.activations.eval_bytes, "calibrate": self.activations.calibration_bytes,
                "train": self.activations.train_bytes}[self.phase]


def model_memory(model: nn.Module, train_through_crossbar: bool, in_shape: Optional[Sequence[int]] = None, *,
                 train_batch: int = 0, eval_batch: int = 0, calibration_batch: int = 0) -> ModelMemory:
    """Estimate the memory that simulating ``model``'s crossbar layers takes.

    Args:
        model: a converted model (:func:`xbarflow.nn.convert`).
        train_through_crossbar: technology-aware training (a step holds every layer's
            arrays for the backward pass); otherwise only evaluation touches the arrays.
        in_shape: one sample's shape; with it, the activations and ADC partial outputs of
            each phase at its batch count too (:func:`activation_memory`).
        train_batch, eval_batch, calibration_batch: samples per batch of each phase
            (``train_batch=0``: the run does not train; ``calibration_batch=0``: nothing is calibrated).

    Returns:
        A :class:`ModelMemory` (bytes; see :mod:`xbarflow.crossbar.memory` for the arrays).
    """
    layers = []
    for name, m in model.named_modules():
        if isinstance(m, _XbarMixin):
            fan_out = m.weight.shape[0]
            fan_in = m.weight[0].numel()
            layers.append((name, (fan_in, fan_out), array_memory(fan_in, fan_out, m.spec, m.weight.element_size())))
    # Layers are evaluated one after another, but the C allocator keeps the blocks a layer
    # freed (measured: the peak of an evaluation is the sum over layers), so both add up.
    arrays_eval = sum(entry[2].eval_bytes for entry in layers)
    arrays_train = sum(entry[2].train_bytes for entry in layers) if train_through_crossbar else 0.0
    if in_shape is None:
        if not layers:
            return ModelMemory([], 0.0)
        peak = max(arrays_eval, arrays_train)
        return ModelMemory(layers, float(peak), None, "train" if arrays_train > arrays_eval else "evaluate")
    act = activation_memory(model, in_shape, train_batch=train_batch, eval_batch=eval_batch,
                            calibration_batch=calibration_batch, train_through_crossbar=train_through_crossbar)
    phases = {"evaluate": arrays_eval + act.eval_bytes, "calibrate": arrays_eval + act.calibration_bytes,
              "train": arrays_train + act.train_bytes}
    phase = max(phases, key=lambda k: phases[k])
    return ModelMemory(layers, float(phases[phase]), act, phase)


def _per_sample_shapes(model: nn.Module, in_shape: Sequence[int]):
    """``(outputs, largest, adc_layers, learned)`` of one sample through ``model`` (ideal mode).

    ``adc_layers`` lists an :class:`_AdcLayer` for each crossbar layer with an ADC; ``learned``:
    some layer learns its ADC ranges.

    One forward pass of a single zero sample in evaluation mode, on the software weights
    (cheap: no crossbar is simulated), with hooks that count each leaf module's output and,
    for crossbar layers with an ADC, the reads (rows of the im2col view) per sample.
    """
    from .convert import xbar_mode

    counts = {"outputs": 0, "largest": 0, "learned": False}
    adc = []

    def count(module, inputs, output):
        if isinstance(output, torch.Tensor) and not list(module.children()):
            counts["outputs"] += output.numel()
            counts["largest"] = max(counts["largest"], output.numel())
        if isinstance(module, _XbarMixin) and module.spec.has_adc:
            fan_in, fan_out = module.weight[0].numel(), module.weight.shape[0]
            reads = output.numel() // fan_out  # positions of a convolution, 1 for a linear layer
            spec = module.spec
            n_r, _ = adc_groups(fan_in, fan_out, spec)
            adc.append(_AdcLayer(reads * n_r * fan_out, adc_reads_per_chunk(fan_in, fan_out, spec), reads,
                                 reads * fan_in, n_r, outputs_per_adc_range(spec), fan_out))
            counts["learned"] |= module.spec.adc_range_mode == "learned"

    param = next(model.parameters(), None)
    x = torch.zeros(1, *in_shape, dtype=param.dtype if param is not None else None,
                    device=param.device if param is not None else None)
    handles = [m.register_forward_hook(count) for m in model.modules()]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad(), xbar_mode(model, "ideal"):
            model(x)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return counts["outputs"], counts["largest"], adc, counts["learned"]


def _eval_chunk(per_sample: int, chunk_reads: int, reads: int, batch: int) -> int:
    """Partial outputs a layer forms at once in evaluation: whole samples, at least one, in a chunk."""
    return per_sample * min(batch, max(1, chunk_reads // reads))


def _calibration_chunk(layer: _AdcLayer, batch: int) -> int:
    """Partial outputs a layer forms at once in calibration (whole ADC groups)."""
    reads = layer.reads * batch
    groups = calibration_groups_per_chunk(layer.n_r, reads, layer.per_group)
    return layer.n_r * reads * min(layer.fan_out, groups * layer.per_group)


def activation_memory(model: nn.Module, in_shape: Sequence[int], *, train_batch: int, eval_batch: int,
                      calibration_batch: int = 0, train_through_crossbar: bool = False,
                      itemsize: int = 4) -> ActivationMemory:
    """Estimate the memory that grows with the batch: activations and the ADC's partial outputs.

    Args:
        model: a converted model (:func:`xbarflow.nn.convert`).
        in_shape: one sample's shape, e.g. ``(1, 28, 28)``.
        train_batch: samples per training step (0: the run does not train).
        eval_batch: samples per evaluation batch.
        calibration_batch: samples of the converter calibration (0: none calibrated).
        train_through_crossbar: the training step runs the crossbar layers (technology-aware),
            so its ADC partial outputs count.
        itemsize: bytes per float.

    Returns:
        An :class:`ActivationMemory` (bytes; see the constants above for how they were measured).
    """
    outputs, largest, layers, learned = _per_sample_shapes(model, in_shape)
    adc = sum(layer.per_sample for layer in layers)
    chunks = sum(_eval_chunk(layer.per_sample, layer.chunk_reads, layer.reads, eval_batch) for layer in layers)
    calibration_layer = max((CALIBRATION_INPUT_COPIES * layer.inputs * calibration_batch
                             + ADC_CALIBRATION_COPIES * _calibration_chunk(layer, calibration_batch)
                             for layer in layers), default=0.0) if calibration_batch else 0.0
    train = ACT_TRAIN_COPIES * train_batch * outputs
    if train_through_crossbar:
        train += (ADC_TRAIN_LEARNED_COPIES if learned else ADC_TRAIN_COPIES) * train_batch * adc
    evaluation = ACT_EVAL_COPIES * eval_batch * largest + ADC_EVAL_COPIES * chunks
    calibration = ACT_EVAL_COPIES * largest * calibration_batch + calibration_layer
    return ActivationMemory(outputs, largest, adc, chunks, train * itemsize, evaluation * itemsize,
                            calibration * itemsize)
