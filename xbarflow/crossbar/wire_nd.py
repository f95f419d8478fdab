"""Exact transfer matrix of crossbar tiles with wire resistance, by nested dissection.

Same circuit and result as :func:`xbarflow.crossbar.wire.transfer_matrix_wire` (the
column sweep, kept as the reference; ``shared/docs/crossbar-model.md`` section 4)::

    V_i --[r_source]-- u_i0 --r_wire-- u_i1 --r_wire-- ... u_i,cols-1        (row i)
    G_ij joins u_ij and w_ij
    w_0j --r_wire-- w_1j --r_wire-- ... w_rows-1,j --[r_sink]--> 0 V         (column j)

with column currents ``I = V @ T``. The sweep costs ``~14 n^4`` flops per ``n x n`` tile
(forward and backward); this solver eliminates the same ``2 * rows * cols`` node network
by nested dissection of the tile's grid of cells, ``O(n^3)`` per tile.

**Blocks and ports.** A block is a rectangle of ``h x w`` cells. Every wire segment
that a block boundary cuts is split at its midpoint, and that midpoint is a *port*
of both blocks it separates (each holding a half segment, ``r_wire / 2``). A block
has ``2 (h + w)`` ports, ordered ``[L (h), R (h), T (w), B (w)]``: the row-wire
midpoints on its left and right, the column-wire midpoints above and below. On the
tile's own edges the ports are the driver's ideal source node ``V_i`` (left edge,
through ``r_source`` instead of a half segment), the neuron's virtual ground (bottom
edge, through ``r_sink``), and open ends (right and top edges: conductance 0, an
isolated port that never carries current). A block is described by its **port
admittance** onto these ports, the Schur complement of its nodal matrix.

**Representation that keeps float32 exact.** The wire conductance (``2 / r_wire``,
~1 S) is 10^4 - 10^5 times a cell's (~1e-5 S), and in an ordinary nodal matrix the
diagonal (~1 S) then carries the devices' currents only in its last digits: float32
rounding of the diagonal alone is a spurious leak of ~6e-8 S (an estimate: ~1e-3 of a cell). So a block's
admittance is stored as its *off-diagonal conductances* ``W >= 0`` (``W[k, k] = 0``);
the network is floating (no element to ground except through ports), so its Laplacian
is ``diag(W 1) - W`` and the diagonal is always *recomputed as a sum of positive
terms*, never as a difference (the trick of the GTH algorithm for Markov chains).
Eliminating separator nodes C from ports A gives the parent's off-diagonals as

    W_S = W_AA + W_AC C^-1 W_CA,    C = diag(W_CA 1 + W_CC 1) - W_CC    (an M-matrix)

in which every term is non-negative (``C^-1 >= 0``; its Cholesky factor has
non-positive off-diagonals, so the triangular solves add terms of one sign). The only
subtractions are those of the Cholesky pivots, and every separator node is tied to
the retained ports by its own wire (``C`` is diagonally dominant by a margin of
order ``1 / (w r_wire)``), so they cost a few ulps relative to the wire, not to
the cells. float32 results agree with float64 to ~1e-6 (see ``tests/test_wire_nd.py``).

**Algorithm.** (1) Leaves are single cells: a 4-port star (row node u with L and R,
column node w with T and B, G between u and w) eliminated in closed form, all cells
of all tiles in one batch of element-wise operations. (2) Levels merge neighbouring
blocks in pairs, alternately side by side (eliminating the ``h`` shared row-wire
midpoints) and stacked (the ``w`` column-wire midpoints), keeping blocks square.
Blocks are numbered so that the two children of every parent are the two halves of
the block axis (:meth:`_Plan.to_cells`), so a level reads both children without any
gather. Every level is one batched operation per step over all blocks of all tiles:
the first levels (separators of at most :data:`BLOCKS_LAST_MAX_SEP` nodes) in a
blocks-last layout ``(P, P, blocks)`` with an explicit element-wise Cholesky (LAPACK
per 1x1 or 2x2 matrix and slicing tiny matrices block by block are all overhead),
the others blocks-first ``(blocks, P, P)`` with one batched Cholesky, one batched
triangular solve and one batched product. (3) After the last level only ports
remain: ``L`` are the sources and ``B`` the grounded sink ends, so the current into
sink j per volt at source i is exactly the off-diagonal conductance between them:
``T = W[L, B]``. Tiles are padded to power-of-two cell counts with cells of
conductance 0 at the top (beyond the open end of the column wires) and on the right
(beyond the open end of the row wires); such cells carry no current, so the padding
is exact, and T is cropped.

**Cost** of a merge with ``s`` separator nodes and ``p`` parent ports: Cholesky
``s^3 / 3``, solve ``s^2 p``, product ``2 p^2 s`` flops (the last level forms only the
``L x B`` block, ``2 rows cols s``). Counted exactly by ``nd_flops`` in
``scripts/bench_wire_nd.py``: ~``80 n^3`` forward and ~``215 n^3`` forward + backward per
``n x n`` tile (21 / 55 MFLOP at 64x64, against the sweep's 84 / 233; 1.4 / 3.6 GFLOP
at 256x256 against 39 / 77). But every level reads and writes the blocks' port
matrices, ~18 floats per cell whatever the level, and the first levels do only a few
flops per byte: in eager PyTorch on a CPU the 12 levels of a 64x64 tile are memory
bound, and this solver is *slower* than the sweep there (measured in
``scripts/bench_wire_nd.py --levels``); it is faster from 128x128 tiles on.

**Gradient** (hand-written): for one merge, with ``X = C^-1 W_CA`` (``s x p``) and
``F = sym(Wbar_S)`` (diagonal zeroed: it is not a variable),

    Wbar_AA = F,   Wbar_AC = 2 F X^T + 1 dbar^T,   Cbar = -X F X^T,
    Wbar_CC = -Cbar + dbar 1^T,   dbar = diag(Cbar)

(``dbar`` is the adjoint of the recomputed diagonal), scattered back to the two
children; at the leaves ``dW / dG`` is closed form. **Stored for the backward**: per
level the Cholesky factor (``s x s``) and ``Y = L^-1 W_CA`` (``s x p``) of every
parent block, 51 floats per cell over all levels of a 64x64 tile (0.8 MB per tile in
float32; 68 per cell, 17 MB, at 256x256), and the leaves' ``det`` (one per cell);
``X = L^-T Y`` is recomputed (``s^2 p``). A second backward through a retained graph
reuses them.

**Zero end resistances.** ``r_source = 0`` ties a row's first node to its source and
``r_sink = 0`` a column's last node to ground: that port's conductance would be infinite.
Those cells' leaves are formed in the limit instead (the pinned node *is* the port, and
only the other node is eliminated, :func:`_leaf`); everything after the leaves is
unchanged, since pinned ports are tile terminals that no merge eliminates. ``r_wire > 0``
is required (``r_wire = 0`` is the no-wire circuit of :mod:`xbarflow.crossbar.circuit`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["transfer_matrix_wire_nd", "source_admittance_wire_nd", "transfer_and_admittance_wire_nd", "merge_schedule"]


@dataclass(frozen=True)
class Merge:
    """One level: blocks of ``h x w`` cells (``nbr x nbc`` of them per tile) merged in pairs.

    ``side``: left + right (separator: the ``h`` row-wire midpoints between them), else
    top + bottom (the ``w`` column-wire midpoints).
    """

    side: bool
    h: int
    w: int
    nbr: int
    nbc: int

    @property
    def ports(self) -> int:
        """``p``: ports of a parent block."""
        return 2 * self.h + 4 * self.w if self.side else 4 * self.h + 2 * self.w

    @property
    def sep(self) -> int:
        """``s``: separator nodes eliminated per parent block."""
        return self.h if self.side else self.w


def merge_schedule(rows: int, cols: int) -> tuple[int, int, list[Merge]]:
    """Padded grid ``(rows_p, cols_p)`` (powers of two) and the merges from cells to one block.

    Blocks are kept as square as possible: side merges while ``w <= h``, stacked otherwise.
    """
    rp = 1 << max(0, math.ceil(math.log2(rows)))
    cp = 1 << max(0, math.ceil(math.log2(cols)))
    h = w = 1
    nbr, nbc = rp, cp
    levels = []
    while nbr > 1 or nbc > 1:
        side = nbc > 1 and (w <= h or nbr == 1)
        levels.append(Merge(side, h, w, nbr, nbc))
        if side:
            w, nbc = 2 * w, nbc // 2
        else:
            h, nbr = 2 * h, nbr // 2
    return rp, cp, levels


def _segments(m: Merge):
    """Contiguous port ranges of the two children in the parent, and their separator ranges.

    Returns ``(segs_a, sep_a, segs_b, sep_b)``: ``segs`` lists ``(child_slice, parent_slice)``
    of the retained ports, ``sep`` the child's slice of separator ports. Child layout
    ``[L (h), R (h), T (w), B (w)]``; parent layout the same for its own ``(h, 2w)`` (side)
    or ``(2h, w)`` (stacked) size.
    """
    h, w = m.h, m.w
    L, R, T, B = slice(0, h), slice(h, 2 * h), slice(2 * h, 2 * h + w), slice(2 * h + w, 2 * h + 2 * w)
    if m.side:  # parent (h, 2w): L = a.L, R = b.R, T = [a.T, b.T], B = [a.B, b.B]; separator a.R = b.L
        segs_a = [(L, slice(0, h)), (T, slice(2 * h, 2 * h + w)), (B, slice(2 * h + 2 * w, 2 * h + 3 * w))]
        segs_b = [(R, slice(h, 2 * h)), (T, slice(2 * h + w, 2 * h + 2 * w)), (B, slice(2 * h + 3 * w, 2 * h + 4 * w))]
        return segs_a, R, segs_b, L
    # parent (2h, w): L = [a.L, b.L], R = [a.R, b.R], T = a.T, B = b.B; separator a.B = b.T
    segs_a = [(L, slice(0, h)), (R, slice(2 * h, 3 * h)), (T, slice(4 * h, 4 * h + w))]
    segs_b = [(L, slice(h, 2 * h)), (R, slice(3 * h, 4 * h)), (B, slice(4 * h + w, 4 * h + 2 * w))]
    return segs_a, B, segs_b, T


# Layouts. Blocks are numbered so that the two children of every parent are the two
# halves of the block axis (see _cell_order): child a = first half, child b = second.
# "blocks first" (N, P, P) feeds batched LAPACK and bmm; "blocks last" (P, P, N) makes every
# port pair a contiguous vector over blocks, which is what the first levels need: their
# blocks have 4..24 ports, and slicing such tiny matrices block by block (or calling
# LAPACK per 1x1 or 2x2 matrix) is dominated by per-element overhead, not arithmetic.

def _merge_last(W: torch.Tensor, m: Merge) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """One level in the blocks-last layout: ``W`` ``(P, P, N)`` -> parents ``(p, p, N / 2)``.

    The separator (``s <= 4`` nodes here) is factorised by an explicit Cholesky whose
    every step is an element-wise operation over all blocks. Returns the parents'
    off-diagonals (diagonal zero) and ``(Lc (s, s, n), Y (s, p, n))`` for the adjoint.
    """
    n = W.shape[-1] // 2
    a, b = W[..., :n], W[..., n:]
    segs_a, sep_a, segs_b, sep_b = _segments(m)
    p, s = m.ports, m.sep
    W_CA = W.new_zeros(s, p, n)
    for c, segs, sep in ((a, segs_a, sep_a), (b, segs_b, sep_b)):
        for cs, ps in segs:
            W_CA[:, ps] = c[sep, cs]
    W_CC = a[sep_a, sep_a] + b[sep_b, sep_b]
    d = W_CA.sum(1) + W_CC.sum(1)  # the separator's diagonal: a sum of positive terms
    Lc = W.new_zeros(s, s, n)
    Y = torch.empty_like(W_CA)
    for k in range(s):  # C = diag(d) - W_CC = Lc Lc^T; Y = Lc^-1 W_CA
        piv = d[k] - (Lc[k, :k] ** 2).sum(0) if k else d[k]
        Lc[k, k] = torch.sqrt(piv)
        r = 1.0 / Lc[k, k]
        for i in range(k + 1, s):
            Lc[i, k] = (-W_CC[i, k] - (Lc[i, :k] * Lc[k, :k]).sum(0)) * r
        yk = W_CA[k] - (Lc[k, :k, None] * Y[:k]).sum(0) if k else W_CA[k]
        torch.mul(yk, r, out=Y[k])
    WS = Y[0, :, None] * Y[0, None, :]
    for k in range(1, s):
        WS.addcmul_(Y[k, :, None], Y[k, None, :])
    for c, segs in ((a, segs_a), (b, segs_b)):
        for ci, pi in segs:
            for cj, pj in segs:
                WS[pi, pj] += c[ci, cj]
    WS.diagonal(dim1=0, dim2=1).zero_()  # not a variable: recomputed from W 1 where needed
    return WS, (Lc, Y)


def _merge_last_grad(Wbar_S: torch.Tensor, m: Merge, Lc: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """Adjoint of the children's off-diagonals ``(P, P, N)`` from the parents' ``Wbar_S`` ``(p, p, n)``."""
    s = m.sep
    F = Wbar_S + Wbar_S.transpose(0, 1)
    F.mul_(0.5)
    F.diagonal(dim1=0, dim2=1).zero_()
    X = torch.empty_like(Y)
    for k in range(s - 1, -1, -1):  # X = Lc^-T Y = C^-1 W_CA
        xk = Y[k] - (Lc[k + 1:, k, None] * X[k + 1:]).sum(0) if k < s - 1 else Y[k]
        torch.div(xk, Lc[k, k], out=X[k])
    FX = torch.stack([(F * X[k, None, :]).sum(1) for k in range(s)])  # (F X^T)^T, (s, p, n)
    Cbar = -torch.stack([(X[k, None] * FX).sum(1) for k in range(s)])  # -(X F X^T), (s, s, n)
    dbar = Cbar.diagonal(dim1=0, dim2=1).T.clone()  # (s, n)
    Wbar_CA = FX.mul_(2.0).add_(dbar[:, None, :])
    Wbar_CC = Cbar.neg_().add_(dbar[:, None, :])  # Wbar_CC[i, k] = dbar_k - Cbar_ik (transposed: symmetric use)
    P = 2 * (m.h + m.w)
    n = F.shape[-1]
    out = F.new_zeros(P, P, 2 * n)
    a, b = out[..., :n], out[..., n:]
    segs_a, sep_a, segs_b, sep_b = _segments(m)
    for c, segs, sep in ((a, segs_a, sep_a), (b, segs_b, sep_b)):
        for ci, pi in segs:
            for cj, pj in segs:
                c[ci, cj] = F[pi, pj]
            c[sep, ci] = Wbar_CA[:, pi]
        c[sep, sep] = Wbar_CC
    return out


def _merge_first(W: torch.Tensor, m: Merge, only: tuple[slice, slice] | None = None):
    """One level in the blocks-first layout: ``W`` ``(N, P, P)`` -> parents ``(N / 2, p, p)``.

    Returns the parents' off-diagonals (diagonal zero), or with ``only = (rows, cols)`` just
    that block, and ``(Lc, Y)`` for the adjoint.
    """
    n = W.shape[0] // 2
    a, b = W[:n], W[n:]
    segs_a, sep_a, segs_b, sep_b = _segments(m)
    p, s = m.ports, m.sep
    W_AC = W.new_zeros(n, p, s)
    for c, segs, sep in ((a, segs_a, sep_a), (b, segs_b, sep_b)):
        for cs, ps in segs:
            W_AC[:, ps, :] = c[:, cs, sep]
    W_CC = a[:, sep_a, sep_a] + b[:, sep_b, sep_b]
    d = W_AC.sum(1) + W_CC.sum(2)  # the separator's diagonal: a sum of positive terms
    C = W_CC.neg_()
    C.diagonal(dim1=-2, dim2=-1).add_(d)
    Lc = torch.linalg.cholesky(C)
    Y = torch.linalg.solve_triangular(Lc, W_AC.mT, upper=False)  # L^-1 W_CA >= 0
    if only is not None:
        r, k = only
        WS = Y[:, :, r].mT @ Y[:, :, k]
        for c, segs in ((a, segs_a), (b, segs_b)):
            for ci, pi in segs:
                for cj, pj in segs:
                    lo_i, hi_i = max(pi.start, r.start), min(pi.stop, r.stop)
                    lo_j, hi_j = max(pj.start, k.start), min(pj.stop, k.stop)
                    if lo_i < hi_i and lo_j < hi_j:
                        WS[:, lo_i - r.start:hi_i - r.start, lo_j - k.start:hi_j - k.start] += c[
                            :, ci.start + lo_i - pi.start:ci.start + hi_i - pi.start,
                            cj.start + lo_j - pj.start:cj.start + hi_j - pj.start]
        return WS, (Lc, Y)
    WS = torch.bmm(Y.mT, Y)
    for c, segs in ((a, segs_a), (b, segs_b)):
        for ci, pi in segs:
            for cj, pj in segs:
                WS[:, pi, pj] += c[:, ci, cj]
    WS.diagonal(dim1=-2, dim2=-1).zero_()  # not a variable: recomputed from W 1 where needed
    return WS, (Lc, Y)


def _merge_first_grad(Wbar_S: torch.Tensor, m: Merge, Lc: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """Adjoint of the children's off-diagonals ``(N, P, P)`` from the parents' ``Wbar_S`` ``(n, p, p)``."""
    F = Wbar_S + Wbar_S.mT
    F.mul_(0.5)
    F.diagonal(dim1=-2, dim2=-1).zero_()
    X = torch.linalg.solve_triangular(Lc.mT, Y, upper=True)  # C^-1 W_CA, (n, s, p)
    FX = torch.bmm(F, X.mT)  # (n, p, s)
    Cbar = torch.bmm(X, FX).neg_()  # (n, s, s)
    dbar = Cbar.diagonal(dim1=-2, dim2=-1).clone()
    Wbar_AC = FX.mul_(2.0).add_(dbar[:, None, :])
    Wbar_CC = Cbar.neg_().add_(dbar[:, :, None])
    P = 2 * (m.h + m.w)
    n = F.shape[0]
    out = F.new_zeros(2 * n, P, P)
    a, b = out[:n], out[n:]
    segs_a, sep_a, segs_b, sep_b = _segments(m)
    for c, segs, sep in ((a, segs_a, sep_a), (b, segs_b, sep_b)):
        for ci, pi in segs:
            for cj, pj in segs:
                c[:, ci, cj] = F[:, pi, pj]
            c[:, ci, sep] = Wbar_AC[:, pi, :]
        c[:, sep, sep] = Wbar_CC
    return out


def _cell_order(rp: int, cp: int, levels: list[Merge]) -> list[int]:
    """Permutation of the dims of ``x.view(*[2] * (log2 rp + log2 cp), ...)`` (row bits, then
    column bits, most significant first) that puts the bit merged at level 1 most significant,
    then level 2's, ...: then at every level the two children are the two halves of the
    block axis, and the parents keep that order for the next level."""
    a = rp.bit_length() - 1
    used_r = used_c = 0
    order = []
    for m in levels:
        if m.side:
            order.append(a + (cp.bit_length() - 1) - 1 - used_c)
            used_c += 1
        else:
            order.append(a - 1 - used_r)
            used_r += 1
    return order


def _edge_conductances(rp: int, cp: int, r_source: float, r_sink: float, r_wire: float,
                       dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Port conductances of every cell (S), ``(4, rp, cp)`` for ``[L, R, T, B]``, and the pinned ports.

    Half segments ``2 / r_wire`` inside; ``1 / r_source`` on the left edge, ``1 / r_sink`` on the
    bottom edge, 0 (open) on the right and top edges. The real cells occupy the last ``rows``
    rows and first ``cols`` columns of the padded ``rp x cp`` grid. A zero end resistance
    *pins* the port to the cell's node (the row node is the source, or the column node the
    virtual ground): its conductance is stored as 0 and the mask ``(2, rp, cp)`` (``[L, B]``,
    1.0 where pinned) selects the leaf's limit formulas (:func:`_leaf`).
    """
    g = torch.full((4, rp, cp), 2.0 / r_wire, dtype=dtype, device=device)
    pinned = torch.zeros((2, rp, cp), dtype=dtype, device=device)
    g[0, :, 0] = 1.0 / r_source if r_source > 0.0 else 0.0
    pinned[0, :, 0] = float(r_source == 0.0)
    g[1, :, cp - 1] = 0.0
    g[2, 0, :] = 0.0
    g[3, rp - 1, :] = 1.0 / r_sink if r_sink > 0.0 else 0.0
    pinned[1, rp - 1, :] = float(r_sink == 0.0)
    return g, pinned


