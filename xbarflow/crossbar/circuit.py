"""Exact DC model of one memristive crossbar tile with driver and neuron resistances.

Circuit (see ``shared/docs/crossbar-model.md`` section 4)::

    V_i --[r_source]-- row i --(G_ij)-- column j --[r_sink]--> virtual ground

Without wire resistance every row is one node ``u_i`` and every column one node
``w_j``. Kirchhoff's current law is linear in V, so the column currents are
``I = V @ T`` with a *transfer matrix* T that depends only on G, ``r_source`` and
``r_sink``. T is the tile's effective conductance matrix: the non-ideal array
multiplies by T instead of by G.

Derivation used here (eliminate the row nodes, keep the ``cols x cols`` system)::

    r_i = sum_j G_ij,  c_j = sum_i G_ij
    a_i = 1 / (1 + r_source * r_i),   s_i = r_source * a_i
    B   = I + r_sink * (diag(c) - G^T diag(s) G)        (symmetric positive definite)
    T   = diag(a) @ G @ B^-1

Every quantity stays finite at ``r_source = 0`` or ``r_sink = 0`` (then a = 1,
s = 0, B = I and T = G), so the ideal limit needs no special case. When
``cols > rows`` the same formula is applied to ``G^T`` with the two resistances
swapped, which eliminates the other side and leaves the smaller system.

The gradient is hand-written: it reuses ``B^-1`` from the forward pass, so the
backward costs three matrix products of the tile's size.
"""
from __future__ import annotations

import math
import warnings
from typing import Optional, Tuple

import torch

__all__ = ["transfer_matrix", "transfer_columns_merged", "solve", "check_resistance", "check_conductance"]


def check_resistance(name: str, value: float) -> float:
    """Return ``value`` as a float, or raise ``ValueError`` naming ``name``.

    A resistance (ohm) must be finite and ``>= 0``.
    """
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar resistance in ohm (got shape {tuple(value.shape)})")
        value = float(value.item())
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number in ohm (got {value!r})") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite resistance >= 0 ohm (got {value})")
    return value


def check_conductance(name: str, G: torch.Tensor) -> Optional[Tuple[float, float]]:
    """Raise ``ValueError`` naming ``name`` unless G is a finite, non-negative, >=2-D float tensor.

    Returns ``(min, max)`` of G in siemens where the values were read (on the CPU), else None.
    """
    if not isinstance(G, torch.Tensor) or not G.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor of conductances in siemens")
    if G.dim() < 2:
        raise ValueError(f"{name} must have shape (..., rows, cols) (got {tuple(G.shape)})")
    if G.shape[-1] == 0 or G.shape[-2] == 0:
        raise ValueError(f"{name} must have at least one row and one column (got {tuple(G.shape)})")
    if not _host_checks(G):
        return None  # a value check would stop the host until the device catches up (NaN propagates)
    with torch.no_grad():
        extremes = torch.aminmax(G)  # one pass; NaN propagates to both
        lo, hi = float(extremes.min), float(extremes.max)
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise ValueError(f"{name} must be finite (found NaN or inf)")
        if lo < 0:
            raise ValueError(f"{name} must be >= 0 siemens (found {lo:.3e})")
    return lo, hi


def _host_checks(t: torch.Tensor) -> bool:
    """Whether checks that read values back to the host run for ``t``: always on the CPU.

    On an accelerator every such read is a device sync, which stalls the host once per
    layer and step; there the value checks of the hot path are skipped (conductances
    made by the layers are finite and >= 0 by construction, and a failed
    factorisation yields NaN, which reaches the loss) or amortised
    (:func:`_float64_if_needed`).
    """
    return t.device.type == "cpu"


# On accelerators the float32 conditioning estimate is read back once per this many
# solves of a given circuit (shape, resistances, device); once it asked for float64,
# that circuit stays in float64.
DEVICE_CHECK_EVERY = 64
_device_checks: dict = {}


# float32 results whose estimated relative error exceeds this are recomputed in float64.
FLOAT32_MAX_REL_ERROR = 1e-3
_EPS32 = float(torch.finfo(torch.float32).eps)


