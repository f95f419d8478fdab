"""Nested dissection (xbarflow.crossbar.wire_nd) against the column sweep (xbarflow.crossbar.wire).

Measured side by side in one process, float32, on this machine's torch threads (the numbers
quoted in ``xbarflow/crossbar/circuit.py`` were taken with ``OMP_NUM_THREADS=1`` on a shared
2-core machine under load): each repeat times all four
(sweep / nested, forward / forward + backward) in turn, and the table gives medians and
ratios (sweep time / nested time: > 1 means nested dissection is faster).

* ``tiles``: square tiles of 64 (224 tiles, as in the TAT step of the FCN 784-500-10 on
  64x64 arrays), 128 and 256 cells; r_source = r_sink = 1 kOhm, r_wire = 2.5 Ohm.
* flops per tile of each method: ``sweep_flops`` of ``scripts/bench_wire.py`` and
  :func:`nd_flops` here (matrix products, Cholesky and triangular solves; element-wise
  work not counted).
* ``--levels``: time, bytes and flops per merge level of nested dissection for the
  64x64 batch, to show where the time goes (each level is ~3 batched calls in the
  forward; the bytes are those of the level's output off-diagonals ``W``).
* ``--tat``: one TAT training step (forward + backward + SGD, batch 128) of the FCN
  784-500-10 with wire resistance, on 64x64 tiles (and ``--tat256``: 256x256 tiles),
  with ``circuit.WIRE_SOLVER`` set to "sweep" and to "nested", interleaved.

Run: ``OMP_NUM_THREADS=1 python scripts/bench_wire_nd.py [--levels] [--tat] [--tat256]``.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from bench_wire import sweep_flops  # noqa: E402

from xbarflow.crossbar import circuit, wire_nd  # noqa: E402
from xbarflow.crossbar.spec import CrossbarSpec  # noqa: E402
from xbarflow.crossbar.wire import _tile_series_terms, transfer_matrix_wire  # noqa: E402
from xbarflow.crossbar.wire_nd import merge_schedule, transfer_matrix_wire_nd  # noqa: E402
from xbarflow.nn import convert, set_mode  # noqa: E402

R_SOURCE, R_SINK, R_WIRE = 1e3, 1e3, 2.5
KW = dict(r_source=R_SOURCE, r_sink=R_SINK, r_wire=R_WIRE)


def level_flops(m, last: bool, rp: int, cp: int) -> tuple[float, float]:
    """(forward, backward) flops of one merge level per parent block."""
    s, p = m.sep, m.ports
    chol, trsm = s ** 3 / 3, s * s * p
    prod = 2.0 * rp * cp * s if last else 2.0 * p * p * s  # the last level forms only T
    # backward: X = L^-T Y (trsm), F X^T (2 p^2 s), X (F X^T) (2 s^2 p)
    return chol + trsm + prod, trsm + 2.0 * p * p * s + 2.0 * s * s * p


def nd_flops(rows: int, cols: int, backward: bool) -> float:
    """Flops of nested dissection for one ``rows x cols`` tile (padded to powers of two)."""
    rp, cp, levels = merge_schedule(rows, cols)
    total = 0.0
    for k, m in enumerate(levels):
        blocks = (m.nbr * m.nbc) // 2
        f, b = level_flops(m, k == len(levels) - 1, rp, cp)
        total += blocks * (f + (b if backward else 0.0))
    return total


def side_by_side(n: int, B: int, repeats: int) -> dict:
    torch.manual_seed(0)
    G = torch.rand(B, n, n) * 4.5e-5 + 5e-6
    Gr = G.clone().requires_grad_()
    Wt = torch.randn(B, n, n)
    fns = {
        "sweep_fwd": lambda: transfer_matrix_wire(G, **KW),
        "nested_fwd": lambda: transfer_matrix_wire_nd(G, **KW),
        "sweep_fwd_bwd": lambda: (transfer_matrix_wire(Gr, **KW) * Wt).sum().backward(),
        "nested_fwd_bwd": lambda: (transfer_matrix_wire_nd(Gr, **KW) * Wt).sum().backward(),
    }
    for f in fns.values():
        f()  # warm-up
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    med = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    terms = _tile_series_terms(G, R_WIRE)
    out = {"n": n, "tiles": B, "repeats": repeats}
    out.update({f"{k}_ms": round(v, 1) for k, v in med.items()})
    out["ratio_fwd"] = round(med["sweep_fwd"] / med["nested_fwd"], 2)
    out["ratio_fwd_bwd"] = round(med["sweep_fwd_bwd"] / med["nested_fwd_bwd"], 2)
    out["sweep_mflop_per_tile_fwd"] = round(sweep_flops((n, n), terms, backward=False) / 1e6, 1)
    out["sweep_mflop_per_tile_fwd_bwd"] = round(sweep_flops((n, n), terms, backward=True) / 1e6, 1)
    out["nested_mflop_per_tile_fwd"] = round(nd_flops(n, n, backward=False) / 1e6, 1)
    out["nested_mflop_per_tile_fwd_bwd"] = round(nd_flops(n, n, backward=True) / 1e6, 1)
    out["sweep_gflops_fwd_bwd"] = round(B * out["sweep_mflop_per_tile_fwd_bwd"] / med["sweep_fwd_bwd"], 1)
    out["nested_gflops_fwd_bwd"] = round(B * out["nested_mflop_per_tile_fwd_bwd"] / med["nested_fwd_bwd"], 1)
    return out


def levels_profile(n: int, B: int) -> list[dict]:
    """Per merge level of nested dissection: ms forward / backward, MB of W out, MFLOP (batch)."""
    torch.manual_seed(0)
    G = torch.rand(B, n, n) * 4.5e-5 + 5e-6
    plan = wire_nd._Plan(n, n, R_SOURCE, R_SINK, R_WIRE, G.dtype, G.device)
    rows = []

    def run(record: bool):
        nlev = len(plan.levels)
        t0 = time.perf_counter()
        Gp = G.permute(1, 2, 0).contiguous()
        W, aux = wire_nd._leaf(plan.to_cells(Gp), plan.gg, plan.g)
        W = W.view(4, 4, -1)
        if record:
            rows.append({"level": "leaf", "fwd_ms": round(1e3 * (time.perf_counter() - t0), 1),
                         "W_out_MB": round(W.numel() * W.element_size() / 2 ** 20, 1)})
        saved = []
        for k, m in enumerate(plan.levels):
            t0 = time.perf_counter()
            if k < plan.n_last:
                W, st = wire_nd._merge_last(W, m)
                if k == plan.n_last - 1 and k < nlev - 1:
                    W = W.permute(2, 0, 1).contiguous()
            else:
                W, st = wire_nd._merge_first(W, m, only=(plan.src, plan.snk) if k == nlev - 1 else None)
            saved.append(st)
            if record:
                f, b = level_flops(m, k == nlev - 1, plan.rp, plan.cp)
                blocks = B * (m.nbr * m.nbc) // 2
                rows.append({"level": k, "layout": "blocks-last" if k < plan.n_last else "blocks-first",
                             "sep": m.sep, "ports": m.ports, "blocks": blocks,
                             "fwd_ms": round(1e3 * (time.perf_counter() - t0), 1),
                             "W_out_MB": round(W.numel() * W.element_size() / 2 ** 20, 1),
                             "mflop_fwd": round(blocks * f / 1e6, 1), "mflop_bwd": round(blocks * b / 1e6, 1)})
        P = 2 * (plan.rp + plan.cp)
        Wbar = torch.zeros(B, P, P)
        Wbar[:, plan.src, plan.snk] = 1.0
        for k in range(nlev - 1, -1, -1):
            m, (Lc, Y) = plan.levels[k], saved[k]
            t0 = time.perf_counter()
            if k < plan.n_last:
                if k == plan.n_last - 1 and k < nlev - 1:
                    Wbar = Wbar.permute(1, 2, 0).contiguous()
                Wbar = wire_nd._merge_last_grad(Wbar, m, Lc, Y)
            else:
                Wbar = wire_nd._merge_first_grad(Wbar, m, Lc, Y)
            if record:
                rows[k + 1]["bwd_ms"] = round(1e3 * (time.perf_counter() - t0), 1)
        t0 = time.perf_counter()
        wire_nd._leaf_grad(Wbar.view(4, 4, -1, B), plan.g, aux)
        if record:
            rows[0]["bwd_ms"] = round(1e3 * (time.perf_counter() - t0), 1)

    run(False)
    run(True)
    return rows


def tat_step(rows: int, cols: int, repeats: int) -> dict:
    """One TAT step (FCN 784-500-10, batch 128, float32) with each wire solver, interleaved."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 500), nn.ReLU(), nn.Linear(500, 10))
    spec = CrossbarSpec(rows=rows, cols=cols, r_source=R_SOURCE, r_sink=R_SINK, r_wire=R_WIRE)
    model = set_mode(convert(model, spec), "nominal")
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: every repeat sees the same weights
    x, y = torch.rand(128, 1, 28, 28), torch.randint(0, 10, (128,))

    def step(solver: str) -> float:
        circuit.WIRE_SOLVER = solver
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        return time.perf_counter() - t0

    default = circuit.WIRE_SOLVER
    try:
        step("sweep"), step("nested")  # warm-up
        t = {"sweep": [], "nested": []}
        for _ in range(repeats):
            for solver in t:
                t[solver].append(step(solver))
    finally:
        circuit.WIRE_SOLVER = default
    sw, nd = (1e3 * statistics.median(t[k]) for k in ("sweep", "nested"))
    return {"tiles": f"{rows}x{cols}", "repeats": repeats, "sweep_step_ms": round(sw, 1),
            "nested_step_ms": round(nd, 1), "ratio": round(sw / nd, 2)}


def main():
    result = {"threads": torch.get_num_threads(), "r_source": R_SOURCE, "r_sink": R_SINK, "r_wire": R_WIRE,
              "dtype": "float32"}
    print(f"# sweep vs nested dissection, float32, torch threads={result['threads']}")
    result["side_by_side"] = []
    for n, B, rep in ((64, 224, 5), (128, 16, 3), (256, 2, 2)):
        r = side_by_side(n, B, rep)
        result["side_by_side"].append(r)
        print(json.dumps(r))
    if "--levels" in sys.argv:
        result["levels_64"] = levels_profile(64, 224)
        for r in result["levels_64"]:
            print(json.dumps(r))
    if "--tat" in sys.argv:
        result["tat_64"] = tat_step(64, 64, 3)
        print(json.dumps(result["tat_64"]))
    if "--tat256" in sys.argv:
        result["tat_256"] = tat_step(256, 256, 1)
        print(json.dumps(result["tat_256"]))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
