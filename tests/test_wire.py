"""The wire-resistance solver against an independent sparse nodal analysis, ngspice, limits, gradients."""
import os
import re
import shutil
import subprocess

import numpy as np
import pytest
import scipy.sparse as sp
import scipy.sparse.linalg as spla
import torch

from xbarflow.crossbar import transfer_matrix, wire
from xbarflow.crossbar.wire import transfer_matrix_wire

pytestmark = pytest.mark.numerics


def sparse_nodal_transfer(G, r_source, r_sink, r_wire):
    """Reference T (S, ``rows x cols``) of one tile from a full nodal analysis (scipy.sparse, float64).

    Written node by node from Kirchhoff's current law on the netlist, independent of the
    library's algebra. Unknowns: row node u_ij (index ``i*cols + j``) and column node w_ij
    (index ``n + i*cols + j``). A zero r_source fixes u_i0 = V_i and a zero r_sink grounds
    w_{rows-1,j}; both are eliminated by substitution. One solve per unit input.
    """
    G = np.asarray(G, dtype=np.float64)
    rows, cols = G.shape
    n = rows * cols
    N = 2 * n
    def u(i, j):
        return i * cols + j

    def w(i, j):
        return n + i * cols + j

    # edges (a, b, conductance); b = -1 means ground, b = ("src", i) means the source of row i
    entries = {}

    def add(p, q, val):
        entries[(p, q)] = entries.get((p, q), 0.0) + val

    src_edges = []  # (node, conductance, row) for r_source > 0
    gnd = []        # (node, conductance)
    edges = []
    g_w = 1.0 / r_wire
    for i in range(rows):
        for j in range(cols):
            edges.append((u(i, j), w(i, j), G[i, j]))
            if j + 1 < cols:
                edges.append((u(i, j), u(i, j + 1), g_w))
            if i + 1 < rows:
                edges.append((w(i, j), w(i + 1, j), g_w))
        if r_source > 0:
            src_edges.append((u(i, 0), 1.0 / r_source, i))
    if r_sink > 0:
        for j in range(cols):
            gnd.append((w(rows - 1, j), 1.0 / r_sink))
    for a, b, g in edges:
        add(a, a, g)
        add(b, b, g)
        add(a, b, -g)
        add(b, a, -g)
    for a, g, _ in src_edges:
        add(a, a, g)
    for a, g in gnd:
        add(a, a, g)
    keys = np.array(list(entries.keys()))
    Y = sp.csr_matrix((list(entries.values()), (keys[:, 0], keys[:, 1])), shape=(N, N))

    fixed = []
    if r_source == 0:
        fixed += [u(i, 0) for i in range(rows)]
    if r_sink == 0:
        fixed += [w(rows - 1, j) for j in range(cols)]
    free = np.setdiff1d(np.arange(N), fixed)
    Yff = Y[free][:, free].tocsc()
    Yfx = Y[free][:, fixed] if fixed else None
    lu = spla.splu(Yff)
    T = np.zeros((rows, cols))
    for k in range(rows):
        x = np.zeros(N)
        J = np.zeros(N)
        if r_source > 0:
            J[u(k, 0)] = 1.0 / r_source
        else:
            x[u(k, 0)] = 1.0
        rhs = J[free] - (Yfx @ x[fixed] if fixed else 0.0)
        x[free] = lu.solve(rhs)
        for j in range(cols):
            node = w(rows - 1, j)
            if r_sink > 0:
                T[k, j] = x[node] / r_sink
            else:
                # current into ground = current arriving at the grounded node from its neighbours
                inflow = G[rows - 1, j] * (x[u(rows - 1, j)] - 0.0)
                if rows > 1:
                    inflow += g_w * (x[w(rows - 2, j)] - 0.0)
                T[k, j] = inflow
    return T


def _rel_err(a, b):
    return np.abs(a - b).max() / np.abs(b).max()


def _G(rng, rows, cols, lo=1 / 200e3, hi=1 / 20e3):
    return rng.uniform(lo, hi, size=(rows, cols))


SHAPES = [(1, 1), (1, 5), (5, 1), (2, 3), (3, 2), (8, 8), (7, 13), (13, 7), (32, 32), (32, 9), (9, 32)]
# (r_source, r_sink, r_wire) in ohm: realistic, wire-dominated, ideal ends, extreme ratios
RESISTANCES = [
    (1e3, 1e3, 2.5),
    (0.0, 1e3, 2.5),
    (1e3, 0.0, 2.5),
    (0.0, 0.0, 10.0),
    (100.0, 5e3, 500.0),
    (5e3, 50.0, 1e-3),
]