_NODE = [[0, 0, 1, 1], [0, 0, 1, 1], [1, 1, 2, 2], [1, 1, 2, 2]]


def _leaf(G: torch.Tensor, gg: torch.Tensor, g: torch.Tensor, pinned=None):
    """Port off-diagonals of single cells, blocks last ``(4, 4, cells, B)``, and what the adjoint needs.

    ``G``: ``(cells, B)``; ``g``: port conductances ``(4, cells, 1)`` ``[gl, gr, gt, gb]``, ``gg``
    their outer products with a zero diagonal ``(4, 4, cells, 1)``. Cell: u joined to ports
    L, R, w to T, B, G between u and w. Eliminating u and w (closed form, positive terms
    only): with ``gu = gl + gr``, ``gw = gt + gb``, ``det = gu gw + G (gu + gw)``, the node
    impedances are ``Muu = (gw + G) / det``, ``Mww = (gu + G) / det``, ``Muw = G / det``, and
    ``W[p, q] = g_p g_q M[node(p), node(q)]``.

    ``pinned`` (None, or masks ``(cells, 1)`` ``(only_l, only_b, both)``, 1.0 where true; see
    :meth:`_Plan.pin_masks`): cells whose L port is their row node u (r_source = 0) and/or
    whose B port is their column node w (r_sink = 0). Only the other node is
    eliminated; these are the limits ``gl -> inf`` / ``gb -> inf`` of the formulas above:
    L pinned: ``W[L,R] = gr``, ``W[L,T] = G gt / (G + gw)``, ``W[L,B] = G gb / (G + gw)``,
    ``W[T,B] = gt gb / (G + gw)``; B pinned: the same with the roles of the row and column
    swapped; both: ``W[L,R] = gr``, ``W[L,B] = G``, ``W[B,T] = gt``; all others 0.
    """
    gu, gw = g[0] + g[1], g[2] + g[3]
    det = gu * gw + G * (gu + gw)
    inv = 1.0 / det
    M3 = torch.stack(((gw + G) * inv, G * inv, (gu + G) * inv))  # Muu, Muw, Mww
    node = torch.tensor(_NODE, device=G.device)
    W = M3[node] * gg
    if pinned is None:
        return W, (gu, gw, inv, None)
    gl, gr, gt, gb = g
    only_l, only_b, both = pinned
    # L pinned: eliminate w only; B pinned: u only (0 elsewhere: a padded 0 S cell may have G + gw = 0)
    inv_l = torch.where(only_l > 0, 1.0 / (G + gw), 0.0)
    inv_b = torch.where(only_b > 0, 1.0 / (G + gu), 0.0)
    lim = torch.zeros_like(W)
    lim[0, 1] = gr * (only_l + both) + gl * gr * inv_b * only_b
    lim[0, 2] = G * gt * inv_l * only_l
    lim[0, 3] = G * gb * inv_l * only_l + G * gl * inv_b * only_b + G * both
    lim[1, 3] = G * gr * inv_b * only_b
    lim[2, 3] = gt * gb * inv_l * only_l + gt * (only_b + both)
    lim = lim + lim.transpose(0, 1)
    general = only_l + only_b + both == 0
    W = torch.where(general, W, lim)  # where: the general formula may divide by 0 there
    return W, (gu, gw, inv, (only_l, only_b, both, general, inv_l, inv_b))


