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
from typing import Optional

import torch

from .circuit import check_conductance, check_resistance, transfer_matrix
from .effective import device_conductances
from .spec import CrossbarSpec
from .variation import Chip

__all__ = ["source_admittance", "read_power", "layer_admittance", "second_moments", "array_energy"]


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
    with torch.no_grad():
        G, _ = device_conductances(W.detach(), spec, chip, name)
        Y = source_admittance(G, r_source=spec.r_source, r_sink=spec.r_sink, r_wire=spec.r_wire)
        Y = Y.sum(-3)                      # tiles of one grid row share their inputs
        if spec.mapping != "interleaved":
            Y = Y.sum(0)                   # G+ and G- arrays
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
