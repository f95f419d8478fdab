"""Exact transfer matrix of crossbar tiles with wire resistance (full ``2 * rows * cols`` network).

Circuit (``shared/docs/crossbar-model.md`` section 4, every wire segment resistive)::

    V_i --[r_source]-- u_i0 --r_wire-- u_i1 --r_wire-- ... --r_wire-- u_i,cols-1     (row i)
                        |               |                              |
                      G_i0            G_i1                          G_i,cols-1
                        |               |                              |
                       w_i0            w_i1                          w_i,cols-1       (cells of row i)

    w_0j --r_wire-- w_1j --r_wire-- ... --r_wire-- w_rows-1,j --[r_sink]--> 0 V      (column j)

and ``I_j`` is the current into the neuron's virtual ground at the bottom of column j.

Algorithm (direct, exact up to rounding and a truncation below the dtype's unit
roundoff; everything is written in *currents and resistances*, so no quantity is ever
multiplied by ``1 / r_wire`` and the limit ``r_wire -> 0`` is reached smoothly):

1. **Each row as a multi-port.** With the column nodes of row i held at voltages
   ``w_i``, the row delivers ``c = y_i V_i - Y_i w_i`` into the column nodes, with the
   Norton admittance ``Y_i = (diag(1/G_i) + K)^-1`` (S, ``cols x cols``, symmetric),
   ``K[j, l] = r_source + r_wire * min(j, l)`` the resistance two cells' currents share
   on their way to the driver, and ``y_i = Y_i 1``. Equivalently
   ``Y_i = D - D Z D`` with ``D = diag(G_i)`` and ``Z`` the node impedance matrix of the
   row chain (ports grounded). ``Z`` of a chain is semiseparable,
   ``Z[j, l] = Z[l, l] * prod_{t=j}^{l-1} rho_t`` for ``j <= l``, where the driving-point
   impedances and the voltage ratios ``rho_t = Zl_t / (Zl_t + r_wire)`` follow from two
   O(cols) recurrences of positive quantities (impedance looking left ``Zl``, admittance
   looking right ``Yr``). So each ``Y_i`` is formed in O(cols^2), never inverted.
2. **Sweep down the columns.** Let ``(J_i, E_i)`` be the Norton equivalent of rows
   ``0..i`` seen from the column nodes of row i: the current flowing down out of
   ``w_i`` is ``J_i - E_i w_i`` (``E_i``: ``cols x cols`` admittance, ``J_i``:
   ``cols x rows`` injection per unit input). One wire segment in series per column
   gives ``X = (I + r_wire E_i)^-1``, ``E' = X E_i``, ``J' = X J_i``; adding row
   ``i + 1`` gives ``E_{i+1} = E' + Y_{i+1}``, ``J_{i+1} = [J', y_{i+1}]``.
   ``I + r_wire E`` has spectrum in ``[1, 1 + rho]`` with
   ``rho <= 2 r_wire * max column sum of G`` (about 0.01 for 64 rows of RRAM cells and
   2.5 ohm segments), so X is a short Neumann series evaluated with matrix products
   (``(I - A)(I + A^2)(I + A^4)...``, truncated where ``rho^N`` is below the unit
   roundoff); when ``rho`` is too large for a short series, a batched LU inverse.
3. **The sink.** ``r_sink`` to ground: ``I_out = (I + r_sink E_last)^-1 J_last``, so
   ``T = I_out^T`` (``r_sink = 0`` gives ``T = J_last^T``).

All ``rows`` unit inputs are carried at once (the columns of J), so a tile's effective
weight T is computed once per weight update or chip, never per input. When
``cols > rows`` the reciprocal circuit (transposed and mirrored, ``r_source`` and
``r_sink`` swapped) is swept instead, so the matrices are ``min(rows, cols)`` wide.

**Gradient** (hand-written, exact for the computed forward): with ``A = r_wire E``,
``X`` a polynomial in E (so ``X = X^T``, ``XE = EX``, ``r_wire E X = I - X``), the
adjoint of one sweep step collapses to
``Ebar = X Fbar X - r_wire (X Jbar') (X J)^T``, ``Jbar = X Jbar'``; earlier ``J`` are
recovered as ``J = (I + r_wire E) J'`` instead of being stored. The row multi-ports
pass ``Ybar_i`` to the conductances through ``dY = Y D^-2 dD Y``, i.e.
``Gbar_ij = ((M Ybar^T) * M).sum(-1)`` with ``M = D^-1 Y = I - Z D`` (no division by G).

Cost per ``n x n`` tile swept over ``m`` rows (``n = min(rows, cols)``), in ``n x n``
matrix products: forward ``m * (s + 1.5)`` and backward ``m * 4.5``, where ``s`` is
the number of products of the series (2 for float32 at rho ~ 0.01, 4 for float64);
that is about ``2 n^3 * m * (s + 6)`` flops, ``16 n^4`` for a 64x64 float32 tile
(see ``scripts/bench_wire.py``).
"""
from __future__ import annotations