def _leaf_grad(Wbar: torch.Tensor, g: torch.Tensor, aux) -> torch.Tensor:
    """Adjoint of G ``(cells, B)`` from that of the leaf off-diagonals ``Wbar`` ``(4, 4, cells, B)``.

    ``dMuu/dG = -gw^2 / det^2``, ``dMww/dG = -gu^2 / det^2``, ``dMuw/dG = gu gw / det^2``; for
    pinned cells the derivatives of :func:`_leaf`'s limit formulas.
    """
    gu, gw, inv, pins = aux
    gl, gr, gt, gb = g
    S = Wbar + Wbar.transpose(0, 1)  # each off-diagonal pair once, counted for both entries
    s_uu = S[0, 1] * (gl * gr)
    s_ww = S[2, 3] * (gt * gb)
    s_uw = (S[0, 2] * gt + S[0, 3] * gb) * gl + (S[1, 2] * gt + S[1, 3] * gb) * gr
    grad = (gu * gw * s_uw - gw * gw * s_uu - gu * gu * s_ww) * inv * inv
    if pins is None:
        return grad
    only_l, only_b, both, general, inv_l, inv_b = pins
    grad_l = (gw * (S[0, 2] * gt + S[0, 3] * gb) - S[2, 3] * gt * gb) * inv_l * inv_l
    grad_b = (gu * (S[0, 3] * gl + S[1, 3] * gr) - S[0, 1] * gl * gr) * inv_b * inv_b
    return torch.where(general, grad, grad_l * only_l + grad_b * only_b + S[0, 3] * both)