def float32_error_estimate(G: torch.Tensor, r_source: float, r_sink: float) -> float:
    """Estimated relative error of a float32 transfer matrix (cols x cols system).

    Rounding perturbs ``B = I + r_sink (diag(c) - G^T diag(s) G)`` by about
    ``eps * r_sink * max(c)``, while Gershgorin bounds its smallest eigenvalue from
    below by ``1 + r_sink * min_j (G^T a)_j`` (M is diagonally dominant with row
    sums ``G^T a``). Their ratio bounds the solution's relative error up to a
    constant. It grows when both resistances are large: the rows then float and
    M approaches a singular Laplacian.
    """
    with torch.no_grad():
        # in G's dtype: an estimate needs one digit, and a float64 copy of G costs a pass
        Gd = G.detach()
        a = 1.0 / (1.0 + r_source * Gd.sum(-1))
        c_max = float(Gd.sum(-2).max())
        lam_min = 1.0 + r_sink * float((Gd.mT @ a.unsqueeze(-1)).min())
    return _EPS32 * r_sink * c_max / lam_min


def _float64_if_needed(G: torch.Tensor, r_source: float, r_sink: float,
                       extremes: Optional[Tuple[float, float]] = None) -> bool:
    """True (with a warning) when a float32 result would lose its accuracy.

    ``extremes``: ``(min, max)`` of G if known (:func:`check_conductance`). The estimate's
    worst case over all tiles with entries in that range needs no pass over G, and settles
    the question for the usual device ranges.
    """
    if G.dtype != torch.float32 or r_sink == 0.0 or r_source == 0.0:
        return False  # with one side ideal, B is I + diagonal, or M is well-conditioned
    if extremes is not None:
        lo, hi = extremes
        rows, cols = G.shape[-2], G.shape[-1]
        # c_j <= rows hi and (G^T a)_j >= rows lo / (1 + r_source cols hi) in
        # float32_error_estimate's ratio
        worst = _EPS32 * r_sink * rows * hi / (1.0 + r_sink * rows * lo / (1.0 + r_source * cols * hi))
        if worst <= FLOAT32_MAX_REL_ERROR:
            return False
    if not _host_checks(G):
        key = (tuple(G.shape), r_source, r_sink, G.device)
        calls, sticky = _device_checks.get(key, (0, False))
        _device_checks[key] = (calls + 1, sticky)
        if sticky:
            return True
        if calls % DEVICE_CHECK_EVERY:
            return False
    err = float32_error_estimate(G, r_source, r_sink)
    if not _host_checks(G):
        _device_checks[key] = (calls + 1, err > FLOAT32_MAX_REL_ERROR)
    if err <= FLOAT32_MAX_REL_ERROR:
        return False
    warnings.warn(
        f"crossbar circuit too ill-conditioned for float32 (estimated relative error {err:.1e} with "
        f"r_source={r_source:g}, r_sink={r_sink:g} ohm): solving in float64",
        RuntimeWarning,
        stacklevel=3,
    )
    return True


def _cholesky(B: torch.Tensor) -> torch.Tensor:
    """Lower Cholesky factor of a batch of SPD matrices; raises (CPU) or gives NaN (accelerators) if not SPD."""
    L, info = torch.linalg.cholesky_ex(B)
    if _host_checks(B):
        if bool((info != 0).any()):
            raise ValueError(
                "crossbar system is not positive definite: conductances or resistances are "
                "too extreme for this precision (try float64)"
            )
    else:
        L = L.masked_fill((info != 0)[..., None, None], float("nan"))
    return L


# Batched LAPACK factorisations of small matrices run at a few GFLOP/s on CPU (a 64x64
# Cholesky costs as much as eight 64x64 products), so :func:`_spd_inverse` splits larger
# systems in halves and inverts only blocks of at most this size through LAPACK (16 when
# the batch is large: many small calls still beat one large unblocked one). Measured with
# 2 threads, float32: 208 tiles of 64x64 5.3 ms (LAPACK) -> 2.7 ms; 2 of 500x500
# 7.9 ms -> 4.6-5.1 ms (1 thread).
SPD_INVERSE_LEAF = 32
SPD_INVERSE_LEAF_LARGE_BATCH = 16


