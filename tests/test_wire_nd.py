"""The nested-dissection wire solver against sparse nodal analysis, the sweep, ngspice, and its own gradient."""
import shutil

import numpy as np
import pytest
import torch
from test_wire import _ngspice_transfer, sparse_nodal_transfer

from xbarflow.crossbar import transfer_matrix
from xbarflow.crossbar.wire import transfer_matrix_wire
from xbarflow.crossbar.wire_nd import merge_schedule, transfer_matrix_wire_nd

pytestmark = pytest.mark.numerics


def _rel_err(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def _G(rng, *shape, lo=1 / 200e3, hi=1 / 20e3):
    return rng.uniform(lo, hi, size=shape)


# (r_source, r_sink, r_wire) in ohm: realistic, wire-dominated, near-ideal wire, and ideal drivers
# and/or neurons (a zero end resistance pins that node: the leaves' limit formulas)
RESISTANCES = [(1e3, 1e3, 2.5), (100.0, 5e3, 500.0), (5e3, 50.0, 1e-3),
               (0.0, 1e3, 2.5), (1e3, 0.0, 2.5), (0.0, 0.0, 10.0)]
SHAPES = [(1, 1), (1, 5), (5, 1), (2, 3), (3, 2), (8, 8), (7, 13), (17, 5), (5, 17), (33, 64)]


@pytest.mark.parametrize("rows,cols", SHAPES)
def test_matches_sparse_nodal_analysis(rows, cols):
    rng = np.random.default_rng(rows * 100 + cols)
    G = _G(rng, rows, cols)
    for r_source, r_sink, r_wire in RESISTANCES:
        T = transfer_matrix_wire_nd(torch.tensor(G), r_source=r_source, r_sink=r_sink, r_wire=r_wire).numpy()
        ref = sparse_nodal_transfer(G, r_source, r_sink, r_wire)
        assert _rel_err(T, ref) <= 1e-8, (rows, cols, r_source, r_sink, r_wire, _rel_err(T, ref))


@pytest.mark.parametrize("r_source,r_sink,r_wire", RESISTANCES)
def test_matches_sweep_on_random_64x64_tiles(r_source, r_sink, r_wire):
    rng = np.random.default_rng(1)
    G = torch.tensor(_G(rng, 3, 64, 64), requires_grad=True)
    W = torch.tensor(rng.standard_normal((3, 64, 64)))
    kw = dict(r_source=r_source, r_sink=r_sink, r_wire=r_wire)
    T_sw = transfer_matrix_wire(G, **kw)
    T_nd = transfer_matrix_wire_nd(G, **kw)
    assert _rel_err(T_nd.detach().numpy(), T_sw.detach().numpy()) <= 1e-9
    (g_sw,) = torch.autograd.grad((T_sw * W).sum(), G)
    (g_nd,) = torch.autograd.grad((T_nd * W).sum(), G)
    assert _rel_err(g_nd.numpy(), g_sw.numpy()) <= 1e-9


def test_zero_conductance_cells_and_extreme_wires():
    rng = np.random.default_rng(7)
    G = _G(rng, 12, 10)
    G[rng.random(G.shape) < 0.3] = 0.0  # unformed / stuck-off cells: no 1/G anywhere
    for r_source, r_sink, r_wire in [(1e3, 1e3, 2.5), (50.0, 2e3, 1e4), (2e3, 10.0, 1.0)]:
        T = transfer_matrix_wire_nd(torch.tensor(G), r_source=r_source, r_sink=r_sink, r_wire=r_wire).numpy()
        ref = sparse_nodal_transfer(G, r_source, r_sink, r_wire)
        assert _rel_err(T, ref) <= 1e-8


@pytest.mark.parametrize("rows,cols", [(16, 16), (20, 7)])
def test_tiny_wire_resistance_matches_no_wire_solver(rows, cols):
    # the wire's conductance (2e9 S per half segment) never enters a difference with the
    # cells' (~1e-5 S): the result is the no-wire T to O(r_wire)
    rng = np.random.default_rng(3)
    G = torch.tensor(_G(rng, rows, cols))
    T0 = transfer_matrix(G, r_source=1e3, r_sink=1e3)
    T = transfer_matrix_wire_nd(G, r_source=1e3, r_sink=1e3, r_wire=1e-9)
    assert _rel_err(T.numpy(), T0.numpy()) <= 1e-9


@pytest.mark.parametrize("rows,cols", [(3, 4), (4, 3), (2, 5), (5, 5)])
@pytest.mark.parametrize("r_source,r_sink,r_wire", [(500.0, 800.0, 200.0), (300.0, 100.0, 10.0),
                                                    (0.0, 800.0, 200.0), (300.0, 0.0, 10.0), (0.0, 0.0, 50.0)])
def test_gradcheck(rows, cols, r_source, r_sink, r_wire):
    rng = np.random.default_rng(5)
    G = torch.tensor(rng.uniform(5e-4, 2e-3, size=(2, rows, cols)), requires_grad=True)

    def f(G):
        return transfer_matrix_wire_nd(G, r_source=r_source, r_sink=r_sink, r_wire=r_wire)

    assert torch.autograd.gradcheck(f, (G,), eps=1e-9, atol=1e-9, rtol=1e-6)


def test_second_backward_through_retained_graph():
    rng = np.random.default_rng(12)
    G = torch.tensor(_G(rng, 12, 9), requires_grad=True)
    W = torch.tensor(rng.standard_normal((12, 9)))
    loss = (transfer_matrix_wire_nd(G, r_source=1e3, r_sink=1e3, r_wire=2.5) * W).sum()
    (g1,) = torch.autograd.grad(loss, G, retain_graph=True)
    (g2,) = torch.autograd.grad(loss, G)
    assert torch.equal(g1, g2)


def test_batched_tiles_match_each_tile():
    rng = np.random.default_rng(8)
    G = torch.tensor(rng.uniform(5e-6, 5e-5, size=(2, 3, 9, 6)))
    T = transfer_matrix_wire_nd(G, r_source=2e3, r_sink=500.0, r_wire=5.0)
    assert T.shape == G.shape
    for idx in np.ndindex(2, 3):
        ref = sparse_nodal_transfer(G[idx].numpy(), 2e3, 500.0, 5.0)
        assert _rel_err(T[idx].numpy(), ref) <= 1e-8


@pytest.mark.parametrize("rows,cols,r_source,r_sink", [(64, 64, 1e3, 1e3), (33, 64, 1e3, 1e3), (64, 64, 0.0, 0.0)])
def test_float32_close_to_float64(rows, cols, r_source, r_sink):
    # measured ~1.2e-6 at 64x64 (the sweep's test allows 1e-5; so does this one)
    rng = np.random.default_rng(9)
    G = torch.tensor(_G(rng, 2, rows, cols), requires_grad=True)
    W = torch.tensor(rng.standard_normal((2, rows, cols)))
    kw = dict(r_source=r_source, r_sink=r_sink, r_wire=2.5)
    T64 = transfer_matrix_wire_nd(G, **kw)
    G32 = G.detach().float().requires_grad_()
    T32 = transfer_matrix_wire_nd(G32, **kw)
    assert T32.dtype == torch.float32
    assert _rel_err(T32.detach().double().numpy(), T64.detach().numpy()) <= 1e-5
    (g64,) = torch.autograd.grad((T64 * W).sum(), G)
    (g32,) = torch.autograd.grad((T32 * W.float()).sum(), G32)
    assert g32.dtype == torch.float32 and _rel_err(g32.double().numpy(), g64.numpy()) <= 1e-4


@pytest.mark.parametrize("name,value", [("r_wire", 0.0), ("r_source", -1.0), ("r_sink", float("nan"))])
def test_bad_resistance_is_refused(name, value):
    kw = dict(r_source=1e3, r_sink=1e3, r_wire=2.5)
    kw[name] = value
    with pytest.raises(ValueError, match=name):
        transfer_matrix_wire_nd(torch.full((4, 4), 1e-5), **kw)


def test_schedule_keeps_blocks_square_and_pads_to_powers_of_two():
    rp, cp, levels = merge_schedule(17, 5)
    assert (rp, cp) == (32, 8) and len(levels) == 5 + 3
    rp, cp, levels = merge_schedule(64, 64)
    assert [m.side for m in levels] == [True, False] * 6
    assert (levels[-1].h, levels[-1].w, levels[-1].sep, levels[-1].ports) == (32, 64, 64, 256)
    assert merge_schedule(1, 1)[2] == []


@pytest.mark.skipif(shutil.which("ngspice") is None, reason="ngspice not installed")
@pytest.mark.parametrize("r_source,r_sink,r_wire", [(1e3, 1e3, 2.5), (200.0, 500.0, 50.0), (0.0, 500.0, 50.0),
                                                    (200.0, 0.0, 50.0)])
def test_matches_ngspice(tmp_path, r_source, r_sink, r_wire):
    rng = np.random.default_rng(10)
    G = _G(rng, 4, 3)
    T = transfer_matrix_wire_nd(torch.tensor(G), r_source=r_source, r_sink=r_sink, r_wire=r_wire).numpy()
    ref = _ngspice_transfer(G, r_source, r_sink, r_wire, str(tmp_path))
    assert _rel_err(T, ref) <= 1e-6


def test_transfer_matrix_dispatch(monkeypatch):
    from xbarflow.crossbar import circuit, wire, wire_nd

    rng = np.random.default_rng(15)
    G = torch.tensor(_G(rng, 2, 12, 9))  # rows >= cols: the sweep does not call itself (reciprocity)
    kw = dict(r_source=1e3, r_sink=1e3, r_wire=2.5)
    used = []
    monkeypatch.setattr(wire, "transfer_matrix_wire", lambda *a, **k: used.append("sweep") or transfer_matrix_wire(*a, **k))
    monkeypatch.setattr(wire_nd, "transfer_matrix_wire_nd",
                        lambda *a, **k: used.append("nested") or transfer_matrix_wire_nd(*a, **k))
    T_sweep = transfer_matrix(G, **kw, wire_solver="sweep")
    T_nested = transfer_matrix(G, **kw, wire_solver="nested")
    assert _rel_err(T_nested.numpy(), T_sweep.numpy()) <= 1e-12
    transfer_matrix(G, **kw)  # auto, tiles below WIRE_ND_MIN_SIZE: the sweep
    monkeypatch.setattr(circuit, "WIRE_ND_MIN_SIZE", 8)
    transfer_matrix(G, **kw)  # auto, both sides >= 8: nested dissection
    transfer_matrix(G, r_source=0.0, r_sink=1e3, r_wire=2.5)  # auto, pinned sources: nested dissection too
    monkeypatch.setattr(circuit, "WIRE_SOLVER", "nested")
    transfer_matrix(G, **kw)  # the module default
    assert used == ["sweep", "nested", "sweep", "nested", "nested", "nested"]
    with pytest.raises(ValueError, match="wire_solver"):
        transfer_matrix(G, **kw, wire_solver="fast")
