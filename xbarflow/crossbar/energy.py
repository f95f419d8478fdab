"""The energy of a read: the rows' driving-point admittance Y of a tile (model note, section 10).

A read applies row voltages V to a tile. All the power comes from the row drivers: the
neurons hold their inputs at 0 V and absorb none. Source i pushes ``J_i`` through ``r_source``;
the circuit is linear and reciprocal, so ``J = Y V`` with Y (``rows x rows``, siemens) symmetric
positive semi-definite, and a read of duration ``t_read`` costs

    E = t_read * sum_i V_i J_i = t_read * V^T Y V

dissipated in the source, device, wire and sink resistances.

**Without wire resistance** (each row one node ``u_i``, each column one node ``w_j``), with
``r = G 1`` (row sums), ``c = G^T 1`` (column sums), ``D_r = diag(r)``, ``D_c = diag(c)``,
``g_s = 1 / r_source``, ``g_k = 1 / r_sink``:

    column KCL:  G^T u = (D_c + g_k) w          =>  w = (D_c + g_k)^-1 G^T u
    row KCL:     g_s (V - u) = D_r u - G w      =>  u = A^-1 g_s V,  A = g_s + D_r - G (D_c + g_k)^-1 G^T
    J = g_s (V - u)                              =>  Y = g_s I - g_s^2 A^-1

Written so that no resistance is ever divided by: with ``Y_c = D_r - G diag(d) G^T``,
``d_j = r_sink / (1 + r_sink c_j)`` (the admittance the array shows the row nodes, 0 at
``r_sink = 0``), the source resistance in series gives ``Y = (I + r_source Y_c)^-1 Y_c``, which
is ``g_s I - g_s^2 A^-1`` with ``A = g_s + Y_c``. Eliminating the row nodes first instead
(``a_i = 1 / (1 + r_source r_i)``, ``B = I + r_sink (D_c - r_source G^T diag(a) G)``, the
``cols x cols`` system of :mod:`.circuit`) turns the same Y into

    Y = diag(a * r) - r_sink * T diag(a) G^T,     T = diag(a) G B^-1 the transfer matrix,

(Woodbury on ``I + r_source Y_c``; the row-node voltages are ``u = a V + r_source a G w`` and
``J = a r V - a G w`` with ``w = r_sink B^-1 (a G)^T V``), so Y costs the transfer matrix and one
``rows x cols x rows`` product. This is what :func:`source_admittance` computes. Limits, exact:
``r_source = 0``: ``a = 1``, ``Y = D_r - G diag(d) G^T``; ``r_sink = 0`` as well: ``Y = D_r`` and
``E = t_read sum_ij G_ij V_i^2``; ``r_sink = 0`` alone: ``Y = diag(r / (1 + r_source r))``.

**With wire resistance** Y comes from the nested-dissection solver's elimination of the
``2 rows cols`` nodes (:func:`.wire_nd.source_admittance_wire_nd`): after the last level only
the sources and sinks remain, and their exact port conductances ``W`` (sinks at 0 V) give
``Y = diag(W[L, :] 1) - W[L, L]``. The sweep solver (:mod:`.wire`) eliminates towards the sinks
and keeps no description of the source ports, so Y always takes the nested-dissection route
(both solvers are exact; Y is computed once per tile and chip).

**A layer** on a grid of tiles: the tiles of grid row ``r`` all see the inputs of that row's
slice of the fan-in (padding rows at 0 V), so with ``Y_r`` the sum of the admittances of those
tiles (both arrays of a separate differential pair: ``Y+ + Y-``; an interleaved array holds
both columns of a pair) the energy of a read is ``t_read sum_r V_r^T Y_r V_r``. Over many reads
``E[V^T Y V] = trace(Y E[V V^T])``: accumulate the inputs' second moments
(:func:`second_moments`, a product per batch) and take the trace once (:func:`array_energy`).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Tuple

import torch

from .circuit import check_conductance, check_resistance, transfer_columns_merged, transfer_matrix
from .effective import _low_rank_ok, _merges_padding, device_conductances
from .mapping import deinterleave_difference
from .spec import CrossbarSpec
from .tiling import from_tiles
from .variation import Chip

__all__ = ["source_admittance", "read_power", "layer_admittance", "layer_read_model", "ReadModel", "second_moments",
           "array_energy"]


def source_admittance(G: torch.Tensor, *, r_source: float, r_sink: float, r_wire: float = 0.0) -> torch.Tensor:
    """Driving-point admittance of the rows of crossbar tiles: ``J = Y V`` (no gradient).

    Args:
        G: conductances in siemens, ``(..., rows, cols)``; leading dimensions batch over tiles.
        r_source, r_sink, r_wire: ohm (``>= 0``), as in :func:`.circuit.transfer_matrix`.

    Returns:
        Y in siemens, ``(..., rows, rows)``, symmetric positive semi-definite, dtype of G;
        ``J_i`` (A) is the current source i pushes through ``r_source`` for row voltages V.
    """
    check_conductance("G", G)
    r_source = check_resistance("r_source", r_source)
    r_sink = check_resistance("r_sink", r_sink)
    r_wire = check_resistance("r_wire", r_wire)
    with torch.no_grad():
        G = G.detach()
        if r_wire > 0.0:
            from .wire_nd import source_admittance_wire_nd

            return source_admittance_wire_nd(G, r_source=r_source, r_sink=r_sink, r_wire=r_wire)
        r = G.sum(-1)
        a = 1.0 / (1.0 + r_source * r)
        Y = torch.diag_embed(a * r)
        if r_sink == 0.0:
            return Y
        T = transfer_matrix(G, r_source=r_source, r_sink=r_sink)
        aG = a.unsqueeze(-1) * G
        Y = Y - r_sink * (T @ aG.mT)
        return 0.5 * (Y + Y.mT)  # symmetric in exact arithmetic; rounding made equal on both sides


def read_power(G: torch.Tensor, V: torch.Tensor, *, r_source: float, r_sink: float, r_wire: float = 0.0) -> torch.Tensor:
    """Power (W) the row drivers deliver to tiles during a read, ``V^T Y V`` per read.

    Args:
        G: conductances in siemens, ``(..., rows, cols)``.
        V: row voltages in volts, ``(..., batch, rows)``; leading dimensions broadcast against G's.

    Returns:
        ``(..., batch)`` in watts.
    """
    Y = source_admittance(G, r_source=r_source, r_sink=r_sink, r_wire=r_wire)
    return ((V @ Y) * V).sum(-1)


def layer_admittance(W: torch.Tensor, spec: CrossbarSpec, chip: Optional[Chip] = None, name: str = "") -> torch.Tensor:
    """The summed admittance ``Y_r`` of each grid row of a layer's tiles, ``(n_r, rows, rows)`` (S).

    Args:
        W: software weights ``(fan_in, fan_out)``, mapped and tiled as the layer programs them
            (:func:`.effective.device_conductances`: levels, and a chip's devices at its first read).
        spec: the layer's arrays and circuit.
        chip: a drawn chip, or ``None`` for the nominal devices.
        name: the layer's name on the chip.

    Returns:
        ``Y_r = sum over the grid row's tiles (and over G+ and G- for separate arrays)``: the
        energy of a read with tile-row voltages ``V_r`` is ``t_read sum_r V_r^T Y_r V_r``.
    """
    return layer_read_model(W, spec, chip, name).admittance


class ReadModel(NamedTuple):
    """A layer's effective weight and admittances from one solve of its tiles (:func:`layer_read_model`)."""

    weight: torch.Tensor       # W_eff, (fan_in, fan_out)
    admittance: torch.Tensor   # Y_r per grid row, (n_r, rows, rows), siemens
    exact: bool                # weight is bitwise what effective.effective_weight gives (the same solves)


def layer_read_model(W: torch.Tensor, spec: CrossbarSpec, chip: Optional[Chip] = None, name: str = "") -> ReadModel:
    """The layer's effective weight and its grid rows' admittances from one solve of every tile.

    Every tile's transfer matrix T is needed for both, so the energy of a layer costs one solve
    of its circuit, which also gives the effective weight. The tiles are solved as
    :func:`.effective.effective_weight` solves them wherever that gives every column of T (a
    narrow layer's identical padded columns merged into one, the other tile columns in one
    call): there the weight is bitwise the same (``exact``), and a layer may keep it as its
    effective weight. With wire resistance, Y and T both come from the nested dissection
    (the effective weight may use the sweep), and a padded last tile column that the effective
    weight solves by its low-rank path is solved whole here: equal up to rounding, not exact.

    Returns:
        :class:`ReadModel`: ``(fan_in, fan_out)`` (see :func:`.effective.effective_weight`, at read 0
        of a chip) and ``(n_r, rows, rows)`` in siemens (see :func:`layer_admittance`). No gradient.
    """
    fan_in, fan_out = W.shape
    W = W.detach()
    out_cols = 2 * fan_out if spec.mapping == "interleaved" else fan_out
    with torch.no_grad():
        if chip is None and out_cols < spec.cols and _merges_padding(spec, out_cols):
            # one tile column whose padded columns (all g_min) are identical: merged into one, as the
            # effective weight does (transfer_columns_merged); its transfer stands for all of them
            G, k = device_conductances(W, spec, None, name, cols=out_cols + 1)
            G = G.unsqueeze(0) if spec.mapping == "interleaved" else G
            check_conductance("G", G)
            T, Y = _merged(G, spec.cols - out_cols, spec)
            exact = True
        else:
            G, k = device_conductances(W, spec, chip, name)
            G = G.unsqueeze(0) if spec.mapping == "interleaved" else G     # (arrays, n_r, n_c, rows, cols)
            check_conductance("G", G)
            n_c, cols = G.shape[2], G.shape[4]
            used = out_cols - (n_c - 1) * cols                                # columns of the last tile column
            if spec.r_wire > 0.0:
                from .wire_nd import transfer_and_admittance_wire_nd

                T, Y = transfer_and_admittance_wire_nd(G, r_source=spec.r_source, r_sink=spec.r_sink,
                                                       r_wire=spec.r_wire)
                Y = Y.sum((0, 2))          # over the arrays (G+, G-) and the tiles of a grid row
                exact = False
            elif chip is None and 4 * used <= cols and _merges_padding(spec, used):
                # as effective._tiles_transfer: the last tile column merged, the others in one call
                G_last = G[:, :, n_c - 1:, :, :used + 1]
                check_conductance("G", G_last)
                T_last, Y = _merged(G_last, cols - used, spec)
                T = transfer_matrix(G[:, :, :n_c - 1], r_source=spec.r_source, r_sink=spec.r_sink)
                Y = Y + _rows_admittance(G[:, :, :n_c - 1], T, G[:, :, :n_c - 1].sum(-1), spec)
                T = torch.cat((T, torch.nn.functional.pad(T_last, (0, cols - used))), dim=2)
                exact = True
            else:
                T = transfer_matrix(G, r_source=spec.r_source, r_sink=spec.r_sink)
                Y = _rows_admittance(G, T, G.sum(-1), spec)
                # effective_weight solves only the used columns of a narrow last tile column
                # where its low-rank path applies
                exact = 4 * used > cols or not _low_rank_ok(spec)
        if spec.mapping == "interleaved":
            W_eff = deinterleave_difference(from_tiles(T[0], fan_in, out_cols)) / k
        else:
            W_eff = from_tiles(T[0] - T[1], fan_in, fan_out) / k
        return ReadModel(W_eff, Y, exact)


def _merged(G: torch.Tensor, copies: int, spec: CrossbarSpec) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(T of the used columns, Y)`` of tiles ``(arrays, n_r, 1, rows, used + 1)`` whose last column
    stands for ``copies`` identical ones (:func:`.circuit.transfer_columns_merged`)."""
    T = transfer_columns_merged(G, copies, r_source=spec.r_source, r_sink=spec.r_sink, keep_merged=True)
    # the merged column as the circuit sees it: copies x the conductances of one of them
    G_red = torch.cat((G[..., :-1], G[..., -1:] * copies), dim=-1)
    return T[..., :-1], _rows_admittance(G_red, T, G_red.sum(-1), spec)


def _rows_admittance(G: torch.Tensor, T: torch.Tensor, r: torch.Tensor, spec: CrossbarSpec) -> torch.Tensor:
    """``Y_r = sum over arrays and tiles of diag(a r) - r_sink T (aG)^T`` without wire, ``(n_r, rows, rows)``.

    ``G`` and ``T``: ``(arrays, n_r, n_c, rows, K)``; ``r``: the tiles' row sums. A merged column of
    ``m`` identical ones enters with ``m`` times their conductances in G and the transfer of one of
    them in T (their terms of the sum are equal). The sum of the products is one product with the
    tiles side by side (inner size arrays x n_c x K).
    """
    n_r, rows = G.shape[1], G.shape[3]
    a = 1.0 / (1.0 + spec.r_source * r)
    Y = torch.diag_embed((a * r).sum((0, 2)))
    if spec.r_sink > 0.0:
        aG = a.unsqueeze(-1) * G

        def side_by_side(X: torch.Tensor) -> torch.Tensor:   # (arrays, n_r, n_c, rows, K) -> (n_r, rows, .)
            return X.permute(1, 3, 0, 2, 4).reshape(n_r, rows, -1)

        Y.baddbmm_(side_by_side(T), side_by_side(aG).mT, alpha=-spec.r_sink)
    return Y


def second_moments(V: torch.Tensor, rows: int) -> torch.Tensor:
    """``sum over reads of V_r V_r^T`` per grid row of tiles, ``(n_r, rows, rows)``.

    Args:
        V: row voltages of the reads, ``(reads, fan_in)`` (V); the last grid row is padded with
            rows at 0 V.
        rows: word lines per tile.
    """
    reads, fan_in = V.shape
    n_r = math.ceil(fan_in / rows)
    pad = n_r * rows - fan_in
    Vp = torch.nn.functional.pad(V, (0, pad)) if pad else V
    Vr = Vp.reshape(reads, n_r, rows).transpose(0, 1)          # (n_r, reads, rows)
    return Vr.mT @ Vr


def array_energy(Y: torch.Tensor, M: torch.Tensor, t_read: float) -> float:
    """``t_read * sum_r trace(Y_r M_r)`` in joules: the array energy of the reads whose second
    moments are ``M`` (:func:`second_moments`), with ``Y`` from :func:`layer_admittance`."""
    return float(t_read) * float((Y.to(M.dtype) * M).sum())