# Levels whose separator has at most this many nodes run in the blocks-last layout.
BLOCKS_LAST_MAX_SEP = 4


class _Plan:
    """Levels, padded sizes, cell order and port conductances of one tile shape."""

    def __init__(self, rows, cols, r_source, r_sink, r_wire, dtype, device):
        self.rows, self.cols = rows, cols
        self.rp, self.cp, self.levels = merge_schedule(rows, cols)
        self.bits = (self.rp.bit_length() - 1) + (self.cp.bit_length() - 1)
        self.order = _cell_order(self.rp, self.cp, self.levels)
        g, pinned = _edge_conductances(self.rp, self.cp, r_source, r_sink, r_wire, dtype, device)
        self.g = self.to_cells(g.unsqueeze(-1))  # (4, cells, 1)
        self.pinned = self.pin_masks(pinned) if r_source == 0.0 or r_sink == 0.0 else None
        self.gg = self.g[:, None] * self.g[None, :]
        self.gg.diagonal(dim1=0, dim2=1).zero_()
        self.n_last = sum(1 for m in self.levels if m.sep <= max(1, BLOCKS_LAST_MAX_SEP))
        # the final block's ports: L (sources) and B (sinks)
        self.src = slice(0, self.rp)
        self.snk = slice(2 * self.rp + self.cp, 2 * self.rp + 2 * self.cp)

    def pin_masks(self, pinned: torch.Tensor):
        """``(only_l, only_b, both)``, each ``(cells, 1)`` in merge order, from the ``(2, rp, cp)``
        pinned-port mask of :func:`_edge_conductances`: formed once per plan, broadcast over tiles."""
        pl, pb = self.to_cells(pinned.unsqueeze(-1))
        return pl * (1 - pb), pb * (1 - pl), pl * pb

    def to_cells(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., rp, cp, B)`` -> ``(..., cells, B)`` in merge order."""
        lead = x.shape[:-3]
        k = len(lead)
        x = x.reshape(*lead, *([2] * self.bits), x.shape[-1])
        perm = list(range(k)) + [k + i for i in self.order] + [k + self.bits]
        return x.permute(perm).reshape(*lead, -1, x.shape[-1])

    def from_cells(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`to_cells` for ``(cells, B)`` -> ``(rp, cp, B)``."""
        B = x.shape[-1]
        x = x.reshape(*([2] * self.bits), B)
        inv = [0] * self.bits
        for pos, dim in enumerate(self.order):
            inv[dim] = pos
        return x.permute(inv + [self.bits]).reshape(self.rp, self.cp, B)


