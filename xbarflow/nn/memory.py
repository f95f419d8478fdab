"""Memory a converted model's crossbar simulation needs, layer by layer (before any allocation)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Tuple

import torch.nn as nn

from ..crossbar.memory import ArrayMemory, array_memory
from .layers import _XbarMixin


@dataclass(frozen=True)
class ModelMemory:
    """Estimated peak memory of a model's crossbar simulation.

    Attributes:
        layers: ``(qualified name, (fan_in, fan_out), ArrayMemory)`` of every crossbar layer.
        peak_bytes: the larger of evaluation and, when training through the crossbar, a
            training step (both summed over the layers).
    """

    layers: List[Tuple[str, Tuple[int, int], ArrayMemory]]
    peak_bytes: float

    def largest(self) -> Tuple[str, Tuple[int, int], ArrayMemory]:
        """The layer whose arrays take the most memory."""
        return max(self.layers, key=lambda entry: entry[2].train_bytes)


def model_memory(model: nn.Module, train_through_crossbar: bool) -> ModelMemory:
    """Estimate the memory that simulating ``model``'s crossbar layers takes.

    Args:
        model: a converted model (:func:`xbarflow.nn.convert`).
        train_through_crossbar: technology-aware training (a step holds every layer's
            arrays for the backward pass); otherwise only evaluation touches the arrays.

    Returns:
        A :class:`ModelMemory` (bytes; see :mod:`xbarflow.crossbar.memory` for the model).
    """
    layers = []
    for name, m in model.named_modules():
        if isinstance(m, _XbarMixin):
            fan_out = m.weight.shape[0]
            fan_in = m.weight[0].numel()
            layers.append((name, (fan_in, fan_out), array_memory(fan_in, fan_out, m.spec, m.weight.element_size())))
    if not layers:
        return ModelMemory([], 0.0)
    # Layers are evaluated one after another, but the C allocator keeps the blocks a layer
    # freed (measured: the peak of an evaluation is the sum over layers), so both add up.
    peak = sum(entry[2].eval_bytes for entry in layers)
    if train_through_crossbar:
        peak = max(peak, sum(entry[2].train_bytes for entry in layers))
    return ModelMemory(layers, float(peak))
