"""Exact transfer matrix of crossbar tiles with wire resistance (full ``2 * rows * cols`` network).

Circuit (``shared/docs/crossbar-model.md`` section 4, every wire segment resistive)::

    V_i --[r_source]-- u_i0 --r_wire-- u_i1 --r_wire-- ... --r_wire-- u_i,cols-1     (row i)
                        |               |                              |
                      G_i0            G_i1                          G_i,cols-1
                        |               |                              |
                       w_i0            w_i1                          w_i,cols-1       (cells of row i)

    w_0j --r_wire-- w_1j --r_wire-- ... --r_wire-- w_rows-1,j --[r_sink]--> 0 V      (column j)

and ``I_j`` is the current into the neuron's virtual ground at the bottom of column j.

Algorithm (direct, exact up to rounding; everything is written in *currents and
resistances*, so no quantity is ever multiplied by ``1 / r_wire`` and the limit
``r_wire -> 0`` is reached smoothly):

1. **Each row as a multi-port.** With the column nodes of row i held at voltages
   ``w_i`` (a ``cols`` vector), the cell currents ``c`` obey
   ``c / G = V_i - K c - w_i`` where ``K[j, l] = r_source + r_wire * min(j, l)`` is
   the resistance the two cells' currents share on their way from the source (the
   row is a tree rooted at the driver). Hence the row delivers
   ``c = y_i V_i - Y_i w_i`` into the column nodes with the Norton admittance
   ``Y_i = (diag(1/G_i) + K)^-1 = (I + diag(G_i) K)^-1 diag(G_i)`` (S, ``cols x cols``,
   symmetric positive semi-definite) and ``y_i = Y_i 1``. ``I + diag(G) K`` is
   well conditioned (its spectrum lies in ``[1, 1 + ||G|| ||K||]``) and finite for
   ``G = 0`` or ``r_source = 0``.
2. **Sweep down the columns.** Let ``(J_i, E_i)`` be the Norton equivalent of rows
   ``0..i`` seen from the column nodes of row i: the current flowing down out of
   ``w_i`` is ``J_i - E_i w_i`` (``E_i``: ``cols x cols`` admittance, ``J_i``:
   ``cols x rows`` injection per unit input). One wire segment in series per column
   gives ``X = (I + r_wire E_i)^-1``, ``E' = X E_i``, ``J' = X J_i``; adding row
   ``i + 1`` gives ``E_{i+1} = E' + Y_{i+1}``, ``J_{i+1} = J' + y_{i+1} e_{i+1}^T``.
   ``I + r_wire E`` has spectrum in ``[1, 1 + r_wire * max column sum of G]``, so
   every step is perfectly conditioned (no cancellation, unlike eliminating the
   tridiagonal node equations, whose ``1 / r_wire`` couplings swamp the cells).
3. **The sink.** ``r_sink`` to ground: ``I_out = (I + r_sink E_last)^-1 J_last``, so
   ``T = I_out^T`` (``r_sink = 0`` gives ``T = J_last^T``).

All ``rows`` unit inputs are carried at once (the columns of J), so the tile's
effective weight T is computed once, never per input. Cost per tile:
about ``rows * cols^3 * 17/3`` flops (``rows`` batched ``cols x cols`` inverses for
step 1, then per row one inverse and two products); when ``cols > rows`` the
reciprocal circuit (transposed and mirrored, ``r_source`` and ``r_sink`` swapped)
is swept instead so the matrices are ``min(rows, cols)`` wide.

Gradients w.r.t. G are exact: the forward pass is a finite sequence of
differentiable tensor operations (inverse, product, sum), and autograd
differentiates it exactly (reverse sweep; each inverse's backward is two products
with the saved inverse, i.e. the factorisation is reused, never recomputed).
"""
from __future__ import annotations

import torch

__all__ = ["transfer_matrix_wire"]