def _forward(G: torch.Tensor, plan: _Plan, keep: bool):
    """T of ``(B, rows, cols)`` tiles; with ``keep`` the per-level ``(Lc, Y)`` for the adjoint."""
    B, rows, cols = G.shape
    Gp = G.new_zeros(plan.rp, plan.cp, B)
    Gp[plan.rp - rows:, :cols] = G.permute(1, 2, 0)  # padding: top rows, right columns (open ends)
    W, leaf_aux = _leaf(plan.to_cells(Gp), plan.gg, plan.g, plan.pinned)
    W = W.view(4, 4, -1)
    saved = []
    nlev = len(plan.levels)
    for k, m in enumerate(plan.levels):
        if k < plan.n_last:
            W, state = _merge_last(W, m)
            if k == plan.n_last - 1 and k < nlev - 1:
                W = W.permute(2, 0, 1).contiguous()  # to blocks first for LAPACK and bmm
        else:
            W, state = _merge_first(W, m, only=(plan.src, plan.snk) if k == nlev - 1 else None)
        if keep:
            saved.append(state)
    if plan.n_last == nlev:  # blocks last to the end (small tiles): the top block is (P, P, B)
        T = W[plan.src, plan.snk].permute(2, 0, 1)
    else:
        T = W
    T = T.reshape(B, plan.rp, plan.cp)[:, plan.rp - rows:, :cols]
    return T, (saved, leaf_aux)