@pytest.mark.parametrize("rows,cols", SHAPES)
def test_matches_sparse_nodal_analysis(rows, cols):
    rng = np.random.default_rng(rows * 100 + cols)
    G = _G(rng, rows, cols)
    for r_source, r_sink, r_wire in RESISTANCES:
        T = transfer_matrix(torch.tensor(G), r_source=r_source, r_sink=r_sink, r_wire=r_wire).numpy()
        ref = sparse_nodal_transfer(G, r_source, r_sink, r_wire)
        assert _rel_err(T, ref) <= 1e-8, (rows, cols, r_source, r_sink, r_wire, _rel_err(T, ref))


def test_zero_conductance_cells_and_high_conductance_wires():
    rng = np.random.default_rng(7)
    G = _G(rng, 12, 10)
    G[rng.random(G.shape) < 0.3] = 0.0  # unformed / stuck-off cells: no 1/G anywhere
    for r_source, r_sink, r_wire in [(1e3, 1e3, 2.5), (0.0, 0.0, 1e4), (2e3, 0.0, 1.0)]:
        T = transfer_matrix_wire(torch.tensor(G), r_source=r_source, r_sink=r_sink, r_wire=r_wire).numpy()
        ref = sparse_nodal_transfer(G, r_source, r_sink, r_wire)
        assert _rel_err(T, ref) <= 1e-8


@pytest.mark.parametrize("rows,cols", [(16, 16), (20, 7), (7, 20)])
@pytest.mark.parametrize("r_source,r_sink", [(1e3, 1e3), (0.0, 1e3), (1e3, 0.0), (0.0, 0.0)])
def test_tiny_wire_resistance_matches_no_wire_solver(rows, cols, r_source, r_sink):
    rng = np.random.default_rng(3)
    G = torch.tensor(_G(rng, rows, cols))
    T0 = transfer_matrix(G, r_source=r_source, r_sink=r_sink)
    T = transfer_matrix(G, r_source=r_source, r_sink=r_sink, r_wire=1e-9)
    # the wire changes T by O(r_wire * G * rows); nothing of order 1/r_wire appears
    assert _rel_err(T.numpy(), T0.numpy()) <= 1e-9


def test_converges_to_no_wire_result():
    rng = np.random.default_rng(4)
    G = torch.tensor(_G(rng, 24, 24))
    T0 = transfer_matrix(G, r_source=1e3, r_sink=1e3)
    errs = [_rel_err(transfer_matrix(G, r_source=1e3, r_sink=1e3, r_wire=r).numpy(), T0.numpy())
            for r in (1.0, 1e-2, 1e-4)]
    assert errs[0] > errs[1] > errs[2] and errs[2] < 1e-5
    assert errs[1] / errs[2] == pytest.approx(100.0, rel=0.05)  # first order in r_wire


@pytest.mark.parametrize("rows,cols", [(3, 4), (4, 3)])
@pytest.mark.parametrize("r_source,r_sink,r_wire", [(500.0, 800.0, 200.0), (0.0, 300.0, 100.0), (400.0, 0.0, 50.0)])
def test_gradcheck(rows, cols, r_source, r_sink, r_wire):
    rng = np.random.default_rng(5)
    G = torch.tensor(rng.uniform(5e-4, 2e-3, size=(rows, cols)), requires_grad=True)

    def f(G):
        return transfer_matrix_wire(G, r_source=r_source, r_sink=r_sink, r_wire=r_wire)

    assert torch.autograd.gradcheck(f, (G,), eps=1e-9, atol=1e-9, rtol=1e-6)


@pytest.mark.parametrize("rows,cols,r_wire", [(6, 5, 2.5), (5, 6, 10.0), (9, 4, 40.0)])
def test_gradcheck_series_path(rows, cols, r_wire):
    # rho = 2 r_wire max column sum of G < 0.9: the column steps use the Neumann series
    rng = np.random.default_rng(11)
    G = torch.tensor(rng.uniform(1e-4, 1e-3, size=(rows, cols)), requires_grad=True)
    swept = G.detach() if rows >= cols else G.detach().mT  # the sweep runs along the longer side
    assert wire._tile_series_terms(swept, r_wire) > 0

    def f(G):
        return transfer_matrix_wire(G, r_source=700.0, r_sink=300.0, r_wire=r_wire)

    assert torch.autograd.gradcheck(f, (G,), eps=1e-9, atol=1e-9, rtol=1e-6)


