"""Signed weights to a differential pair of conductances, and back (section 3 of the model note)."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

# A layer whose weights are all zero still needs a finite scale.
_TINY_W = 1e-12


def weight_range(W: torch.Tensor, w_max: Optional[float] = None) -> torch.Tensor:
    """Clipping range of the mapping: ``w_max`` if given, else max |W| (no gradient)."""
    if w_max is not None:
        return torch.as_tensor(float(w_max), dtype=W.dtype, device=W.device)
    return W.detach().abs().max().clamp_min(_TINY_W)


def conductance_pair(
    W: torch.Tensor, g_min: float, g_max: float, w_max: Optional[float] = None
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Map signed weights onto two conductance arrays.

    Args:
        W: weights, shape ``(fan_in, fan_out)`` (already transposed from torch's
            ``(out, in)``), dimensionless.
        g_min, g_max: device conductance range, siemens.
        w_max: clipping range; ``None`` uses max |W|.

    Returns:
        ``(G_pos, G_neg, k)``: conductances in siemens, each shaped like W, and the
        scale ``k = (g_max - g_min) / w_max`` in siemens per unit weight, so that
        ``G_pos - G_neg = k * clip(W, -w_max, w_max)``.
    """
    w_range = weight_range(W, w_max)
    k = (g_max - g_min) / w_range
    Wc = torch.maximum(torch.minimum(W, w_range), -w_range)
    G_pos = g_min + k * torch.relu(Wc)
    G_neg = g_min + k * torch.relu(-Wc)
    return G_pos, G_neg, k


def interleave_columns(G_pos: torch.Tensor, G_neg: torch.Tensor) -> torch.Tensor:
    """One array with G+ in even and G- in odd columns: ``(..., n, m)`` x2 -> ``(..., n, 2m)``."""
    return torch.stack((G_pos, G_neg), dim=-1).flatten(-2)


def deinterleave_difference(T: torch.Tensor) -> torch.Tensor:
    """Even minus odd columns: the differential output of an interleaved array."""
    return T[..., 0::2] - T[..., 1::2]


def input_voltages(x: torch.Tensor, v_read: float, x_max: float) -> torch.Tensor:
    """Inputs to row voltages, ``V = v_read * x / x_max`` (volts)."""
    return x * (v_read / x_max)


def output_from_currents(I_pos: torch.Tensor, I_neg: torch.Tensor, k, v_read: float, x_max: float) -> torch.Tensor:
    """Differential column currents (A) back to layer outputs: ``(I+ - I-) / (k v_read / x_max)``."""
    return (I_pos - I_neg) / (k * v_read / x_max)