def _backward(Tbar: torch.Tensor, plan: _Plan, state) -> torch.Tensor:
    saved, leaf_aux = state
    B, rows, cols = Tbar.shape
    P = 2 * (plan.rp + plan.cp)
    nlev = len(plan.levels)
    if plan.n_last == nlev:
        Wbar = Tbar.new_zeros(P, P, B)
        Wbar[plan.src, plan.snk][plan.rp - rows:, :cols] = Tbar.permute(1, 2, 0)
    else:
        Wbar = Tbar.new_zeros(B, P, P)
        Wbar[:, plan.src, plan.snk][:, plan.rp - rows:, :cols] = Tbar
    for k in range(nlev - 1, -1, -1):
        m, (Lc, Y) = plan.levels[k], saved[k]
        if k < plan.n_last:
            if k == plan.n_last - 1 and k < nlev - 1:
                Wbar = Wbar.permute(1, 2, 0).contiguous()
            Wbar = _merge_last_grad(Wbar, m, Lc, Y)
        else:
            Wbar = _merge_first_grad(Wbar, m, Lc, Y)
    Gbar = _leaf_grad(Wbar.view(4, 4, -1, B), plan.g, leaf_aux)
    return plan.from_cells(Gbar).permute(2, 0, 1)[:, plan.rp - rows:, :cols]