def _spd_inverse_lapack(B: torch.Tensor) -> torch.Tensor:
    """Inverse of a batch of SPD matrices through Cholesky.

    Forms ``L^-1`` with one batched triangular solve and then ``L^-T L^-1`` with a
    matmul: on CPU, batched LAPACK solves with many right-hand sides are several
    times slower than batched matmul, so every later use of ``B^-1`` is a matmul.
    """
    L = _cholesky(B)
    eye = torch.eye(B.shape[-1], dtype=B.dtype, device=B.device).expand_as(B)
    L_inv = torch.linalg.solve_triangular(L, eye, upper=False)
    return L_inv.mT @ L_inv


def _spd_inverse(B: torch.Tensor) -> torch.Tensor:
    """Inverse of a batch of SPD matrices ``(..., n, n)``; reads only the lower triangle's blocks.

    Block inversion through the Schur complement, ``B = [[A, C^T], [C, D]]``::

        W = C A^-1,  S = D - W C^T (SPD),  B^-1 = [[A^-1 + W^T S^-1 W, -(S^-1 W)^T], [-S^-1 W, S^-1]]

    recursing into ``A`` and ``S`` down to LAPACK's Cholesky for small blocks. It is as
    accurate as the Cholesky route for SPD matrices (no pivoting is needed, and each
    Schur complement is SPD); the work moves into batched products. A matrix that is
    not SPD fails in a leaf's Cholesky factorisation (ValueError on CPU, NaN elsewhere).
    """
    n = B.shape[-1]
    batch = B.numel() // (n * n) if n else 0
    leaf = SPD_INVERSE_LEAF_LARGE_BATCH if batch >= 128 else SPD_INVERSE_LEAF
    if n <= leaf:
        return _spd_inverse_lapack(B)
    h = n // 2
    A_inv = _spd_inverse(B[..., :h, :h])
    C = B[..., h:, :h]
    W = C @ A_inv
    S_inv = _spd_inverse(B[..., h:, h:] - W @ C.mT)
    X21 = (S_inv @ W).neg_()
    out = B.new_empty(B.shape)
    out[..., h:, :h] = X21
    out[..., :h, h:] = X21.mT
    out[..., h:, h:] = S_inv
    out[..., :h, :h] = A_inv - W.mT @ X21
    return out


def _scaled_bmm(A: torch.Tensor, B: torch.Tensor, alpha: float) -> torch.Tensor:
    """``alpha * (A @ B)`` for equal batch shapes, the scale applied inside the BLAS call (no extra pass)."""
    lead = A.shape[:-2]
    A3, B3 = A.reshape(-1, *A.shape[-2:]), B.reshape(-1, *B.shape[-2:])
    zero = A.new_zeros(()).expand(A3.shape[0], A3.shape[1], B3.shape[2])  # ignored: beta = 0
    return torch.baddbmm(zero, A3, B3, beta=0, alpha=alpha).reshape(*lead, A.shape[-2], B.shape[-1])