import math

import torch

__all__ = ["transfer_matrix_wire"]

# Longest Neumann series (number of terms, a power of two) before a batched LU inverse
# is cheaper: 2 * log2(N) - 2 products against one LU inverse (~15 products at 64x64).
_MAX_SERIES_TERMS = 64


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
        ``I = V @ T`` (A) for row source voltages V (V). Differentiable in G (exact
        gradient, hand-written backward).
    """
    rows, cols = G.shape[-2], G.shape[-1]
    r_source, r_sink, r_wire = float(r_source), float(r_sink), float(r_wire)
    if cols > rows:
        # Reciprocity: T[k, j] also equals the current into the source branch of row k
        # when a unit source sits in column j's sink branch. That circuit is the same
        # crossbar transposed and mirrored (its "rows" enter at the old last row, its
        # "sinks" sit at the old column 0), with r_source and r_sink swapped.
        return transfer_matrix_wire(G.mT.flip(-1, -2), r_source=r_sink, r_sink=r_source,
                                    r_wire=r_wire).mT.flip(-1, -2)
    batch = G.shape[:-2]
    T = _WireSweep.apply(G.reshape(-1, rows, cols).contiguous(), r_source, r_sink, r_wire)
    return T.reshape(*batch, rows, cols)


# --------------------------------------------------------------------------- row chains

class _RowChains:
    """Semiseparable generators of the row multi-ports ``Y_i`` of ``(B, m, n)`` tiles.

    ``Z[j, l] = p_min(j,l) * q_max(j,l)`` off the diagonal and ``Zd`` on it, where
    ``p_j q_l = Zd_l * prod_{t=j}^{l-1} rho_t``; ``p_0 = rho_0`` carries the first
    ratio (zero when ``r_source = 0`` pins node 0), the rest sit in ``p = exp(-C)``,
    ``q = Zd exp(C)``, ``C_k = sum_{t=1}^{k-1} log rho_t``. When the products span more
    than the dtype's exponent range allows (never for physical values), ``Z`` is
    formed as ``Zd_max * exp(-|C_j - C_l|)`` instead.
    """

    def __init__(self, G: torch.Tensor, r_source: float, r_wire: float):
        B, m, n = G.shape
        self.d = G
        Zl = torch.empty_like(G)
        Yr = torch.empty_like(G)
        z = r_source / (1.0 + r_source * G[..., 0])
        Zl[..., 0] = z
        for t in range(1, n):
            s = z + r_wire
            z = s / (1.0 + G[..., t] * s)
            Zl[..., t] = z
        a = torch.zeros_like(G[..., 0])
        Yr[..., n - 1] = a
        for t in range(n - 2, -1, -1):
            s = G[..., t + 1] + a
            a = s / (1.0 + r_wire * s)
            Yr[..., t] = a
        self.Zd = Zl / (1.0 + Zl * Yr)
        # diagonal of Y = D - D Z D and of M = I - Z D
        self.Y_diag = G - G * G * self.Zd
        self.M_diag = 1.0 - self.Zd * G
        C = torch.zeros_like(G)
        if n > 2:
            log_rho = torch.log(Zl[..., 1:n - 1] / (Zl[..., 1:n - 1] + r_wire))
            C[..., 2:] = torch.cumsum(log_rho, dim=-1)
        rho0 = Zl[..., 0] / (Zl[..., 0] + r_wire) if n > 1 else torch.zeros_like(G[..., 0])
        span = float(-C[..., -1].min()) if n > 2 else 0.0
        self.outer = span < 0.25 * math.log(torch.finfo(G.dtype).max)
        if self.outer:
            p = torch.exp(-C)
            p[..., 0] = rho0
            q = self.Zd * torch.exp(C)
            self.p, self.q = p, q
            self.neg_dp, self.dq = -(G * p), G * q  # Y's off-diagonal: -(dp)_min (dq)_max
        else:
            self.C, self.rho0 = C, rho0
        idx = torch.arange(n, device=G.device)
        self.upper = idx[:, None] < idx[None, :]

    def _offdiag_impedance(self, i: int) -> torch.Tensor:
        """Z of row i's chain (ohm, ``(B, n, n)``), ports grounded; its diagonal is not set."""
        if self.outer:
            P = self.p[:, i, :, None] * self.q[:, i, None, :]  # p_j q_l, valid for j < l
            return torch.where(self.upper, P, P.mT)
        C, Zd = self.C[:, i], self.Zd[:, i]
        idx = torch.arange(C.shape[-1], device=C.device)
        Z = Zd[:, torch.maximum(idx[:, None], idx[None, :])] * torch.exp(-(C[:, :, None] - C[:, None, :]).abs())
        first = torch.ones_like(Z)
        first[:, 0, 1:] = self.rho0[:, i, None]
        first[:, 1:, 0] = self.rho0[:, i, None]
        return Z * first

    def admittance(self, i: int) -> torch.Tensor:
        """``Y_i = D - D Z D`` (S, ``(B, n, n)``), the Norton admittance of row i."""
        if self.outer:
            O = self.neg_dp[:, i, :, None] * self.dq[:, i, None, :]
            Y = torch.where(self.upper, O, O.mT)
        else:
            d = self.d[:, i]
            Y = self._offdiag_impedance(i) * (-d[:, :, None]) * d[:, None, :]
        Y.diagonal(dim1=-2, dim2=-1).copy_(self.Y_diag[:, i])
        return Y

    def conductance_grad(self, i: int, Ybar: torch.Tensor) -> torch.Tensor:
        """Adjoint of ``G[:, i]`` from ``Ybar_i``: ``((M Ybar^T) * M).sum(-1)``, ``M = I - Z D``."""
        M = self._offdiag_impedance(i) * (-self.d[:, i, None, :])
        M.diagonal(dim1=-2, dim2=-1).copy_(self.M_diag[:, i])
        return (torch.bmm(M, Ybar.mT) * M).sum(-1)


