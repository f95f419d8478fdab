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
        ``G_pos - G_neg = k * clip(W, -w_max, w_max)``. Gradient: ``dG+/dW = k`` on
        ``0 < W <= w_max`` and ``dG-/dW = -k`` on ``-w_max <= W < 0`` (the largest |W|
        keeps its gradient), the mean of the two one-sided derivatives at ``W = 0``
        (``k/2`` and ``-k/2``), and 0 beyond ``w_max``.
    """
    fan_in, fan_out = W.shape
    G, k = tiled_conductance_pair(W, g_min, g_max, fan_in, fan_out, w_max)  # one tile: the same rule
    return G[0, 0, 0], G[1, 0, 0], k


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


def _grid_parts(n: int, size: int, tiles: int):
    """Split ``n`` weights along one side into at most two runs of tiles: the full tiles, and
    the last tile's used part. Yields ``(tile slice, slice within the tile, first, last weight)``."""
    last = n - (tiles - 1) * size
    if last == size:
        yield slice(0, tiles), slice(0, size), 0, n
        return
    if tiles > 1:
        yield slice(0, tiles - 1), slice(0, size), 0, (tiles - 1) * size
    yield slice(tiles - 1, tiles), slice(0, last), (tiles - 1) * size, n


def _weight_blocks(W: torch.Tensor, G: torch.Tensor):
    """Pairs of views ``(W block, tile block)`` over the cells that hold weights, in matching
    ``(tile rows, rows, tile cols, cols)`` order; the padded cells are in none of them.

    W: ``(fan_in, fan_out)``; G: one array's tiles ``(n_r, n_c, rows, cols)``. At most four
    pairs (full tiles and the partial last tile row / column).
    """
    fan_in, fan_out = W.shape
    n_r, n_c, rows, cols = G.shape
    for tr, ra, r0, r1 in _grid_parts(fan_in, rows, n_r):
        for tc, ca, c0, c1 in _grid_parts(fan_out, cols, n_c):
            Wb = W[r0:r1, c0:c1].reshape(tr.stop - tr.start, ra.stop, tc.stop - tc.start, ca.stop)
            yield Wb, G[tr, tc, ra, ca].permute(0, 2, 1, 3)


class _TiledPair(torch.autograd.Function):
    """:func:`conductance_pair`, stacked and cut into tiles, in one Function (see :func:`tiled_conductance_pair`).

    Only the cells that hold weights are computed (forward) and differentiated (backward);
    padded cells are filled with ``g_min`` (weight 0) and get no gradient, as their weights
    do not exist. A 500x10 layer on one 784x500 array touches 5,000 cells, not 392,000.
    """

    @staticmethod
    def forward(ctx, W, w_range, g_min: float, g_max: float, rows: int, cols: int, may_clip: bool):
        fan_in, fan_out = W.shape
        n_r, n_c = -(-fan_in // rows), -(-fan_out // cols)
        k = (g_max - g_min) / w_range
        G = W.new_empty(2, n_r, n_c, rows, cols)
        if n_r * rows != fan_in or n_c * cols != fan_out:
            G.fill_(g_min)  # padded cells: weight 0 (cheaper than writing the real ones twice)
        g0 = W.new_full((), g_min)  # a fill on the device, no host copy
        # written straight into the contiguous tile layout, so no later product copies G;
        # two passes per array: g_min + k W (one fused op), then the clamp to the device range
        for Wb, pos in _weight_blocks(W, G[0]):
            torch.addcmul(g0, Wb, k, out=pos).clamp_(g_min, g_max)
        for Wb, neg in _weight_blocks(W, G[1]):
            torch.addcmul(g0, Wb, -k, out=neg).clamp_(g_min, g_max)
        ctx.save_for_backward(W, w_range, k)
        ctx.may_clip = may_clip
        return G

    @staticmethod
    def backward(ctx, grad_G):
        W, w_range, k = ctx.saved_tensors
        # dG+/dW = k for W > 0, dG-/dW = -k for W < 0, the mean of the two one-sided derivatives
        # at W = 0, and 0 beyond a fixed w_max: with h = k (1 + sign W) / 2 in {0, k/2, k},
        # grad = g+ h + g- (h - k), exact where h is 0 or k. Float arithmetic only: on CPU,
        # comparisons and where() cost several times a float pass.
        grad_W = torch.empty_like(W, memory_format=torch.contiguous_format)
        half_k = 0.5 * k
        for (Wb, gpos), (_, gneg), (gW, _) in zip(_weight_blocks(W, grad_G[0]), _weight_blocks(W, grad_G[1]),
                                                   _weight_blocks(grad_W, grad_G[0]), strict=True):
            h = torch.sign(Wb).mul_(half_k).add_(half_k)
            torch.mul(gpos, h, out=gW).addcmul_(gneg, h.sub_(k))
            if ctx.may_clip:  # w_range is a fixed w_max, which some weights may exceed
                gW.mul_(Wb.abs() <= w_range)
        return grad_W, None, None, None, None, None, None


def tiled_conductance_pair(W: torch.Tensor, g_min: float, g_max: float, rows: int, cols: int,
                           w_max: Optional[float] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`conductance_pair` of W, stacked (G+ then G-) and cut into ``rows x cols`` tiles.

    Equals ``to_tiles(torch.stack(conductance_pair(W, ...)[:2]), rows, cols, pad_value=g_min)``
    (:func:`conductance_pair` is this Function on one tile), with the gradient documented
    there. Two passes per array forward and six for the gradient, over the weight cells
    only; the result is contiguous in the tile layout (the batched products downstream
    need no copy).

    Args:
        W: weights, shape ``(fan_in, fan_out)``, dimensionless (any strides).

    Returns:
        ``(G, k)``: G in siemens, shape ``(2, n_r, n_c, rows, cols)``; k in siemens per unit weight.
    """
    # A layer's W is its weight transposed (a view). One copy into W's own row-major layout
    # costs less than the transposed reads in every pass forward and backward.
    W = W.contiguous()
    w_range = weight_range(W, w_max)
    G = _TiledPair.apply(W, w_range, float(g_min), float(g_max), int(rows), int(cols), w_max is not None)
    return G, (g_max - g_min) / w_range


def pair_partner(G: torch.Tensor, mapping: str) -> torch.Tensor:
    """Each device's partner in its differential pair, in the arrays' layout.

    ``separate``: arrays ``(2, n_r, n_c, rows, cols)``, G+ at index 0 and G- at 1: the other
    array's device at the same place. ``interleaved``: ``(..., cols)`` with G+ in even and G-
    in odd columns: the neighbouring column. An involution (applied twice, the identity).
    """
    if mapping == "interleaved":
        return G.unflatten(-1, (G.shape[-1] // 2, 2)).flip(-1).flatten(-2)
    if G.dim() != 5 or G.shape[0] != 2:
        raise ValueError(f"separate arrays have shape (2, n_r, n_c, rows, cols) (got {tuple(G.shape)})")
    return G.flip(0)