def transfer_matrix_wire(G: torch.Tensor, *, r_source: float, r_sink: float, r_wire: float) -> torch.Tensor:
    """Exact transfer matrix of crossbar tiles whose row and column wires are resistive.

    Args:
        G: device conductances in siemens, shape ``(..., rows, cols)``; leading
            dimensions batch over independent tiles. float32 or float64 (the
            computation runs in this dtype; every step is well conditioned).
        r_source: row driver output resistance, ohm (``>= 0``; ``0`` fixes the
            column-0 row node at the source voltage).
        r_sink: column neuron input resistance, ohm (``>= 0``; ``0`` grounds the
            last-row column node).
        r_wire: resistance of every wire segment between neighbouring cells, ohm
            (``> 0``; arguments are validated by
            :func:`xbarflow.crossbar.circuit.transfer_matrix`).

    Returns:
        T in siemens, shape ``(..., rows, cols)``, dtype of G, with column currents
        ``I = V @ T`` (A) for row source voltages V (V). Differentiable in G.
    """
    rows, cols = G.shape[-2], G.shape[-1]
    if cols > rows:
        # Reciprocity: T[k, j] also equals the current into the source branch of row k
        # when a unit source sits in column j's sink branch. That circuit is the same
        # crossbar transposed and mirrored (its "rows" enter at the old last row, its
        # "sinks" sit at the old column 0), with r_source and r_sink swapped.
        G_rec = G.mT.flip(-1, -2)
        return _sweep(G_rec, float(r_sink), float(r_source), float(r_wire)).mT.flip(-1, -2)
    return _sweep(G, float(r_source), float(r_sink), float(r_wire))


def _row_resistance(cols: int, r_source: float, r_wire: float, like: torch.Tensor) -> torch.Tensor:
    """``K[j, l] = r_source + r_wire * min(j, l)`` (ohm, ``cols x cols``): shared path to the driver."""
    idx = torch.arange(cols, dtype=like.dtype, device=like.device)
    return r_source + r_wire * torch.minimum(idx[:, None], idx[None, :])


def _sweep(G: torch.Tensor, r_source: float, r_sink: float, r_wire: float) -> torch.Tensor:
    """T for ``(..., rows, cols)`` tiles by the row-admittance / column-sweep elimination."""
    rows, cols = G.shape[-2], G.shape[-1]
    eye = torch.eye(cols, dtype=G.dtype, device=G.device)
    K = _row_resistance(cols, r_source, r_wire, G)
    # Step 1: Norton admittance of every row at once, shape (..., rows, cols, cols).
    # (I + diag(G) K)^-1 diag(G): row scaling before, column scaling after the inverse.
    Y = torch.linalg.inv(eye + G.unsqueeze(-1) * K) * G.unsqueeze(-2)
    Y = 0.5 * (Y + Y.mT)  # symmetric in exact arithmetic; keep the rounding symmetric too
    y = Y.sum(-1)  # (..., rows, cols): current per unit source voltage, column nodes grounded

    # Step 2: sweep from row 0 (top of the columns) down to the sink row.
    E = Y[..., 0, :, :]
    J = y[..., 0, :].unsqueeze(-1)  # (..., cols, 1): only inputs 0..i are non-zero so far
    for i in range(1, rows):
        # SPD, spectrum in [1, 1 + r_wire * max column sum of G]. A Cholesky inverse is ~2x
        # faster forward, but autograd's Cholesky backward (triangular solves) was several
        # times slower than inv's backward (two products with the saved X) on CPU.
        X = torch.linalg.inv(eye + r_wire * E)
        XE = X @ E
        E = 0.5 * (XE + XE.mT) + Y[..., i, :, :]
        J = torch.cat((X @ J, y[..., i, :].unsqueeze(-1)), dim=-1)

    # Step 3: the neuron's input resistance to virtual ground.
    if r_sink > 0.0:
        J = torch.linalg.solve(eye + r_sink * E, J)
    return J.mT
