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
   2.5 ohm segments), so ``E' = E (I - A)(I + A^2)(I + A^4)...`` (``A = r_wire E``,
   the Neumann series truncated where ``rho^N`` is below the unit roundoff) takes two
   matrix products in float32 and four in float64, and ``X = I - r_wire E'`` none;
   when ``rho`` is too large for a short series, a batched LU inverse.
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
matrix products: forward ``m * (s + 0.5)`` and backward ``m * 4.5``, where ``s`` is
the number of products of the series (2 for float32 at rho ~ 0.01, 4 for float64);
that is about ``2 n^3 * m * (s + 5)`` flops, ``14 n^4`` (235 MFLOP) forward and
backward for a 64x64 float32 tile (``sweep_flops`` in ``scripts/bench_wire.py``
counts it exactly). Everything else is O(n^2) per row step; the large states kept
for the backward and the per-step workspace live in a reused pool, so a training step
reuses the previous step's memory instead of page-faulting fresh memory.
"""
from __future__ import annotations

import math

import torch

__all__ = ["transfer_matrix_wire"]

# The row generators p = exp(-C), q = Zd exp(C) are used while the span of C stays below
# this fraction of the dtype's largest exponent (always, for physical values).
_OUTER_SPAN_FRACTION = 0.25

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
        self.outer = span < _OUTER_SPAN_FRACTION * math.log(torch.finfo(G.dtype).max)
        if self.outer:
            p = torch.exp(-C)
            p[..., 0] = rho0
            q = self.Zd * torch.exp(C)
            self.p, self.q = p, q
            self.neg_dp, self.dq = -(G * p), G * q  # Y's off-diagonal: -(dp)_min (dq)_max
        else:
            self.C, self.rho0 = C, rho0
        idx = torch.arange(n, device=G.device)
        # float masks: mul + addcmul assemble the two triangles faster than torch.where
        self.upper = (idx[:, None] < idx[None, :]).to(G.dtype)
        self.lower = 1.0 - self.upper

    def _offdiag_impedance(self, i: int, out: torch.Tensor, tmp: torch.Tensor) -> torch.Tensor:
        """Z of row i's chain (ohm, ``(B, n, n)``) into ``out``, ports grounded; diagonal not set."""
        if self.outer:
            Z = torch.mul(self.p[:, i, :, None], self.q[:, i, None, :], out=out).mul_(self.upper)  # p_j q_l, j < l
            return Z.addcmul_(torch.mul(self.q[:, i, :, None], self.p[:, i, None, :], out=tmp), self.lower)
        C, Zd = self.C[:, i], self.Zd[:, i]
        idx = torch.arange(C.shape[-1], device=C.device)
        Z = Zd[:, torch.maximum(idx[:, None], idx[None, :])] * torch.exp(-(C[:, :, None] - C[:, None, :]).abs())
        Z[:, 0, 1:] *= self.rho0[:, i, None]
        Z[:, 1:, 0] *= self.rho0[:, i, None]
        return out.copy_(Z)

    def admittance(self, i: int, out: torch.Tensor, tmp: torch.Tensor) -> torch.Tensor:
        """``Y_i = D - D Z D`` (S, ``(B, n, n)``), the Norton admittance of row i, into ``out``."""
        if self.outer:
            Y = torch.mul(self.neg_dp[:, i, :, None], self.dq[:, i, None, :], out=out).mul_(self.upper)
            Y.addcmul_(torch.mul(self.dq[:, i, :, None], self.neg_dp[:, i, None, :], out=tmp), self.lower)
        else:
            d = self.d[:, i]
            Y = self._offdiag_impedance(i, out, tmp).mul_(-d[:, :, None]).mul_(d[:, None, :])
        Y.diagonal(dim1=-2, dim2=-1).copy_(self.Y_diag[:, i])
        return Y

    def conductance_grad(self, i: int, Ybar: torch.Tensor, tmp1: torch.Tensor, tmp2: torch.Tensor) -> torch.Tensor:
        """Adjoint of ``G[:, i]`` from ``Ybar_i``: ``((M Ybar^T) * M).sum(-1)``, ``M = I - Z D``.

        ``tmp1`` and ``tmp2`` (``(B, n, n)``) are overwritten.
        """
        M = self._offdiag_impedance(i, tmp1, tmp2).mul_(-self.d[:, i, None, :])
        M.diagonal(dim1=-2, dim2=-1).copy_(self.M_diag[:, i])
        return torch.bmm(M, Ybar.mT, out=tmp2).mul_(M).sum(-1)


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


