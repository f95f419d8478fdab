"""A layer's effective weight: mapping, tiling, chip and circuit in one function.

The whole non-ideal layer is linear in its inputs, so it equals an ordinary layer
whose weight is assembled from the tiles' transfer matrices. That weight is
computed once per weight update (training) or per chip (evaluation); the layer's
forward pass is then an ordinary matmul.
"""
from __future__ import annotations

from typing import Optional

import torch

from .circuit import transfer_matrix
from .mapping import conductance_pair, deinterleave_difference, interleave_columns
from .spec import CrossbarSpec
from .tiling import from_tiles, to_tiles
from .variation import Chip


def physical_arrays(W: torch.Tensor, spec: CrossbarSpec):
    """Programmed conductances of a layer, tile by tile.

    Args:
        W: weights, shape ``(fan_in, fan_out)``.

    Returns:
        ``(G, k)``: G in siemens, shape ``(2, n_r, n_c, rows, cols)`` for separate
        arrays (index 0 holds G+, 1 holds G-) or ``(n_r, n_c, rows, cols)`` for
        interleaved columns; k the mapping scale in siemens per unit weight.
    """
    G_pos, G_neg, k = conductance_pair(W, spec.g_min, spec.g_max, spec.w_max)
    if spec.mapping == "interleaved":
        G = interleave_columns(G_pos, G_neg)
    else:
        G = torch.stack((G_pos, G_neg))
    return to_tiles(G, spec.rows, spec.cols, pad_value=spec.g_min), k


def effective_weight(
    W: torch.Tensor, spec: CrossbarSpec, chip: Optional[Chip] = None, name: str = ""
) -> torch.Tensor:
    """The weight matrix the non-ideal crossbar layer actually applies.

    Args:
        W: software weights, shape ``(fan_in, fan_out)``, dimensionless.
        spec: arrays and circuit of the layer.
        chip: a drawn chip (variation), or ``None`` for the nominal devices.
        name: the layer's stable name; selects its devices on the chip.

    Returns:
        ``W_eff``, shape ``(fan_in, fan_out)``, with ``y = x @ W_eff`` equal to the
        crossbar's rescaled differential output ``(I+ - I-) / (k v_read / x_max)``
        (v_read and x_max cancel: the circuit is linear). Differentiable in W.
        Equals ``clip(W, -w_max, w_max)`` for an ideal circuit without variation.
    """
    fan_in, fan_out = W.shape
    G, k = physical_arrays(W, spec)
    if chip is not None:
        G = chip.apply(G, name)
    T = transfer_matrix(G, r_source=spec.r_source, r_sink=spec.r_sink, r_wire=spec.r_wire)
    if spec.mapping == "interleaved":
        T = deinterleave_difference(from_tiles(T, fan_in, 2 * fan_out))
    else:
        T = from_tiles(T, fan_in, fan_out)
        T = T[0] - T[1]
    return T / k