class _WireND(torch.autograd.Function):
    """T of ``(B, rows, cols)`` tiles by nested dissection, with a hand-written adjoint."""

    @staticmethod
    def forward(ctx, G, r_source, r_sink, r_wire):
        B, rows, cols = G.shape
        plan = _Plan(rows, cols, r_source, r_sink, r_wire, G.dtype, G.device)
        keep = ctx.needs_input_grad[0]
        T, state = _forward(G, plan, keep)
        if keep:
            ctx.plan, ctx.state = plan, state
        return T.contiguous()

    @staticmethod
    def backward(ctx, Tbar):
        return _backward(Tbar.contiguous(), ctx.plan, ctx.state), None, None, None


def transfer_matrix_wire_nd(G: torch.Tensor, *, r_source: float, r_sink: float, r_wire: float) -> torch.Tensor:
    """Exact transfer matrix of crossbar tiles with resistive wires, by nested dissection.

    Args:
        G: device conductances in siemens, shape ``(..., rows, cols)``; leading dimensions
            batch over independent tiles. float32 or float64 (computed in this dtype).
        r_source: row driver output resistance, ohm (``>= 0``; 0 drives the row's first node).
        r_sink: column neuron input resistance, ohm (``>= 0``; 0 grounds the column's end).
        r_wire: resistance of every wire segment between neighbouring cells, ohm (``> 0``).

    Returns:
        T in siemens, shape ``(..., rows, cols)``, dtype of G, with ``I = V @ T`` (A) for
        row source voltages V (V). Differentiable in G (hand-written exact adjoint).

    Raises:
        ValueError: a negative or non-finite resistance, or ``r_wire = 0``.
    """
    for name, v in {"r_source": r_source, "r_sink": r_sink}.items():
        v = float(v)
        if not math.isfinite(v) or v < 0.0:
            raise ValueError(f"{name} must be a finite resistance >= 0 ohm (got {v})")
    if not math.isfinite(float(r_wire)) or float(r_wire) <= 0.0:
        raise ValueError(f"r_wire must be a finite resistance > 0 ohm for a wire solver (got {float(r_wire)}); "
                         "circuit.transfer_matrix handles r_wire = 0")
    rows, cols = G.shape[-2], G.shape[-1]
    batch = G.shape[:-2]
    T = _WireND.apply(G.reshape(-1, rows, cols), float(r_source), float(r_sink), float(r_wire))
    return T.reshape(*batch, rows, cols)