def _tile_series_terms(G: torch.Tensor, r_wire: float) -> int:
    """Series length for swept tiles ``(B, m, n)``: ``rho = 2 r_wire * max column sum of G``.

    ``|E|`` (max abs row sum) never exceeds twice the largest column sum of G.
    """
    rho = 2.0 * r_wire * float(G.sum(-2).max()) if G.shape[-2] > 1 else 0.0
    return _series_terms(rho, G.dtype)


def _column_step(E: torch.Tensor, r: float, terms: int, eye: torch.Tensor,
                 F_out: torch.Tensor, X_out: torch.Tensor, tmp1: torch.Tensor, tmp2: torch.Tensor) -> None:
    """One wire segment in series: ``F = (I + rE)^-1 E`` and ``X = (I + rE)^-1 = I - r F``.

    For symmetric E with ``rho(rE) < 1``, ``F = E (I - A)(I + A^2)(I + A^4)...`` with
    ``A = r E`` sums the Neumann series to ``terms`` (a power of two) with
    ``2 log2(terms) - 2`` products (one for ``terms = 2``); ``X = I - r F`` then costs no product and loses
    nothing to cancellation (``r F`` is of size rho). ``terms == 0`` means a batched LU
    inverse. ``tmp1`` and ``tmp2`` (same shape) are overwritten.
    """
    if terms == 0:
        torch.bmm(X_out.copy_(torch.linalg.inv(torch.add(eye, E, alpha=r))), E, out=F_out)
        return
    if terms == 1:
        F_out.copy_(E)
    else:
        S = torch.bmm(E, E, out=tmp1)
        F = torch.add(E, S, alpha=-r, out=F_out if terms == 2 else tmp2)  # E (I - A)
        P = S.mul_(r * r)  # A^2
        n = 2
        while n < terms:
            n *= 2
            F = torch.baddbmm(F, F, P, out=F_out if n >= terms else None)
            if n < terms:
                P = torch.bmm(P, P)
    torch.add(eye, F_out, alpha=-r, out=X_out)