def test_second_backward_after_pool_reuse():
    # the sweep's buffers go back to a pool after a backward; a retained graph must
    # recompute them, even after another call of the same shape took them over
    rng = np.random.default_rng(12)
    kw = dict(r_source=1e3, r_sink=1e3, r_wire=2.5)
    G = torch.tensor(_G(rng, 12, 12), requires_grad=True)
    W = torch.tensor(rng.standard_normal((12, 12)))
    loss = (transfer_matrix_wire(G, **kw) * W).sum()
    (g1,) = torch.autograd.grad(loss, G, retain_graph=True)
    other = torch.tensor(_G(rng, 12, 12), requires_grad=True)
    (transfer_matrix_wire(other, **kw) * W).sum().backward()
    (g2,) = torch.autograd.grad(loss, G)
    assert torch.equal(g1, g2)


@pytest.mark.parametrize("shape", [(3, 10, 10), (2, 17, 9), (2, 9, 17), (1, 5, 5)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_checkpointed_sweep_equals_keeping_every_state(monkeypatch, shape, dtype):
    # with the budget at 0 every sweep keeps checkpoints only and recomputes its segments in
    # the backward, with the forward's own operations: bitwise the same T and gradient
    rng = np.random.default_rng(21)
    G = torch.tensor(rng.uniform(1 / 200e3, 1 / 20e3, size=shape), dtype=dtype, requires_grad=True)
    W = torch.tensor(rng.standard_normal(shape), dtype=dtype)
    kw = dict(r_source=1e3, r_sink=1e3, r_wire=2.5)
    T_all = transfer_matrix_wire(G, **kw)
    (g_all,) = torch.autograd.grad((T_all * W).sum(), G)
    monkeypatch.setattr(wire, "KEEP_ALL_BYTES", 0)
    used = []
    sweep = wire._sweep
    monkeypatch.setattr(wire, "_sweep", lambda *a: used.append(a[-1]) or sweep(*a))
    T_ck = transfer_matrix_wire(G, **kw)
    (g_ck,) = torch.autograd.grad((T_ck * W).sum(), G)
    assert used and all(every > 1 for every in used)
    assert torch.equal(T_all, T_ck) and torch.equal(g_all, g_ck)


def test_checkpointed_gradcheck_and_second_backward(monkeypatch):
    monkeypatch.setattr(wire, "KEEP_ALL_BYTES", 0)
    rng = np.random.default_rng(22)
    kw = dict(r_source=700.0, r_sink=300.0, r_wire=10.0)
    G = torch.tensor(rng.uniform(1e-4, 1e-3, size=(7, 5)), requires_grad=True)
    assert torch.autograd.gradcheck(lambda G: transfer_matrix_wire(G, **kw), (G,), eps=1e-9, atol=1e-9, rtol=1e-6)
    W = torch.tensor(rng.standard_normal((7, 5)))
    loss = (transfer_matrix_wire(G, **kw) * W).sum()
    (g1,) = torch.autograd.grad(loss, G, retain_graph=True)
    (g2,) = torch.autograd.grad(loss, G)
    assert torch.equal(g1, g2)


def test_checkpoint_every_rule(monkeypatch):
    monkeypatch.setattr(wire, "KEEP_ALL_BYTES", 1000)
    assert wire.checkpoint_every(5, 100) == 1           # 2 * 5 states of 100 bytes fit
    assert wire.checkpoint_every(6, 100) == 3           # they do not: ceil(sqrt(6))
    assert wire.checkpoint_every(784, 10 ** 6) == 28
    assert wire.checkpoint_every(2, 10 ** 6) == 2


def test_pool_holds_at_most_its_budget(monkeypatch):
    pool = wire._Pool(max_bytes=3 * 8 * 100)
    monkeypatch.setattr(wire, "_POOL", pool)
    bufs = [torch.empty(100, dtype=torch.float64) for _ in range(5)]
    pool.give(*bufs)
    assert pool._bytes == 3 * 8 * 100
    assert pool.take((100,), torch.float64, torch.device("cpu")) is bufs[2]
    # the solver still works (and gives its buffers back within budget) with a tiny pool
    G = torch.tensor(_G(np.random.default_rng(14), 6, 6), requires_grad=True)
    T = transfer_matrix_wire(G, r_source=1e3, r_sink=1e3, r_wire=2.5)
    T.sum().backward()
    ref = sparse_nodal_transfer(G.detach().numpy(), 1e3, 1e3, 2.5)
    assert _rel_err(T.detach().numpy(), ref) <= 1e-8 and pool._bytes <= pool.max_bytes


def test_row_generator_fallback_matches(monkeypatch):
    # the exp(-|C_j - C_l|) form of the row impedances (used only if the outer-product
    # generators could overflow) gives the same T and gradient
    rng = np.random.default_rng(13)
    G = torch.tensor(_G(rng, 10, 7), requires_grad=True)
    W = torch.tensor(rng.standard_normal((10, 7)))
    results = []
    for fraction in (0.25, 0.0):
        monkeypatch.setattr(wire, "_OUTER_SPAN_FRACTION", fraction)
        for r_source in (1e3, 0.0):
            T = transfer_matrix_wire(G, r_source=r_source, r_sink=500.0, r_wire=5.0)
            (g,) = torch.autograd.grad((T * W).sum(), G)
            results.append((T.detach(), g))
    for (T_a, g_a), (T_b, g_b) in zip(results[:2], results[2:], strict=True):
        assert _rel_err(T_b.numpy(), T_a.numpy()) <= 1e-12
        assert _rel_err(g_b.numpy(), g_a.numpy()) <= 1e-10


def test_gradient_matches_finite_difference_of_realistic_tile():
    # realistic scales (G ~ 1e-5 S, r ~ 1e3 ohm), central differences on a few cells
    rng = np.random.default_rng(6)
    G = torch.tensor(_G(rng, 10, 8), requires_grad=True)
    W = torch.tensor(rng.standard_normal((10, 8)))
    kw = dict(r_source=1e3, r_sink=1e3, r_wire=20.0)
    loss = (transfer_matrix_wire(G, **kw) * W).sum()
    (grad,) = torch.autograd.grad(loss, G)
    h = 1e-9
    for idx in [(0, 0), (9, 7), (4, 3), (0, 7)]:
        Gp, Gm = G.detach().clone(), G.detach().clone()
        Gp[idx] += h
        Gm[idx] -= h
        fd = ((transfer_matrix_wire(Gp, **kw) - transfer_matrix_wire(Gm, **kw)) * W).sum() / (2 * h)
        assert float(grad[idx]) == pytest.approx(float(fd), rel=1e-5)


def test_batched_tiles_match_each_tile():
    rng = np.random.default_rng(8)
    G = torch.tensor(rng.uniform(5e-6, 5e-5, size=(2, 3, 9, 6)))
    for r_source, r_sink in [(2e3, 500.0), (0.0, 1e3)]:
        T = transfer_matrix_wire(G, r_source=r_source, r_sink=r_sink, r_wire=5.0)
        assert T.shape == G.shape
        for idx in np.ndindex(2, 3):
            ref = sparse_nodal_transfer(G[idx].numpy(), r_source, r_sink, 5.0)
            assert _rel_err(T[idx].numpy(), ref) <= 1e-8
    # the reciprocal (wide) branch batches too
    Gw = G.mT.contiguous()
    Tw = transfer_matrix_wire(Gw, r_source=1e3, r_sink=1e3, r_wire=5.0)
    for idx in np.ndindex(2, 3):
        ref = sparse_nodal_transfer(Gw[idx].numpy(), 1e3, 1e3, 5.0)
        assert _rel_err(Tw[idx].numpy(), ref) <= 1e-8


@pytest.mark.parametrize("rows,cols", [(64, 64), (40, 64)])
def test_float32_close_to_float64(rows, cols):
    rng = np.random.default_rng(9)
    G = torch.tensor(_G(rng, rows, cols))
    kw = dict(r_source=1e3, r_sink=1e3, r_wire=2.5)
    T64 = transfer_matrix_wire(G, **kw)
    T32 = transfer_matrix_wire(G.float(), **kw)
    assert T32.dtype == torch.float32
    assert _rel_err(T32.double().numpy(), T64.numpy()) <= 1e-5


def test_gradient_flows_in_float32():
    G = (torch.rand(2, 16, 16) * 4.5e-5 + 5e-6).requires_grad_()
    T = transfer_matrix_wire(G, r_source=1e3, r_sink=1e3, r_wire=2.5)
    T.sum().backward()
    assert G.grad is not None and bool(torch.isfinite(G.grad).all())


# --------------------------------------------------------------------------- ngspice

def _ngspice_transfer(G, r_source, r_sink, r_wire, tmpdir):
    """T (S) of one tile from ngspice: one operating point per unit input, currents via 0 V sources."""
    rows, cols = G.shape
    T = np.zeros((rows, cols))
    for k in range(rows):
        lines = ["* crossbar tile with wire resistance"]
        for i in range(rows):
            v = 1.0 if i == k else 0.0
            if r_source > 0:
                lines.append(f"VS{i} s{i} 0 DC {v}")
                lines.append(f"RS{i} s{i} u{i}_0 {r_source:.17g}")
            else:
                lines.append(f"VS{i} u{i}_0 0 DC {v}")
            for j in range(cols):
                lines.append(f"RG{i}_{j} u{i}_{j} w{i}_{j} {1.0 / G[i, j]:.17g}")
                if j + 1 < cols:
                    lines.append(f"RU{i}_{j} u{i}_{j} u{i}_{j + 1} {r_wire:.17g}")
                if i + 1 < rows:
                    lines.append(f"RW{i}_{j} w{i}_{j} w{i + 1}_{j} {r_wire:.17g}")
        for j in range(cols):
            # a 0 V source measures the current into the neuron's virtual ground
            if r_sink > 0:
                lines.append(f"RK{j} w{rows - 1}_{j} k{j} {r_sink:.17g}")
                lines.append(f"VM{j} k{j} 0 DC 0")
            else:
                lines.append(f"VM{j} w{rows - 1}_{j} 0 DC 0")
        lines += [".options reltol=1e-12 abstol=1e-18 vntol=1e-15 noacct", ".control", "set numdgt=15", "op"]
        lines += [f"print i(vm{j})" for j in range(cols)]
        lines += [".endc", ".end"]
        path = os.path.join(tmpdir, f"tile_{k}.cir")
        with open(path, "w") as fh:
            fh.write("\n".join(lines) + "\n")
        out = subprocess.run(["ngspice", "-b", path], capture_output=True, text=True, timeout=30).stdout
        for j in range(cols):
            m = re.search(rf"i\(vm{j}\)\s*=\s*([-+0-9.eE]+)", out)
            assert m, out
            # SPICE reports the current flowing into the source's + terminal: into ground it is +
            T[k, j] = float(m.group(1))
    return T


@pytest.mark.skipif(shutil.which("ngspice") is None, reason="ngspice not installed")
@pytest.mark.parametrize("r_source,r_sink,r_wire", [(1e3, 1e3, 2.5), (0.0, 500.0, 50.0), (800.0, 0.0, 20.0)])
def test_matches_ngspice(tmp_path, r_source, r_sink, r_wire):
    rng = np.random.default_rng(10)
    G = _G(rng, 4, 3)
    T = transfer_matrix(torch.tensor(G), r_source=r_source, r_sink=r_sink, r_wire=r_wire).numpy()
    ref = _ngspice_transfer(G, r_source, r_sink, r_wire, str(tmp_path))
    assert _rel_err(T, ref) <= 1e-6


def test_layer_gradient_through_wire_matches_finite_differences():
    # a converted network in nominal mode: mapping, tiling (padded 4x3 tiles), the wire
    # sweep and its pooled buffers, all through autograd, against central differences
    import torch.nn as nn

    from xbarflow.crossbar import CrossbarSpec
    from xbarflow.nn import convert, set_mode

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    spec = CrossbarSpec(rows=4, cols=3, r_source=1e3, r_sink=1e3, r_wire=20.0)
    model = set_mode(convert(model, spec), "nominal")
    x = torch.randn(5, 10, dtype=torch.float64)

    def loss():
        return model(x).pow(2).sum()

    loss().backward()
    for layer in (model[0], model[2]):
        W = layer.weight
        top = int(W.detach().abs().argmax())  # w_max = max |W| is a kink of the mapping
        for flat in (1, 7, 11):
            flat = flat if flat != top else flat + 1
            idx = divmod(flat, W.shape[1])
            h = 1e-6
            with torch.no_grad():
                W[idx] += h
                up = float(loss())
                W[idx] -= 2 * h
                down = float(loss())
                W[idx] += h
            assert float(W.grad[idx]) == pytest.approx((up - down) / (2 * h), rel=1e-5, abs=1e-9)
