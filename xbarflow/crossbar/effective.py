"""A layer's effective weight: mapping, tiling, chip and circuit in one function.

The whole non-ideal layer is linear in its inputs, so it equals an ordinary layer
whose weight is assembled from the tiles' transfer matrices. That weight is
computed once per weight update (training) or per chip (evaluation); the layer's
forward pass is then an ordinary matmul.

The device pipeline (:func:`device_conductances`) is, in this order: programming
(mapping, tiling, with ``spec.stuck_compensation`` the partners of the chip's stuck devices
retargeted, rounding to ``spec.levels``), the chip's programming error (c2c,
d2d), stuck cells, drift to ``chip.time``, and the conductances of one read (read
noise); then the circuit. Without levels and without a chip's device effects each
step is the identity and costs nothing. With ADC the layer's forward pass is done
tile row by tile row (:func:`adc_apply`); the effective weight is the same.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from .circuit import apply_transfer, check_conductance, transfer_columns, transfer_columns_merged, transfer_matrix
from .devices import compensate_stuck_pairs, quantize_levels
from .mapping import conductance_pair, deinterleave_difference, interleave_columns, pair_partner, tiled_conductance_pair
from .peripherals import adc_quantize
from .spec import CrossbarSpec
from .tiling import from_tiles, to_tiles
from .variation import Chip


def physical_arrays(W: torch.Tensor, spec: CrossbarSpec, cols: Optional[int] = None):
    """Programmed conductances of a layer, tile by tile.

    Args:
        W: weights, shape ``(fan_in, fan_out)``.
        cols: tile width to cut the arrays into (default ``spec.cols``). A layer that fits
            in one tile column may be cut narrower: its padded columns hold ``g_min``.

    Returns:
        ``(G, k)``: G in siemens, shape ``(2, n_r, n_c, rows, cols)`` for separate
        arrays (index 0 holds G+, 1 holds G-) or ``(n_r, n_c, rows, cols)`` for
        interleaved columns; k the mapping scale in siemens per unit weight.
    """
    cols = spec.cols if cols is None else cols
    if spec.mapping != "interleaved":
        return tiled_conductance_pair(W, spec.g_min, spec.g_max, spec.rows, cols, spec.w_max)
    G_pos, G_neg, k = conductance_pair(W, spec.g_min, spec.g_max, spec.w_max)
    return to_tiles(interleave_columns(G_pos, G_neg), spec.rows, cols, pad_value=spec.g_min), k


def device_conductances(W: torch.Tensor, spec: CrossbarSpec, chip: Optional[Chip] = None, name: str = "",
                        read: int = 0, cols: Optional[int] = None):
    """The conductances one read of the layer's arrays sees, tile by tile.

    Args:
        W: weights, shape ``(fan_in, fan_out)``.
        spec: arrays of the layer (``levels``: programming precision).
        chip: a drawn chip (variation, stuck cells, drift at ``chip.time``, read
            noise), or ``None`` for the nominal devices.
        name: the layer's stable name; selects its devices on the chip.
        read: number of this read of the layer on this chip (read noise only).
        cols: tile width, as in :func:`physical_arrays` (nominal devices only: a chip's
            devices are drawn for the arrays as built).

    Returns:
        ``(G, k)`` as :func:`physical_arrays`. Differentiable in W (rounding to
        levels by straight-through estimator; stuck devices have no gradient).
    """
    if chip is not None and cols not in (None, spec.cols):
        raise ValueError("device_conductances: a chip's devices need the arrays' own width (cols=None)")
    G, k = physical_arrays(W, spec, cols)
    if chip is not None and spec.stuck_compensation:
        stuck = chip.stuck_conductances(G, name, spec.g_min, spec.g_max)
        if stuck is not None:
            G = compensate_stuck_pairs(G, stuck, lambda x: pair_partner(x, spec.mapping), spec.g_min, spec.g_max)
    if spec.levels is not None:
        G = quantize_levels(G, spec.levels, spec.g_min, spec.g_max)
    if chip is not None:
        G = chip.devices(G, name, spec.g_min, spec.g_max)
        G = chip.read(G, name, read)
    return G, k


def effective_weight(
    W: torch.Tensor, spec: CrossbarSpec, chip: Optional[Chip] = None, name: str = "", read: int = 0
) -> torch.Tensor:
    """The weight matrix the non-ideal crossbar layer actually applies.

    Args:
        W: software weights, shape ``(fan_in, fan_out)``, dimensionless.
        spec: arrays and circuit of the layer.
        chip: a drawn chip (variation), or ``None`` for the nominal devices.
        name: the layer's stable name; selects its devices on the chip.
        read: number of this read (read noise draws afresh for every read).

    Returns:
        ``W_eff``, shape ``(fan_in, fan_out)``, with ``y = x @ W_eff`` equal to the
        crossbar's rescaled differential output ``(I+ - I-) / (k v_read / x_max)``
        (v_read and x_max cancel: the circuit is linear). Differentiable in W.
        Equals ``clip(W, -w_max, w_max)`` for an ideal circuit without variation.
    """
    fan_in, fan_out = W.shape
    out_cols = 2 * fan_out if spec.mapping == "interleaved" else fan_out
    if chip is None and out_cols < spec.cols and _merges_padding(spec, out_cols):
        # nominal devices, one tile column: its padded columns all hold g_min, so only one of
        # them is programmed (tiles out_cols + 1 wide) and it stands for all of them
        G, k = device_conductances(W, spec, None, name, read, cols=out_cols + 1)
        check_conductance("G", G)
        T = transfer_columns_merged(G, spec.cols - out_cols, r_source=spec.r_source, r_sink=spec.r_sink)
    else:
        G, k = device_conductances(W, spec, chip, name, read)
        # nominal devices: every padded cell holds g_min (weight 0), so padded columns are identical
        T = _tiles_transfer(G, spec, out_cols, uniform_padding=chip is None)
    if spec.mapping == "interleaved":
        T = deinterleave_difference(from_tiles(T, fan_in, 2 * fan_out))
        return T / k
    return _Differential.apply(T, k, fan_in, fan_out)


class _Differential(torch.autograd.Function):
    """``(T[0] - T[1]) / k`` of stacked tiles ``(2, n_r, n_c, rows, cols)``, assembled into the
    ``(fan_in, fan_out)`` matrix: the differential output per unit weight.

    The difference is written straight into the matrix layout (no :func:`from_tiles` copy),
    and the backward writes the two halves of the tiles' gradient directly (autograd's
    ``select`` and ``transpose`` backwards would zero-fill and copy full-size tensors).
    ``k`` gets no gradient: the mapping's range is a constant or ``max |W|`` taken without
    gradient.
    """

    @staticmethod
    def forward(ctx, T, k, fan_in: int, fan_out: int):
        n_r, n_c, rows, cols = T.shape[-4:]
        full = T.new_empty(n_r * rows, n_c * cols)
        torch.sub(T[0], T[1], out=full.view(n_r, rows, n_c, cols).permute(0, 2, 1, 3))
        ctx.save_for_backward(k)
        ctx.tiles = (n_r, n_c, rows, cols)
        W_eff = full[:fan_in, :fan_out]  # padded rows and columns are dropped
        return W_eff.div_(k)

    @staticmethod
    def backward(ctx, grad):
        (k,) = ctx.saved_tensors
        n_r, n_c, rows, cols = ctx.tiles
        pad_r, pad_c = n_r * rows - grad.shape[0], n_c * cols - grad.shape[1]
        if pad_r or pad_c:  # padded cells feed dropped outputs: no gradient
            grad = torch.nn.functional.pad(grad, (0, pad_c, 0, pad_r))
        out = grad.new_empty(2, n_r, n_c, rows, cols)
        torch.div(grad.reshape(n_r, rows, n_c, cols).permute(0, 2, 1, 3), k, out=out[0])
        torch.neg(out[0], out=out[1])
        return out, None, None, None


def _low_rank_ok(spec: CrossbarSpec) -> bool:
    """The Cholesky-factor paths of :mod:`.circuit` apply (no wire, both resistances, cols <= rows)."""
    return spec.r_wire == 0.0 and spec.r_source > 0.0 and spec.r_sink > 0.0 and spec.cols <= spec.rows


def _merges_padding(spec: CrossbarSpec, used: int) -> bool:
    """Whether a tile that reads ``used`` of its columns solves them with its identical padded
    columns merged into one (:func:`transfer_columns_merged`): few used columns, no wire
    (the merge needs equipotential columns' symmetry, which wire breaks along the rows),
    and a system smaller than the tile's."""
    # below ~cols/4 used columns a separate, smaller solve of the last grid column outweighs
    # the extra calls and copies
    return (4 * used <= spec.cols and spec.r_wire == 0.0 and (spec.r_source > 0.0 or spec.r_sink > 0.0)
            and used + 1 <= spec.rows)


def _tiles_transfer(G: torch.Tensor, spec: CrossbarSpec, out_cols: int, uniform_padding: bool = False) -> torch.Tensor:
    """Transfer matrices of tiles ``(..., n_r, n_c, rows, cols)``; the padded columns of the
    last grid column may be left out (their outputs are dropped by ``from_tiles``).

    When the last grid column uses few of its columns (a 500x10 layer on a 784x500
    array uses 10 of 500), its padded columns still load every row, but their currents
    are not read. If they are identical (``uniform_padding``: nominal devices, where
    every padded cell holds ``g_min``), they share one voltage and are merged exactly
    into one column of ``m`` times their conductance and ``m`` times the sink
    conductance: a ``used + 1`` column system instead of ``cols``. Otherwise those tiles
    go through :func:`transfer_columns`, which skips the inverse and the unused columns:
    exact, and ``O(cols^3)`` cheaper per tile.
    """
    n_c, cols = G.shape[-3], G.shape[-1]
    used = out_cols - (n_c - 1) * cols
    rs, rk = spec.r_source, spec.r_sink
    if 4 * used > cols:
        return transfer_matrix(G, r_source=rs, r_sink=rk, r_wire=spec.r_wire)
    if uniform_padding and _merges_padding(spec, used):
        G_last = G[..., n_c - 1:, :, : used + 1]  # the used columns and one of the identical padded ones
        check_conductance("G", G_last)
        last = transfer_columns_merged(G_last, cols - used, r_source=rs, r_sink=rk)
    elif _low_rank_ok(spec):
        check_conductance("G", G)
        last = transfer_columns(G[..., n_c - 1:, :, :], used, r_source=rs, r_sink=rk)
    else:
        return transfer_matrix(G, r_source=rs, r_sink=rk, r_wire=spec.r_wire)
    last = torch.nn.functional.pad(last, (0, cols - used))  # dropped by from_tiles
    if n_c == 1:
        return last
    full = transfer_matrix(G[..., : n_c - 1, :, :], r_source=rs, r_sink=rk)
    return torch.cat((full, last), dim=-3)


def fused_is_cheaper(batch: int, spec: CrossbarSpec, fan_out: int) -> bool:
    """Whether :func:`effective_apply` beats ``x @ effective_weight(...)`` for ``batch`` inputs.

    The fused path's products have inner size ``batch`` where the explicit path's have
    the number of used columns (``cols``, or fewer for a narrow layer, see
    :func:`_tiles_transfer`). Its Cholesky solves run in LAPACK, which on CPU is slow
    for batches of small tiles, so it is used only for large tiles and a batch well
    below the used width.
    """
    out_cols = 2 * fan_out if spec.mapping == "interleaved" else fan_out
    return _low_rank_ok(spec) and spec.cols >= 128 and 2 * batch <= min(spec.cols, out_cols)


def effective_apply(
    x: torch.Tensor, W: torch.Tensor, spec: CrossbarSpec, chip: Optional[Chip] = None, name: str = "",
    read: int = 0,
) -> torch.Tensor:
    """``x @ effective_weight(W, spec, chip, name)`` without forming the effective weight.

    Args:
        x: inputs, shape ``(batch, fan_in)``.
        W: software weights, shape ``(fan_in, fan_out)``.

    Returns:
        ``(batch, fan_out)``: the crossbar's rescaled differential output. Exact (the
        same circuit, evaluated through each tile's Cholesky factor); differentiable
        in x and W. Needs ``_low_rank_ok(spec)``; worth it when
        :func:`fused_is_cheaper` says so (training steps on large tiles).
    """
    if not _low_rank_ok(spec):
        raise ValueError("effective_apply needs r_wire = 0, r_source > 0, r_sink > 0 and cols <= rows")
    fan_in, fan_out = W.shape
    batch = x.shape[0]
    G, k = device_conductances(W, spec, chip, name, read)
    extremes = check_conductance("G", G)
    n_r, n_c, rows, cols = G.shape[-4:]
    # inputs of padded rows are 0 V
    xp = torch.nn.functional.pad(x, (0, n_r * rows - fan_in)) if n_r * rows != fan_in else x
    U = xp.reshape(batch, n_r, rows).transpose(0, 1).unsqueeze(1)          # (n_r, 1, batch, rows)
    Y = apply_transfer(U, G, r_source=spec.r_source, r_sink=spec.r_sink, extremes=extremes)  # (.., n_r, n_c, batch, cols)
    Y = Y.sum(-4)                                                          # tiles sharing outputs add up
    Y = Y.transpose(-3, -2).reshape(*Y.shape[:-3], batch, n_c * cols)
    if spec.mapping == "interleaved":
        Y = deinterleave_difference(Y[..., : 2 * fan_out])
    else:
        Y = Y[0, :, :fan_out] - Y[1, :, :fan_out]
    return Y / k


def tile_partials(x: torch.Tensor, W_eff: torch.Tensor, rows: int) -> torch.Tensor:
    """Each tile row's partial output, before the digital sum over the tiles that share outputs.

    Tiles in one grid row share their inputs; each output column is read by its own converter,
    so only the split of the fan-in over tile rows matters: partial ``r`` is ``x_r @ W_eff_r``,
    ``x_r`` the inputs of tile row ``r`` and ``W_eff_r`` its rows of the effective weight
    (exactly the tiles' transfer matrices, see :func:`effective_weight`).

    Args:
        x: inputs, shape ``(batch, fan_in)``.
        W_eff: effective weight, shape ``(fan_in, fan_out)``.
        rows: word lines per tile.

    Returns:
        ``(n_r, batch, fan_out)``, in layer-output units.
    """
    fan_in, fan_out = W_eff.shape
    n_r = math.ceil(fan_in / rows)
    if n_r == 1:  # one tile row: no padding (a 9-input conv on 4096-row tiles would copy x 455 times)
        return (x @ W_eff).unsqueeze(0)
    pad = n_r * rows - fan_in
    xp = F.pad(x, (0, pad)) if pad else x
    Wp = F.pad(W_eff, (0, 0, 0, pad)) if pad else W_eff
    return torch.bmm(xp.reshape(-1, n_r, rows).transpose(0, 1), Wp.reshape(n_r, rows, fan_out))


def outputs_per_tile(spec: CrossbarSpec) -> int:
    """Layer outputs one tile holds: its columns, or half of them with interleaved columns (G+, G-)."""
    return spec.cols // 2 if spec.mapping == "interleaved" else spec.cols


def outputs_per_adc_range(spec: CrossbarSpec) -> int:
    """Layer outputs that share one ADC range: a tile's, or 1 (per column pair), by ``spec.adc_granularity``."""
    return 1 if spec.adc_granularity == "column" else outputs_per_tile(spec)


def adc_groups(fan_in: int, fan_out: int, spec: CrossbarSpec) -> tuple:
    """Shape ``(n_r, n_groups)`` of a layer's ADC ranges: one per tile (``n_groups`` tiles along
    the fan-out) or one per column pair (``n_groups = fan_out``), by ``spec.adc_granularity``."""
    return math.ceil(fan_in / spec.rows), math.ceil(fan_out / outputs_per_adc_range(spec))


def adc_range_per_output(adc_range: torch.Tensor, fan_out: int, spec: CrossbarSpec) -> torch.Tensor:
    """Ranges ``(n_r, n_groups)`` -> one per tile row and output, ``(n_r, 1, fan_out)``."""
    if adc_range.shape[-1] != fan_out:  # one per tile: every output of the tile shares it
        adc_range = adc_range.repeat_interleave(outputs_per_tile(spec), dim=-1)[..., :fan_out]
    return adc_range.unsqueeze(-2)


def output_full_scale(spec: CrossbarSpec, w_range: torch.Tensor, x_max) -> torch.Tensor:
    """The largest differential current of a tile, ``rows (g_max - g_min) v_read``, in layer-output
    units: ``rows * w_range * x_max`` (broadcasts like ``x_max``, ``(batch, 1)`` or scalar)."""
    return spec.rows * w_range * x_max


# Without a gradient (evaluation), at most this many partial outputs are formed and converted at
# once: the reads go through in chunks, with the same result to rounding (each read is converted on
# its own; a product of another shape may round a partial output's float32 sum differently in the
# last bit, and so move it across a code boundary), and memory and cache footprint stay bounded
# instead of growing with n_r x batch x fan_out.
ADC_CHUNK_PARTIALS = 1 << 20


def adc_reads_per_chunk(fan_in: int, fan_out: int, spec: CrossbarSpec) -> int:
    """Reads (rows of ``x``) whose partial outputs :func:`adc_apply` converts at once without a gradient."""
    return max(1, ADC_CHUNK_PARTIALS // (math.ceil(fan_in / spec.rows) * fan_out))


def adc_apply(x: torch.Tensor, W_eff: torch.Tensor, spec: CrossbarSpec, w_range: torch.Tensor,
              x_max: torch.Tensor, adc_range: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The layer's output with each tile's partial output through the column ADCs.

    ``y = sum_r ADC(x_r @ W_eff_r)`` over the tile rows (:func:`tile_partials`): the digital
    sum comes after conversion.

    Args:
        x: inputs after the DAC, shape ``(batch, fan_in)``.
        W_eff: effective weight, shape ``(fan_in, fan_out)``.
        w_range: the layer's weight range (``w_max``; scalar tensor).
        x_max: input scale per sample, shape ``(batch, 1)`` or scalar.
        adc_range: full scale of each converter as a fraction of the tile's largest
            differential current, shape ``(n_r, n_groups)`` (:func:`adc_groups`); ``None``
            uses ``spec.adc_range`` for all.

    Returns:
        ``(batch, fan_out)``. Gradient: straight through, or LSQ's when ``adc_range``
        requires a gradient (see :func:`~.peripherals.adc_quantize`).
    """
    per_chunk = adc_reads_per_chunk(W_eff.shape[0], W_eff.shape[1], spec)
    if torch.is_grad_enabled() or x.shape[0] <= per_chunk:
        return _adc_apply(x, W_eff, spec, w_range, x_max, adc_range)
    y = x.new_empty(x.shape[0], W_eff.shape[1])
    for i in range(0, x.shape[0], per_chunk):
        xm = x_max[i:i + per_chunk] if x_max.dim() else x_max
        y[i:i + per_chunk] = _adc_apply(x[i:i + per_chunk], W_eff, spec, w_range, xm, adc_range)
    return y


def _adc_apply(x: torch.Tensor, W_eff: torch.Tensor, spec: CrossbarSpec, w_range: torch.Tensor,
               x_max: torch.Tensor, adc_range: Optional[torch.Tensor] = None) -> torch.Tensor:
    """:func:`adc_apply` on all of ``x`` at once."""
    fan_out = W_eff.shape[1]
    Y = tile_partials(x, W_eff, spec.rows)                                  # (n_r, batch, fan_out)
    frac = spec.adc_range if adc_range is None else adc_range_per_output(adc_range, fan_out, spec)
    assert spec.adc_bits is not None, "adc_apply needs a spec with adc_bits"
    # full scale in output units: frac of the tile's largest current, which scales with x_max
    return adc_quantize(Y, spec.adc_bits, frac, output_full_scale(spec, w_range, x_max)).sum(0)