# --------------------------------------------------------------------------- sweep

def _series_terms(rho: float, dtype: torch.dtype) -> int:
    """Power-of-two N with ``rho^N / (1 - rho)`` below the unit roundoff, or 0 (use LU)."""
    if rho <= 0.0:
        return 1
    if rho >= 0.9:
        return 0
    eps = torch.finfo(dtype).eps / 2
    need = math.log(eps * (1.0 - rho)) / math.log(rho)
    N = 1
    while N < need:
        N *= 2
    return N if N <= _MAX_SERIES_TERMS else 0


def _near_identity_inverse(E: torch.Tensor, r: float, terms: int, eye: torch.Tensor) -> torch.Tensor:
    """``(I + r E)^-1`` for symmetric E with ``rho(rE) < 1``, truncated after ``(-rE)^(terms-1)``.

    ``(I - A)(I + A^2)(I + A^4)...`` with ``A = r E`` sums the Neumann series to ``terms``
    (a power of two) with ``2 log2(terms) - 2`` products; ``terms == 0`` means a batched
    LU inverse.
    """
    if terms == 0:
        return torch.linalg.inv(torch.add(eye, E, alpha=r))
    if terms == 1:
        return eye.expand_as(E).clone()
    X = torch.add(eye, E, alpha=-r)
    P = None
    n = 2
    while n < terms:
        P = torch.bmm(E, E) * (r * r) if P is None else torch.bmm(P, P)
        X = torch.baddbmm(X, X, P)
        n *= 2
    return X


