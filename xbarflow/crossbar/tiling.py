"""Splitting a layer's matrix over a grid of physical tiles, and assembling it back (section 5)."""
from __future__ import annotations

import math
from typing import Tuple

import torch
import torch.nn.functional as F


def grid_shape(fan_in: int, fan_out: int, rows: int, cols: int) -> Tuple[int, int]:
    """Number of tiles ``(along fan-in, along fan-out)`` for a ``fan_in x fan_out`` matrix."""
    return math.ceil(fan_in / rows), math.ceil(fan_out / cols)


def to_tiles(G: torch.Tensor, rows: int, cols: int, pad_value: float) -> torch.Tensor:
    """Cut ``(..., fan_in, fan_out)`` into tiles ``(..., n_r, n_c, rows, cols)``.

    The last tile of each grid row/column is padded with ``pad_value`` (the
    conductance of a zero-weight cell, ``g_min``): those devices physically load
    the lines even though their inputs sit at 0 V and their outputs are unused.
    """
    fan_in, fan_out = G.shape[-2], G.shape[-1]
    n_r, n_c = grid_shape(fan_in, fan_out, rows, cols)
    pad_r, pad_c = n_r * rows - fan_in, n_c * cols - fan_out
    if pad_r or pad_c:
        G = F.pad(G, (0, pad_c, 0, pad_r), value=pad_value)
    lead = G.shape[:-2]
    G = G.reshape(*lead, n_r, rows, n_c, cols)
    return G.transpose(-3, -2)


def from_tiles(T: torch.Tensor, fan_in: int, fan_out: int) -> torch.Tensor:
    """Assemble tiles ``(..., n_r, n_c, rows, cols)`` into ``(..., fan_in, fan_out)``.

    Outputs of tiles in the same grid column are summed digitally, which is what
    a matrix product with the assembled block matrix does; padded rows and
    columns are dropped.
    """
    n_r, n_c, rows, cols = T.shape[-4:]
    lead = T.shape[:-4]
    full = T.transpose(-3, -2).reshape(*lead, n_r * rows, n_c * cols)
    return full[..., :fan_in, :fan_out]