class _Pool:
    """Reuses the sweep's large buffers across calls (states kept for the backward, workspace).

    A training step keeps ``2 * rows`` admittance-sized states per tile alive until its
    backward and needs a dozen more as workspace; fresh memory for them costs page
    faults comparable to the products themselves (the C allocator returns freed
    blocks of this size to the system). A backward returns its buffers here; a second
    backward through the same graph (``retain_graph``) recomputes them from the saved G.
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._free: dict[tuple, list[torch.Tensor]] = {}
        self._bytes = 0

    def take(self, shape, dtype, device) -> torch.Tensor:
        free = self._free.get((tuple(shape), dtype, device))
        if free:
            buf = free.pop()
            self._bytes -= buf.nbytes
            return buf
        return torch.empty(shape, dtype=dtype, device=device)

    def give(self, *bufs: torch.Tensor) -> None:
        for buf in bufs:
            if self._bytes + buf.nbytes > self.max_bytes:
                continue  # left to the allocator: the pool never holds more than max_bytes
            self._free.setdefault((tuple(buf.shape), buf.dtype, buf.device), []).append(buf)
            self._bytes += buf.nbytes


# A 64x64-tile FCN step keeps ~0.5 GB of states; larger tiles simply bypass the pool.
_POOL = _Pool(max_bytes=2 * 1024 ** 3)

# A sweep whose states (E and X of every row step) would take more than this keeps only
# every k-th E (k ~ sqrt(rows)) and recomputes the others segment by segment in the
# backward: about 3 sqrt(m) states instead of 2 m, for the series products once more
# (~30 % more flops in float32). Below it nothing is recomputed.
KEEP_ALL_BYTES = 1024 ** 3


def checkpoint_every(m: int, state_bytes: int) -> int:
    """Row steps per checkpoint for a sweep over ``m`` rows whose states take ``state_bytes`` each.

    1 (keep every state) when ``2 m`` states fit in :data:`KEEP_ALL_BYTES`, else
    ``ceil(sqrt(m))``, which minimises ``m / k + 2 k`` states kept at once.
    """
    if 2 * m * state_bytes <= KEEP_ALL_BYTES:
        return 1
    return max(2, math.ceil(math.sqrt(m)))


def _sweep(G: torch.Tensor, r_source: float, r_sink: float, r_wire: float, keep: bool, every: int = 1):
    """Forward sweep of ``(B, m, n)`` tiles; returns ``T`` and, if ``keep``, the states for the adjoint.

    J is held transposed, ``Jt`` of shape ``(B, m, n)``, so that the inputs carried so far,
    ``Jt[:, :i]``, are a contiguous block of every tile's matrix. With ``keep`` and
    ``every > 1`` only ``E_0, E_every, E_2every, ...`` are kept (checkpoints); the backward
    recomputes the rest (:func:`_recompute_segment`).
    """
    B, m, n = G.shape
    dt, dev = G.dtype, G.device
    eye = torch.eye(n, dtype=dt, device=dev)
    rows_ = _RowChains(G, r_source, r_wire)
    terms = _tile_series_terms(G, r_wire)
    # E_k of every row (and X_k of every step) is kept for the backward; without
    # gradients, or with checkpoints, two alternating slots suffice
    keep_all = keep and every == 1
    slots = m if keep_all else 2
    Es = _POOL.take((slots, B, n, n), dt, dev)
    Xs = _POOL.take((max(slots - 1, 1), B, n, n), dt, dev)
    ckpt = _POOL.take((-(-m // every), B, n, n), dt, dev) if keep and not keep_all else None
    work = _POOL.take((3, B, n, n), dt, dev)
    flat = _POOL.take((B * m * n,), dt, dev)

    rows_.admittance(0, out=Es[0], tmp=work[0])
    if ckpt is not None:
        ckpt[0].copy_(Es[0])
    Jt = G.new_zeros(B, m, n)
    torch.sum(Es[0], -1, out=Jt[:, 0])
    for i in range(1, m):
        E, E_new, X = Es[(i - 1) % slots], Es[i % slots], Xs[(i - 1) % max(slots - 1, 1)]
        F = work[2]
        _column_step(E, r_wire, terms, eye, F_out=F, X_out=X, tmp1=work[0], tmp2=work[1])
        Y = rows_.admittance(i, out=E_new, tmp=work[0])
        torch.sum(Y, -1, out=Jt[:, i])  # y_i = Y_i 1
        Y += F  # E_i = X E_{i-1} + Y_i, symmetric (X is a polynomial in E)
        if ckpt is not None and i % every == 0:
            ckpt[i // every].copy_(Y)
        # J' = X J, i.e. Jt' = Jt X (X symmetric)
        Jt[:, :i] = torch.bmm(Jt[:, :i], X, out=flat[:B * i * n].view(B, i, n))
    E = Es[(m - 1) % slots]
    if r_sink > 0.0:
        Xk = torch.linalg.inv(torch.add(eye, E, alpha=r_sink))  # SPD, spectrum in [1, 1 + r_sink |E|]
        Out_t = torch.bmm(Jt, Xk)
    else:
        Xk, Out_t = None, Jt
    _POOL.give(work, flat)
    if not keep:
        _POOL.give(Es, Xs)
        return Out_t, None
    if ckpt is not None:
        _POOL.give(Es, Xs)
        return Out_t, (rows_, ckpt, None, Xk, Jt, Out_t, every, terms)
    return Out_t, (rows_, Es, Xs, Xk, Jt, Out_t, 1, terms)


def _recompute_segment(rows_: "_RowChains", E_first: torch.Tensor, first: int, last: int, r_wire: float,
                       terms: int, segE: torch.Tensor, segX: torch.Tensor, work: torch.Tensor) -> None:
    """``E_j`` into ``segE[j - first]`` and ``X_j`` (the step after row j) into ``segX[j - first]``
    for ``first <= j <= last``, from the checkpoint ``E_first``: the forward's operations, in
    its order, so the states are bitwise those of the forward. ``work`` (3 buffers) is overwritten."""
    eye = torch.eye(E_first.shape[-1], dtype=E_first.dtype, device=E_first.device)
    segE[0].copy_(E_first)
    for j in range(first, last + 1):
        E, X, F = segE[j - first], segX[j - first], work[2]
        _column_step(E, r_wire, terms, eye, F_out=F, X_out=X, tmp1=work[0], tmp2=work[1])
        if j < last:
            rows_.admittance(j + 1, out=segE[j + 1 - first], tmp=work[0]).add_(F)


class _WireSweep(torch.autograd.Function):
    """T of ``(B, m, n)`` tiles (``m >= n``) by row multi-ports and a column sweep."""

    @staticmethod
    def forward(ctx, G, r_source, r_sink, r_wire):
        keep = ctx.needs_input_grad[0]
        B, m, n = G.shape
        every = checkpoint_every(m, B * n * n * G.element_size()) if keep else 1
        T, state = _sweep(G, r_source, r_sink, r_wire, keep, every)
        ctx.every = every
        if keep:
            ctx.state = state
            ctx.args = (r_source, r_sink, r_wire)
            ctx.save_for_backward(G)
        return T

    @staticmethod
    def backward(ctx, Tbar):
        (G,) = ctx.saved_tensors
        r_source, r_sink, r_wire = ctx.args
        if ctx.state is None:  # a second backward through the same graph (retain_graph)
            ctx.state = _sweep(G, r_source, r_sink, r_wire, True, ctx.every)[1]
        rows_, Es, Xs, Xk, Jt, Out_t, every, terms = ctx.state
        B, m, n = Jt.shape
        dt, dev = Jt.dtype, Jt.device
        work = _POOL.take((5, B, n, n), dt, dev)
        if every > 1:  # Es holds checkpoints; a segment's states are recomputed into these
            ckpt = Es
            segE = _POOL.take((every, B, n, n), dt, dev)
            segX = _POOL.take((every, B, n, n), dt, dev)
            seg = -1
        flat = _POOL.take((2, B * m * n), dt, dev)
        Jt = Jt.clone()
        Tbar = Tbar.contiguous()
        # Jbar and Ebar (transposed like J); T = Out^T with Out = Xk J
        if Xk is not None:
            Jbar_t = torch.bmm(Tbar, Xk)
            Ebar = torch.bmm(Jbar_t.mT, Out_t, out=work[3]).mul_(-r_sink)
        else:
            Jbar_t = Tbar.clone()
            Ebar = work[3].zero_()
        Ebar_next = work[4]
        Gbar = torch.empty(B, m, n, dtype=dt, device=dev)
        for i in range(m - 1, 0, -1):
            # Y_i enters E_i directly and J through y_i = Y_i 1
            Ybar = torch.add(Ebar, Jbar_t[:, i, :, None], out=work[0])
            Gbar[:, i] = rows_.conductance_grad(i, Ybar, tmp1=work[1], tmp2=work[2])
            if every > 1:
                if (i - 1) // every != seg:
                    seg = (i - 1) // every
                    first = seg * every
                    _recompute_segment(rows_, ckpt[seg], first, min(first + every, m) - 1, r_wire, terms,
                                       segE, segX, work)
                X, E_prev = segX[i - 1 - first], segE[i - 1 - first]
            else:
                X, E_prev = Xs[i - 1], Es[i - 1]
            Ja_t = Jt[:, :i]  # (X J_prev)^T
            Z_t = torch.bmm(Jbar_t[:, :i], X, out=flat[0, :B * i * n].view(B, i, n))  # (X Jbar')^T
            XEbar = torch.bmm(X, Ebar, out=work[0])
            XEbarX = torch.bmm(XEbar, X, out=work[1])
            Ebar, Ebar_next = torch.baddbmm(XEbarX, Z_t.mT, Ja_t, alpha=-r_wire, out=Ebar_next), Ebar
            Jbar_t[:, :i] = Z_t
            # J_prev = (I + r_wire E_prev) X J_prev
            Jt[:, :i] = torch.baddbmm(Ja_t, Ja_t, E_prev, alpha=r_wire, out=flat[1, :B * i * n].view(B, i, n))
        Ybar = torch.add(Ebar, Jbar_t[:, 0, :, None], out=work[0])
        Gbar[:, 0] = rows_.conductance_grad(0, Ybar, tmp1=work[1], tmp2=work[2])
        # the states go back to the pool for the next step's forward
        ctx.state = None
        _POOL.give(Es, work, flat)
        _POOL.give(*((segE, segX) if every > 1 else (Xs,)))
        return Gbar, None, None, None