def source_admittance_wire_nd(G: torch.Tensor, *, r_source: float, r_sink: float, r_wire: float) -> torch.Tensor:
    """The rows' driving-point admittance Y of tiles with resistive wires (``J = Y V``), no gradient;
    see :func:`transfer_and_admittance_wire_nd`."""
    return transfer_and_admittance_wire_nd(G, r_source=r_source, r_sink=r_sink, r_wire=r_wire)[1]


def transfer_and_admittance_wire_nd(G: torch.Tensor, *, r_source: float, r_sink: float,
                                    r_wire: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The transfer matrix T and the rows' driving-point admittance Y of tiles with resistive wires,
    from one elimination (no gradient).

    ``J_i`` is the current that source i pushes through ``r_source`` when the sources hold ``V``
    and the neurons hold their inputs at 0 V (``shared/docs/crossbar-model.md`` section 10).
    It comes from the same elimination as :func:`transfer_matrix_wire_nd`: after the last level
    only the tile's terminals remain, and the off-diagonal conductances ``W`` between them are
    the network's exact port description with the sinks as ports. The sinks sit at 0 V, so the
    current out of source i is ``J_i = sum_k W[i, k] V_i - sum_{l in sources} W[i, l] V_l``
    (the node's Laplacian row, its diagonal the sum of all of its conductances to the other
    terminals: sinks, other sources, and the open ends, which carry 0). Hence

        Y = diag(W[L, :] 1) - W[L, L]        (W[L, L] with a zero diagonal)

    symmetric, with non-negative row sums ``Y 1 = W[L, B] 1 = T 1`` (reciprocity). Every entry
    is a sum of positive terms or the negative of one, so float32 keeps the digits (as for T).
    Only the last level differs from the transfer matrix's forward: it forms the source rows of
    the parent's port matrix against all of its ports instead of the ``L x B`` block.

    Args:
        G: conductances in siemens, ``(..., rows, cols)``.
        r_source, r_sink: ohm, ``>= 0`` (0 pins the terminal, as in the transfer matrix).
        r_wire: ohm, ``> 0``.

    Returns:
        ``(T, Y)`` in siemens, ``(..., rows, cols)`` and ``(..., rows, rows)``, dtype of G: T as
        :func:`transfer_matrix_wire_nd` gives it (``I = V @ T``), Y with ``J = Y V``.
    """
    if not math.isfinite(float(r_wire)) or float(r_wire) <= 0.0:
        raise ValueError(f"r_wire must be a finite resistance > 0 ohm for a wire solver (got {float(r_wire)})")
    rows, cols = G.shape[-2], G.shape[-1]
    batch = G.shape[:-2]
    G3 = G.detach().reshape(-1, rows, cols)
    B = G3.shape[0]
    plan = _Plan(rows, cols, float(r_source), float(r_sink), float(r_wire), G3.dtype, G3.device)
    with torch.no_grad():
        Gp = G3.new_zeros(plan.rp, plan.cp, B)
        Gp[plan.rp - rows:, :cols] = G3.permute(1, 2, 0)
        W, _ = _leaf(plan.to_cells(Gp), plan.gg, plan.g, plan.pinned)
        W = W.view(4, 4, -1)
        nlev = len(plan.levels)
        P = 2 * (plan.rp + plan.cp)
        for k, m in enumerate(plan.levels):
            if k < plan.n_last:
                W, _ = _merge_last(W, m)
                if k == plan.n_last - 1 and k < nlev - 1:
                    W = W.permute(2, 0, 1).contiguous()
            else:
                W, _ = _merge_first(W, m, only=(plan.src, slice(0, P)) if k == nlev - 1 else None)
        # the source rows against every port, blocks first: (B, rp, P)
        WL = W[plan.src].permute(2, 0, 1) if plan.n_last == nlev else W
        # a port's entry with itself is no conductance (the last level's partial product
        # leaves Y^T Y there): zero it before the row sums
        WL[:, :, plan.src].diagonal(dim1=-2, dim2=-1).zero_()
        Y = -WL[:, :, plan.src]
        Y.diagonal(dim1=-2, dim2=-1).copy_(WL.sum(-1))
        Y = Y[:, plan.rp - rows:, plan.rp - rows:]
        T = WL[:, plan.rp - rows:, plan.snk][:, :, :cols]
    return T.reshape(*batch, rows, cols), Y.reshape(*batch, rows, rows)