class _WireSweep(torch.autograd.Function):
    """T of ``(B, m, n)`` tiles (``m >= n``) by row multi-ports and a column sweep."""

    @staticmethod
    def forward(ctx, G, r_source, r_sink, r_wire):
        B, m, n = G.shape
        eye = torch.eye(n, dtype=G.dtype, device=G.device)
        rows_ = _RowChains(G, r_source, r_wire)
        # |E| (max abs row sum) never exceeds twice the largest column sum of G
        rho = 2.0 * r_wire * float(G.abs().sum(-2).max()) if m > 1 else 0.0
        terms = _series_terms(rho, G.dtype)

        E = rows_.admittance(0)
        J = G.new_zeros(B, n, m)
        J[:, :, 0] = E.sum(-1)
        Es, Xs = [], []
        for i in range(1, m):
            X = _near_identity_inverse(E, r_wire, terms, eye)
            Es.append(E)
            Xs.append(X)
            Y = rows_.admittance(i)
            E = torch.baddbmm(Y, X, E)  # X E + Y_i; X E is symmetric (X is a polynomial in E)
            J[:, :, :i] = X @ J[:, :, :i]
            J[:, :, i] = Y.sum(-1)
        if r_sink > 0.0:
            Xk = torch.linalg.inv(eye + r_sink * E)  # SPD, spectrum in [1, 1 + r_sink |E|]
            Out = Xk @ J
        else:
            Xk, Out = None, J
        ctx.rows_, ctx.Es, ctx.Xs, ctx.Xk = rows_, Es, Xs, Xk
        ctx.r_sink, ctx.r_wire = r_sink, r_wire
        ctx.save_for_backward(J, Out)
        return Out.mT

    @staticmethod
    def backward(ctx, Tbar):
        J, Out = ctx.saved_tensors
        rows_, Es, Xs, Xk = ctx.rows_, ctx.Es, ctx.Xs, ctx.Xk
        r_wire = ctx.r_wire
        B, n, m = J.shape
        Outbar = Tbar.mT
        J = J.clone()
        if Xk is not None:
            Jbar = Xk @ Outbar
            Ebar = -ctx.r_sink * (Jbar @ Out.mT)
        else:
            Jbar = Outbar.clone()
            Ebar = torch.zeros_like(Es[0]) if Es else J.new_zeros(B, n, n)
        Gbar = torch.empty(B, m, n, dtype=J.dtype, device=J.device)
        for i in range(m - 1, 0, -1):
            # Y_i enters E_i directly and J through y_i = Y_i 1
            Gbar[:, i] = rows_.conductance_grad(i, Ebar + Jbar[:, :, i, None])
            X, E_prev = Xs[i - 1], Es[i - 1]
            Ja = J[:, :, :i]  # X J_prev
            Z = torch.matmul(X, Jbar[:, :, :i])
            Ebar = torch.baddbmm(torch.bmm(torch.bmm(X, Ebar), X), Z, Ja.mT, alpha=-r_wire)
            Jbar[:, :, :i] = Z
            J[:, :, :i] = torch.baddbmm(Ja, E_prev, Ja, alpha=r_wire)  # (I + r_wire E_prev) X J_prev
        Gbar[:, 0] = rows_.conductance_grad(0, Ebar + Jbar[:, :, 0, None])
        return Gbar, None, None, None