def _rowdot(X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """``(X * Y).sum(-1)`` as one batched product of inner size ``X.shape[-1]`` (no temporary)."""
    n = X.shape[-1]
    return (X.reshape(-1, 1, n) @ Y.reshape(-1, n, 1)).reshape(X.shape[:-1])


# From this many columns on, the Gram product forms only B's lower block triangle (3/4 of the
# flops); below it the three smaller products cost more than the quarter they save.
# Measured with 2 threads, float32, two 784x500 tiles: 2.69 -> 2.20 ms.
GRAM_LOWER_MIN_COLS = 256


def _gram_lower(aG: torch.Tensor, G: torch.Tensor, alpha: float) -> torch.Tensor:
    """``alpha (aG)^T G`` with its upper-right block ``[:h, h:]`` left at zero (``h = cols // 2``).

    The two products ``alpha (aG)[:, h:]^T G`` (rows ``h:``) and ``alpha (aG)[:, :h]^T G[:, :h]``
    cover the lower triangle, which is all the Cholesky factorisations and the block inverse
    read.
    """
    n = G.shape[-1]
    h = n // 2
    B = G.new_empty(*G.shape[:-2], n, n)
    B[..., h:, :] = _scaled_bmm(aG[..., h:].mT, G, alpha)
    B[..., :h, :h] = _scaled_bmm(aG[..., :h].mT, G[..., :h], alpha)
    B[..., :h, h:] = 0.0
    return B


def _cols_matrix(G: torch.Tensor, r_source: float, r_sink: float, sink_weight: Optional[torch.Tensor] = None):
    """``(a, diag(a) G, B)`` of the ``cols x cols`` system ``B = D + r_sink (diag(c) - G^T diag(s) G)``.

    ``a = 1 / (1 + r_source r)`` per row, ``s = r_source a``, ``D = diag(sink_weight)`` (I by
    default). ``G^T diag(s) G = r_source (aG)^T G`` is one product, its scale applied inside
    the BLAS call. Only the lower triangle of B is ever read (Cholesky factorisations and
    :func:`_spd_inverse`), so the Gram product's rounding needs no symmetrising, and from
    :data:`GRAM_LOWER_MIN_COLS` columns on its upper-right block is not computed (zero).
    """
    a = 1.0 / (1.0 + r_source * G.sum(-1))
    aG = a.unsqueeze(-1) * G
    if r_source > 0 and G.shape[-1] >= GRAM_LOWER_MIN_COLS:
        B = _gram_lower(aG, G, -r_source * r_sink)
    elif r_source > 0:
        B = _scaled_bmm(aG.mT, G, -r_source * r_sink)
    else:
        B = G.new_zeros(*G.shape[:-2], G.shape[-1], G.shape[-1])
    diag = B.diagonal(dim1=-2, dim2=-1).add_(G.sum(-2), alpha=r_sink)
    diag.add_(1.0) if sink_weight is None else diag.add_(sink_weight)
    return a, aG, B


def _transfer_cols_forward(G: torch.Tensor, r_source: float, r_sink: float,
                           sink_weight: Optional[torch.Tensor] = None) -> Tuple[Optional[torch.Tensor], ...]:
    """T = diag(a) G B^-1 with the ``cols x cols`` system; returns T and what backward needs.

    ``sink_weight`` (shape ``(cols,)``, default all 1) scales each column's sink conductance
    ``1 / r_sink``: column j stands for ``sink_weight[j]`` identical columns in parallel (see
    :func:`transfer_columns_merged`); B's diagonal gets ``sink_weight`` instead of 1.
    """
    if r_sink == 0.0:
        a = 1.0 / (1.0 + r_source * G.sum(-1))
        return a.unsqueeze(-1) * G, a, None
    a, aG, B = _cols_matrix(G, r_source, r_sink, sink_weight)
    B_inv = _spd_inverse(B)
    T = aG @ B_inv
    return T, a, B_inv


class _TransferCols(torch.autograd.Function):
    """Autograd wrapper of :func:`_transfer_cols_forward` with a hand-written backward
    (``sink_weight`` is a constant of the circuit: B's diagonal moves, dB/dG does not)."""

    @staticmethod
    def forward(ctx, G, r_source, r_sink, sink_weight=None):
        T, a, B_inv = _transfer_cols_forward(G, r_source, r_sink, sink_weight)
        ctx.r_source, ctx.r_sink = r_source, r_sink
        ctx.save_for_backward(G, T, a, B_inv if B_inv is not None else G.new_empty(0))
        return T

    @staticmethod
    def backward(ctx, grad_T):
        G, T, a, B_inv = ctx.saved_tensors
        rs, rk = ctx.r_source, ctx.r_sink
        if rk == 0.0:
            # T = diag(a) G
            grad_G = a.unsqueeze(-1) * grad_T
            grad_a = (grad_T * G).sum(-1)
            if rs > 0.0:
                grad_G.add_((-rs * a * a * grad_a).unsqueeze(-1))
            return grad_G, None, None, None
        # With X = B^-1 and K0 = Gamma X: dL/dB = P = -sym(T^T K0) (T^T K0 = H^T diag(a)
        # Gamma X with H = G X, written without H); S = T^T K0 + K0^T T = -2 P.
        K0 = grad_T @ B_inv
        P1 = T.mT @ K0
        grad_c = (-rk) * torch.diagonal(P1, dim1=-2, dim2=-1)
        # d<Gamma, T>/da through T directly: rowsum(Gamma o H) = rowsum(Gamma o T) / a
        grad_a_raw = _rowdot(grad_T, T)
        if rs > 0.0:
            # through G^T diag(s) G: dL/dG += 2 diag(s) G (-rk P) = diag(a) (rs rk G S) =: diag(a) M,
            # and dL/ds = rk/2 rowsum((G S) o G), i.e. dL/da += rowsum(M o G) / 2
            M = _scaled_bmm(G, P1 + P1.mT, rs * rk)  # (not in place: P1 += P1^T would read updated entries)
            grad_a = grad_a_raw.div_(a).add_(_rowdot(M, G), alpha=0.5)
            M.add_(K0)
        else:
            M = K0
            grad_a = grad_a_raw.div_(a)
        grad_r = (-rs) * a * a * grad_a
        # dL/dG = diag(a) M + 1 grad_c^T + grad_r 1^T: the two rank-1 terms in one product of
        # inner size 2 (one pass), written before the row scaling as diag(a) [1/a, grad_r/a] [grad_c; 1]
        inv_a = a.reciprocal()
        U = torch.stack((inv_a, grad_r * inv_a), dim=-1)                          # (..., rows, 2)
        V = torch.stack((grad_c, torch.ones_like(grad_c)), dim=-2)                # (..., 2, cols)
        lead = M.shape[:-2]
        M3 = M.reshape(-1, *M.shape[-2:])
        M3.baddbmm_(U.reshape(-1, *U.shape[-2:]), V.reshape(-1, *V.shape[-2:]))
        grad_G = M3.reshape(*lead, *M.shape[-2:]).mul_(a.unsqueeze(-1))
        return grad_G, None, None, None


# Which exact solver handles r_wire > 0: "sweep" (xbarflow.crossbar.wire, the reference,
# ~14 n^4 flops per n x n tile), "nested" (xbarflow.crossbar.wire_nd, nested dissection,
# ~215 n^3 flops but memory-bound per level in eager PyTorch), or "auto": nested dissection
# where it was measured faster (both tile sides >= WIRE_ND_MIN_SIZE), else the sweep. Both
# take any r_source, r_sink >= 0. Measured with scripts/bench_wire_nd.py (1 CPU thread,
# float32, TAT step of the FCN 784-500-10, batch 128): 64x64 tiles sweep 1.16 s / nested
# 3.22 s, 128x128 2.99 s / 3.60 s, 256x256 20.8 s / 4.78 s. Hence 256.
WIRE_SOLVER = "auto"
WIRE_ND_MIN_SIZE = 256


def uses_nested_dissection(rows: int, cols: int, wire_solver: str) -> bool:
    """Whether :func:`transfer_matrix` solves ``rows x cols`` tiles with wire by nested dissection
    (``wire_solver`` as there); the memory estimate asks the same question."""
    if wire_solver not in ("auto", "sweep", "nested"):
        raise ValueError(f"wire_solver must be 'auto', 'sweep' or 'nested' (got {wire_solver!r})")
    if wire_solver == "nested":
        return True
    return wire_solver == "auto" and min(rows, cols) >= WIRE_ND_MIN_SIZE


def transfer_matrix(G: torch.Tensor, *, r_source: float, r_sink: float, r_wire: float = 0.0,
                    wire_solver: Optional[str] = None) -> torch.Tensor:
    """Exact transfer matrix T of crossbar tiles, with column currents ``I = V @ T``.

    Args:
        G: conductances in siemens, shape ``(..., rows, cols)``; leading dimensions
            batch over independent tiles. float32 or float64.
        r_source: output resistance of every row driver, ohm (>= 0).
        r_sink: input resistance of every column neuron, ohm (>= 0).
        r_wire: resistance of each wire segment between neighbouring cells, ohm.
            ``0`` uses the exact two-node-per-line model; ``> 0`` solves the full
            ``2 * rows * cols`` node network (see :mod:`xbarflow.crossbar.wire`).
        wire_solver: for ``r_wire > 0``: ``"sweep"``, ``"nested"`` (nested dissection,
            :mod:`xbarflow.crossbar.wire_nd`) or ``"auto"``; ``None`` uses the module
            default :data:`WIRE_SOLVER`. Both are exact; they differ in speed only.

    Returns:
        T in siemens, shape ``(..., rows, cols)``, same dtype as G. Differentiable
        with respect to G (exact gradient).

    Raises:
        ValueError: negative or non-finite resistance or conductance.
    """
    extremes = check_conductance("G", G)
    r_source = check_resistance("r_source", r_source)
    r_sink = check_resistance("r_sink", r_sink)
    r_wire = check_resistance("r_wire", r_wire)
    if r_wire > 0.0:
        if uses_nested_dissection(G.shape[-2], G.shape[-1], wire_solver or WIRE_SOLVER):
            from . import wire_nd

            return wire_nd.transfer_matrix_wire_nd(G, r_source=r_source, r_sink=r_sink, r_wire=r_wire)
        from . import wire  # imported lazily: optional, heavier solver

        return wire.transfer_matrix_wire(G, r_source=r_source, r_sink=r_sink, r_wire=r_wire)
    if r_source == 0.0 and r_sink == 0.0:
        return G.clone() if not G.requires_grad else G * 1.0
    rows, cols = G.shape[-2], G.shape[-1]
    # Eliminating the columns instead is the same formula on the transposed circuit.
    Gc, rs, rk = (G, r_source, r_sink) if cols <= rows else (G.mT, r_sink, r_source)
    if _float64_if_needed(Gc, rs, rk, extremes):
        T = _TransferCols.apply(Gc.double(), rs, rk).to(G.dtype)
    else:
        T = _TransferCols.apply(Gc, rs, rk)
    return T if cols <= rows else T.mT


def solve(G: torch.Tensor, V: torch.Tensor, *, r_source: float, r_sink: float, r_wire: float = 0.0) -> torch.Tensor:
    """Currents into the column neurons of crossbar tiles driven by row voltages.

    Args:
        G: conductances in siemens, shape ``(..., rows, cols)``.
        V: source voltages in volts, shape ``(..., batch, rows)``; leading dimensions
            broadcast against those of G.
        r_source, r_sink, r_wire: resistances in ohm, as in :func:`transfer_matrix`.

    Returns:
        I in amperes, shape ``(..., batch, cols)``: the current through each
        column's ``r_sink`` into the neuron's virtual ground.
    """
    check_conductance("G", G)
    if not isinstance(V, torch.Tensor) or not V.is_floating_point():
        raise ValueError("V must be a floating-point tensor of voltages in volts")
    if V.dim() < 2 or V.shape[-1] != G.shape[-2]:
        raise ValueError(
            f"V must have shape (..., batch, rows={G.shape[-2]}) to match G {tuple(G.shape)} "
            f"(got {tuple(V.shape)})"
        )
    if not bool(torch.isfinite(V).all()):
        raise ValueError("V must be finite (found NaN or inf)")
    T = transfer_matrix(G, r_source=r_source, r_sink=r_sink, r_wire=r_wire)
    return V @ T


def transfer_columns_merged(G: torch.Tensor, copies: int, *, r_source: float, r_sink: float,
                            keep_merged: bool = False) -> torch.Tensor:
    """Transfer matrix of tiles whose last ``copies`` columns are identical, given one of them (no input checks).

    Identical columns sit at one voltage (the circuit is symmetric in them), so they act
    as one column of conductance ``copies * g`` per row draining through
    ``r_sink / copies``: B's diagonal entry for it is ``copies`` instead of 1
    (``sink_weight``). This is how a tile's padded columns (all ``g_min`` on nominal
    devices) load its rows without being solved for: a 500x10 layer on a 784x500 array
    solves an 11-column system.

    Args:
        G: conductances in siemens, ``(..., rows, used + 1)``: the ``used >= 1`` columns
            whose currents are wanted, then one of the ``copies`` identical columns.
        copies: how many identical columns the last one stands for (``>= 1``).
        r_source, r_sink: resistances in ohm (``>= 0``; no wire resistance).
        keep_merged: also return the merged column's transfer: that of each one of the
            identical columns.

    Returns:
        ``(..., rows, used)`` in siemens (``used + 1`` with ``keep_merged``): the used columns of
        the whole tile's ``transfer_matrix``. Exact; differentiable in G (the last column's
        gradient is that of all ``copies`` columns moved together).
    """
    used = G.shape[-1] - 1
    assert used >= 1 and copies >= 1
    G_red = torch.cat((G[..., :used], G[..., used:] * copies), dim=-1) if copies > 1 else G
    sink_weight = torch.ones(used + 1, dtype=G.dtype, device=G.device)
    sink_weight[-1] = copies
    # conditioning as for the unmerged circuit: scaling the merged column by 1/sqrt(copies)
    # on both sides of B gives the single column's entries
    if _float64_if_needed(G, r_source, r_sink):
        T = _TransferCols.apply(G_red.double(), r_source, r_sink, sink_weight.double()).to(G.dtype)
    else:
        T = _TransferCols.apply(G_red, r_source, r_sink, sink_weight)
    return T if keep_merged else T[..., :used]


# ---------------------------------------------------------------------------
# Low-rank paths: the same exact circuit, evaluated through the Cholesky factor
# of B without ever forming B^-1 or the full T. They pay off when only a few
# columns of T are used (padded tiles) or when T is only ever applied to a
# small batch of inputs (a training forward with batch < cols). Both require
# ``cols <= rows`` (the cols x cols system) and ``r_source, r_sink > 0``; callers
# fall back to :func:`transfer_matrix` otherwise.
# ---------------------------------------------------------------------------


def _cols_system(G: torch.Tensor, r_source: float, r_sink: float):
    """``(a, s, L, aG)`` of the ``cols x cols`` system: row factors a, s, ``B = L L^T`` and ``diag(a) G``."""
    a, aG, B = _cols_matrix(G, r_source, r_sink)
    return a, r_source * a, _cholesky(B), aG


def _grad_factored(G, a, s, L, Lf, Xr, F1, r_source, r_sink):
    """Gradient w.r.t. G of ``<Gamma, T>`` for a rank-r cotangent ``Gamma = Lf Rf^T``.

    With ``X = B^-1``, ``H = G X`` and ``T = diag(a) G X`` (see ``_TransferCols``):
    ``dL/dB = P = -X G^T diag(a) Gamma X = -F1 Xr^T`` with ``Xr = X Rf`` and
    ``F1 = X G^T diag(a) Lf``. Every term is then a product with inner size r,
    so the cost is ``O(rows * cols * r)`` instead of ``O(rows * cols^2)``.

    Shapes: G ``(..., R, n)``; a, s ``(..., R)``; Lf ``(..., R, r)``; Xr, F1 ``(..., n, r)``.
    Returns ``(grad_G, GXr)`` where ``GXr = G Xr`` (reused for input gradients).
    """
    rs, rk = r_source, r_sink
    GXr = G @ Xr
    GF1 = G @ F1
    # d<Gamma, T>/da (direct) = rowsum(Gamma o H) = rowsum(Lf o G X Rf)
    grad_a = (Lf * GXr).sum(-1)
    # through s: rowsum((G Q) o G) with G Q = (rk/2)(GF1 Xr^T + GXr F1^T) collapses to rk rowsum(GF1 o GXr)
    grad_a = grad_a + (rs * rk) * (GF1 * GXr).sum(-1)
    grad_r = (-rs) * a * a * grad_a
    # diag(P) for the column sums c (dB/dc = rk I)
    grad_c = (-rk) * (F1 * Xr).sum(-1)
    rk_s = (rk * s).unsqueeze(-1)
    grad_G = (a.unsqueeze(-1) * Lf + rk_s * GF1) @ Xr.mT
    # in place: each pass over a rows x cols gradient costs as much as a small product
    grad_G.add_((rk_s * GXr) @ F1.mT).add_(grad_c.unsqueeze(-2)).add_(grad_r.unsqueeze(-1))
    return grad_G, GXr


class _TransferColumns(torch.autograd.Function):
    """The first ``u`` columns of T through Cholesky solves (padded tiles use few columns)."""

    @staticmethod
    def forward(ctx, G, r_source, r_sink, u):
        a, s, L, aG = _cols_system(G, r_source, r_sink)
        n = G.shape[-1]
        E = torch.eye(n, u, dtype=G.dtype, device=G.device).expand(*G.shape[:-2], n, u)
        Xu = torch.cholesky_solve(E, L)                       # B^-1 E, (..., n, u)
        T = aG @ Xu
        ctx.r = (r_source, r_sink)
        ctx.save_for_backward(G, a, s, L, Xu)
        return T

    @staticmethod
    def backward(ctx, grad_T):
        G, a, s, L, Xu = ctx.saved_tensors
        # Gamma = grad_T E^T: Lf = grad_T, Rf = E, so Xr = X E = Xu
        F1 = torch.cholesky_solve(G.mT @ (a.unsqueeze(-1) * grad_T), L)
        grad_G, _ = _grad_factored(G, a, s, L, grad_T, Xu, F1, *ctx.r)
        return grad_G, None, None, None


class _ApplyTransfer(torch.autograd.Function):
    """``Y = U T = U diag(a) G B^-1`` without forming T (inputs ``U`` of a small batch)."""

    @staticmethod
    def forward(ctx, U, G, r_source, r_sink):
        a, s, L, aG = _cols_system(G, r_source, r_sink)
        Z = U @ aG                                            # (..., m, n)
        Y = torch.cholesky_solve(Z.mT, L).mT                  # Z B^-1
        ctx.r = (r_source, r_sink)
        ctx.save_for_backward(U, G, a, s, L, Y)
        return Y

    @staticmethod
    def backward(ctx, grad_Y):
        U, G, a, s, L, Y = ctx.saved_tensors
        # Gamma = U^T grad_Y: Lf = U^T, Rf = grad_Y^T; F1 = X G^T diag(a) U^T = Y^T (forward output)
        Xr = torch.cholesky_solve(grad_Y.mT, L)
        grad_G, GXr = _grad_factored(G, a, s, L, U.mT, Xr, Y.mT, *ctx.r)
        grad_U = None
        if ctx.needs_input_grad[0]:
            # dL/dU = grad_Y T^T = grad_Y X G^T diag(a) = (G Xr)^T diag(a)
            grad_U = (a.unsqueeze(-1) * GXr).mT.sum_to_size(U.shape)  # U may broadcast over tiles
        return grad_U, grad_G, None, None


def transfer_columns(G: torch.Tensor, u: int, *, r_source: float, r_sink: float) -> torch.Tensor:
    """``transfer_matrix(G, ...)[..., :u]`` computed without the unused columns (no input checks).

    Args:
        G: conductances in siemens, ``(..., rows, cols)`` with ``cols <= rows``.
        u: number of leading columns wanted, ``1 <= u <= cols``.
        r_source, r_sink: resistances in ohm, both ``> 0``.

    Returns:
        ``T[..., :u]`` in siemens, shape ``(..., rows, u)``; exact, differentiable in G.
        Cost ``O(rows cols^2)`` for the Gram product plus ``O(cols^2 u + rows cols u)``,
        against ``O(rows cols^2 + cols^3)`` more for the full T.
    """
    assert G.shape[-1] <= G.shape[-2] and r_source > 0 and r_sink > 0 and 1 <= u <= G.shape[-1]
    if _float64_if_needed(G, r_source, r_sink):
        return _TransferColumns.apply(G.double(), float(r_source), float(r_sink), int(u)).to(G.dtype)
    return _TransferColumns.apply(G, float(r_source), float(r_sink), int(u))


def apply_transfer(U: torch.Tensor, G: torch.Tensor, *, r_source: float, r_sink: float,
                   extremes: Optional[Tuple[float, float]] = None) -> torch.Tensor:
    """``U @ transfer_matrix(G, ...)`` without forming T (no input checks).

    Args:
        U: row inputs, ``(..., m, rows)`` (any unit; the result is linear in U).
        G: conductances in siemens, ``(..., rows, cols)`` with ``cols <= rows``;
            leading dimensions broadcast against U's.
        r_source, r_sink: resistances in ohm, both ``> 0``.
        extremes: ``(min, max)`` of G from :func:`check_conductance`, if known (saves the
            float32 accuracy check its passes over G).

    Returns:
        ``U T``, shape ``(..., m, cols)``; exact, differentiable in U and G. Every
        product has inner size ``m`` (besides the Gram product and the Cholesky
        factorisation), which is cheaper than the explicit T when ``m < cols``.
    """
    assert G.shape[-1] <= G.shape[-2] and r_source > 0 and r_sink > 0
    if _float64_if_needed(G, r_source, r_sink, extremes):
        return _ApplyTransfer.apply(U.double(), G.double(), float(r_source), float(r_sink)).to(U.dtype)
    return _ApplyTransfer.apply(U, G, float(r_source), float(r_sink))
