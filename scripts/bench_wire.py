"""Benchmark of the wire-resistance solver (one run; prints a table, then one JSON line).

Measures, on this machine's CPU threads:

* ``transfer_ms_N``: the full transfer matrix T of one square N x N tile (float64)
  with :func:`xbarflow.crossbar.wire.transfer_matrix_wire` (median of repeats).
* ``baseline_ms_128``: the same T from the full nodal system (2 * 128 * 128 unknowns)
  with ``scipy.sparse.linalg.spsolve`` called once per input (one right-hand side per
  input, refactorising every time, as a circuit simulator sweeping inputs or MemTorch's
  per-input solve does). For reference the script also times one ``splu`` factorisation
  reused for all inputs (``baseline_splu_once_ms_128``), which is the strongest plain
  SciPy direct baseline.
* ``step_ratio_wire_xbar64``: a technology-aware training step (FCN 784-500-10,
  64 x 64 tiles, r_source = r_sink = 1 kOhm, r_wire = 2.5 Ohm per segment, batch 128,
  forward + backward + SGD step, float32) over a standard (ideal-mode) step; medians
  of interleaved repeats.
* What bounds that ratio: ``wire_gflop_per_step`` (the solver's matrix products,
  forward and backward, for the step's 224 tiles, counted by ``sweep_flops``), the
  machine's batched 64x64 float32 matmul rate ``matmul_gflops_f32_bmm64``, and
  ``step_ratio_bound_wire_xbar64`` = (those products at that rate + a standard step)
  over a standard step: no implementation of this algorithm gets below it here.

r_wire = 2.5 Ohm per segment: a metal line segment of one cell pitch, ~100 nm long with
a ~50 x 40 nm^2 cross-section and an effective (size-effect) resistivity ~5e-8 Ohm m,
gives rho L / A = 5e-8 * 1e-7 / 2e-15 = 2.5 Ohm, the value used in crossbar IR-drop
studies at that node.

* ``tat_wire_peak_rss_mib_xbar256`` and ``tat_wire_peak_rss_mib_784x500``: peak resident
  memory (``VmHWM``) of one TAT step with wire (FCN 784-500-10, batch 128, float32) on
  256x256 tiles and on one 784x500 array, each in a fresh child process, with the
  solver ``circuit.transfer_matrix`` picks (nested dissection, :mod:`xbarflow.crossbar.wire_nd`,
  for tiles of 256 and more). ``--memory`` measures only these, plus the column sweep on
  256x256 tiles with checkpoints (``*_sweep``; it keeps checkpoints instead of every state
  past ``wire.KEEP_ALL_BYTES``) and with every state kept (``*_sweep_keep_all``);
  ``--no-memory`` skips them.

Run: ``python scripts/bench_wire.py`` (from anywhere; the repository root is put on
``sys.path`` so the package need not be installed).
"""
from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import scipy.sparse as sp  # noqa: E402
import scipy.sparse.linalg as spla  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from xbarflow.crossbar import wire  # noqa: E402
from xbarflow.crossbar.spec import CrossbarSpec  # noqa: E402
from xbarflow.crossbar.wire import _tile_series_terms, transfer_matrix_wire  # noqa: E402
from xbarflow.nn import convert, set_mode  # noqa: E402
from xbarflow.runtime import tune_allocator  # noqa: E402

R_SOURCE, R_SINK, R_WIRE = 1e3, 1e3, 2.5
G_MIN, G_MAX = 1 / 200e3, 1 / 20e3


def _median_ms(fn, repeats):
    fn()  # warm-up (allocator, thread pool)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def nodal_system(G, r_source, r_sink, r_wire):
    """Sparse nodal matrix (CSC) and the source conductance vector of one tile (r_* > 0).

    Unknowns: u_ij at ``i*cols + j``, w_ij at ``n + i*cols + j``. Returns ``(Y, g_src_idx)``
    where input k injects ``1 / r_source`` A into node ``g_src_idx[k]`` for V_k = 1 V.
    """
    rows, cols = G.shape
    n = rows * cols
    idx = np.arange(n).reshape(rows, cols)
    g_w = 1.0 / r_wire
    a, b, g = [idx.ravel()], [n + idx.ravel()], [G.ravel()]  # cells
    a.append(idx[:, :-1].ravel())
    b.append(idx[:, 1:].ravel())
    g.append(np.full(rows * (cols - 1), g_w))
    a.append(n + idx[:-1, :].ravel())
    b.append(n + idx[1:, :].ravel())
    g.append(np.full((rows - 1) * cols, g_w))
    a, b, g = np.concatenate(a), np.concatenate(b), np.concatenate(g)
    diag = np.zeros(2 * n)
    np.add.at(diag, a, g)
    np.add.at(diag, b, g)
    diag[idx[:, 0]] += 1.0 / r_source
    diag[n + idx[-1, :]] += 1.0 / r_sink
    rr = np.concatenate([a, b, np.arange(2 * n)])
    cc = np.concatenate([b, a, np.arange(2 * n)])
    vv = np.concatenate([-g, -g, diag])
    Y = sp.csc_matrix((vv, (rr, cc)), shape=(2 * n, 2 * n))
    return Y, idx[:, 0], n + idx[-1, :]


def series_products(terms: int) -> float:
    """n x n products of one column step (see ``xbarflow.crossbar.wire._column_step``)."""
    if terms == 0:
        return 2.0  # LU inverse (~2 n^3 flops) and X E
    if terms == 1:
        return 0.0
    if terms == 2:
        return 1.0
    return 2 * math.log2(terms) - 2


def sweep_flops(shape, terms: int, backward: bool) -> float:
    """Flops of the wire solver for one tile (forward, or forward + backward), products only.

    The sweep runs over ``m = max(rows, cols)`` rows with ``n = min(rows, cols)``-wide
    matrices. Per row step i: the series (``series_products`` products of n x n) and
    ``J' = X J`` (``2 n^2 i``); the sink: an LU inverse (~``2 n^3``) and ``2 n^2 m``.
    Backward per step: ``M Ybar^T``, ``X Ebar``, ``(X Ebar) X`` (three n x n products)
    and three ``2 n^2 i`` products (``X Jbar``, ``Z J^T``, the recovery of J); sink
    ``2 * 2 n^2 m``. The O(n^2) elementwise work per step is not counted.
    """
    rows, cols = shape
    m, n = max(rows, cols), min(rows, cols)
    mm = 2.0 * n ** 3
    partial = 2.0 * n * n * (m - 1) * m / 2  # sum over i of 2 n^2 i
    fwd = (m - 1) * series_products(terms) * mm + partial + mm + 2.0 * n * n * m
    if not backward:
        return fwd
    return fwd + (m - 1) * 3 * mm + 3 * partial + 4.0 * n * n * m


def baseline_transfer(G, r_source, r_sink, r_wire, factor_once=False):
    """T by sparse direct solves of the nodal system, one right-hand side per input."""
    Y, src, out = nodal_system(G, r_source, r_sink, r_wire)
    rows, cols = G.shape
    T = np.zeros((rows, cols))
    lu = spla.splu(Y) if factor_once else None
    for k in range(rows):
        rhs = np.zeros(Y.shape[0])
        rhs[src[k]] = 1.0 / r_source
        x = lu.solve(rhs) if factor_once else spla.spsolve(Y, rhs)
        T[k] = x[out] / r_sink
    return T


def _vm_kib(field: str) -> int:
    """A ``/proc/self/status`` field in KiB (Linux): ``VmHWM`` is the peak resident set."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_child(layout: str, keep_all: bool, solver: str = "auto") -> dict:
    """One TAT step with wire (FCN 784-500-10, batch 128, float32) in this process: its peak RSS.

    Run in a fresh child process per measurement (:func:`peak_memory`), so that ``VmHWM``
    is this step's peak alone. ``keep_all`` switches the sweep's checkpointing off;
    ``solver`` is :data:`xbarflow.crossbar.circuit.WIRE_SOLVER` (``auto`` takes nested
    dissection for these tile sizes, ``sweep`` the column sweep).
    """
    from xbarflow.crossbar import circuit

    tune_allocator()
    circuit.WIRE_SOLVER = solver
    if keep_all:
        wire.KEEP_ALL_BYTES = float("inf")
    rows, cols = {"xbar256": (256, 256), "784x500": (784, 500)}[layout]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 500), nn.ReLU(), nn.Linear(500, 10))
    spec = CrossbarSpec(rows=rows, cols=cols, r_source=R_SOURCE, r_sink=R_SINK, r_wire=R_WIRE)
    model = set_mode(convert(model, spec), "nominal")
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.rand(128, 1, 28, 28), torch.randint(0, 10, (128,))
    rss0 = _vm_kib("VmRSS")
    t0 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    return {"peak_rss_mib": round(_vm_kib("VmHWM") / 1024, 1), "rss_before_step_mib": round(rss0 / 1024, 1),
            "step_s": round(time.perf_counter() - t0, 2), "loss": float(loss.detach())}


def peak_memory(layout: str, keep_all: bool, solver: str = "auto") -> dict:
    """:func:`memory_child` in a fresh Python process (its JSON line)."""
    r = subprocess.run([sys.executable, os.path.abspath(__file__), "--memory-child", layout,
                        "keep_all" if keep_all else "checkpoint", solver], capture_output=True, text=True)
    if r.returncode != 0:
        return {"error": (r.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def memory_section(result: dict, compare: bool) -> None:
    """Peak RSS of a TAT step with wire on 256x256 tiles and on one 784x500 array (child processes).

    The solver is ``auto`` (nested dissection at these sizes). ``compare`` also measures the
    column sweep on 256x256 tiles, with checkpoints and with every state kept (``*_sweep``,
    ``*_sweep_keep_all``); the sweep on one 784x500 array (~5.5 TFLOP) is left out.
    """
    for layout in ("xbar256", "784x500"):
        m = peak_memory(layout, False)
        for k, v in m.items():
            result[f"tat_wire_{k}_{layout}"] = v
    for keep_all in ((False, True) if compare else ()):
        m = peak_memory("xbar256", keep_all, "sweep")
        for k, v in m.items():
            result[f"tat_wire_{k}_xbar256_sweep{'_keep_all' if keep_all else ''}"] = v


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--memory-child":
        print(json.dumps(memory_child(sys.argv[2], sys.argv[3] == "keep_all", *sys.argv[4:5])))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--memory":
        # only the peak-memory measurements (before and after checkpointing)
        result = {"checkpoint_keep_all_bytes": wire.KEEP_ALL_BYTES}
        memory_section(result, compare=True)
        print(json.dumps(result))
        return
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    threads = torch.get_num_threads()
    # as run.py does (XBARFLOW_MALLOC=default measures glibc's defaults instead)
    allocator_tuned = tune_allocator()
    result = {"threads": threads, "r_source": R_SOURCE, "r_sink": R_SINK, "r_wire": R_WIRE,
              "allocator_tuned": allocator_tuned}
    print(f"# wire-resistance solver benchmark: r_source={R_SOURCE:g}, r_sink={R_SINK:g}, "
          f"r_wire={R_WIRE:g} ohm, torch threads={threads}")
    print(f"{'quantity':<40}{'value':>14}")

    # Matmul rate, to put the solver's flops in context.
    A = torch.randn(64, 64, 64, dtype=torch.float64)
    ms = _median_ms(lambda: A @ A, 20)
    result["matmul_gflops_f64_64"] = round(2 * 64 ** 4 / ms / 1e6, 1)
    A = torch.randn(256, 256, dtype=torch.float64)
    ms = _median_ms(lambda: A @ A, 20)
    result["matmul_gflops_f64_256"] = round(2 * 256 ** 3 / ms / 1e6, 1)

    Gs = {}
    for N, rep in ((64, 7), (128, 5), (256, 3)):
        G = torch.tensor(rng.uniform(G_MIN, G_MAX, size=(N, N)))
        Gs[N] = G
        ms = _median_ms(lambda G=G: transfer_matrix_wire(G, r_source=R_SOURCE, r_sink=R_SINK, r_wire=R_WIRE), rep)
        result[f"transfer_ms_{N}"] = round(ms, 2)
        # forward and backward (gradient of a scalar loss w.r.t. G)
        Gr = G.clone().requires_grad_()
        W = torch.randn(N, N, dtype=torch.float64)

        def fb(Gr=Gr, W=W):
            (transfer_matrix_wire(Gr, r_source=R_SOURCE, r_sink=R_SINK, r_wire=R_WIRE) * W).sum().backward()

        result[f"transfer_fwd_bwd_ms_{N}"] = round(_median_ms(fb, rep), 2)
        flops = sweep_flops(G.shape, _tile_series_terms(G, R_WIRE), backward=False)
        result[f"transfer_gflops_{N}"] = round(flops / result[f"transfer_ms_{N}"] / 1e6, 1)

    # Baseline: scipy sparse direct solve per input, and its agreement with our T.
    G = Gs[128].numpy()
    t0 = time.perf_counter()
    T_base = baseline_transfer(G, R_SOURCE, R_SINK, R_WIRE)
    result["baseline_ms_128"] = round(1e3 * (time.perf_counter() - t0), 1)
    result["baseline_method"] = "scipy.sparse.linalg.spsolve per input (refactorises per input)"
    t0 = time.perf_counter()
    T_once = baseline_transfer(G, R_SOURCE, R_SINK, R_WIRE, factor_once=True)
    result["baseline_splu_once_ms_128"] = round(1e3 * (time.perf_counter() - t0), 1)
    T_ours = transfer_matrix_wire(Gs[128], r_source=R_SOURCE, r_sink=R_SINK, r_wire=R_WIRE).numpy()
    err = float(np.abs(T_ours - T_base).max() / np.abs(T_base).max())
    err_once = float(np.abs(T_ours - T_once).max() / np.abs(T_once).max())
    result["max_rel_err_vs_baseline_128"] = float(f"{max(err, err_once):.3e}")
    result["speedup_vs_baseline_128"] = round(result["baseline_ms_128"] / result["transfer_ms_128"], 1)

    # Technology-aware training step with wire resistance vs a standard step.
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 500), nn.ReLU(), nn.Linear(500, 10))
    spec = CrossbarSpec(rows=64, cols=64, r_source=R_SOURCE, r_sink=R_SINK, r_wire=R_WIRE)
    model = convert(model, spec)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.rand(128, 1, 28, 28)
    y = torch.randint(0, 10, (128,))
    loss_fn = nn.CrossEntropyLoss()

    # record the tiles the solver sweeps in a step (shapes and series lengths)
    swept = []
    sweep = wire._sweep

    def recording_sweep(G, r_source, r_sink, r_wire, keep, every=1):
        swept.append((G.shape[0], tuple(G.shape[1:]), _tile_series_terms(G, r_wire)))
        return sweep(G, r_source, r_sink, r_wire, keep, every)

    wire._sweep = recording_sweep

    def step(mode):
        set_mode(model, mode)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()
        return time.perf_counter() - t0

    step("ideal"), step("nominal")  # warm-up
    swept_per_step = list(swept)
    t_ideal, t_wire = [], []
    for _ in range(3):  # each timed step right after an untimed one of its kind, as in training
        step("ideal")
        t_ideal.append(step("ideal"))
        step("nominal")
        t_wire.append(step("nominal"))
    result["step_ms_standard"] = round(1e3 * statistics.median(t_ideal), 2)
    result["step_ms_wire_xbar64"] = round(1e3 * statistics.median(t_wire), 2)
    result["step_ratio_wire_xbar64"] = round(result["step_ms_wire_xbar64"] / result["step_ms_standard"], 1)
    n_tiles = 2 * (13 * 8 + 8 * 1)  # G+ and G- tiles of 784x500 and 500x10 on 64x64 arrays
    result["tiles_per_step"] = n_tiles

    # What bounds the step: the solver's products at this machine's batched matmul rate.
    A = torch.randn(n_tiles, 64, 64)
    ms = _median_ms(lambda: torch.bmm(A, A), 20)
    result["matmul_gflops_f32_bmm64"] = round(n_tiles * 2 * 64 ** 3 / ms / 1e6, 1)
    wire._sweep = sweep
    assert sum(b for b, _, _ in swept_per_step) == n_tiles, swept_per_step
    flops = sum(b * sweep_flops(shape, terms, backward=True) for b, shape, terms in swept_per_step)
    result["series_terms_per_call"] = [terms for _, _, terms in swept_per_step]
    result["wire_gflop_per_step"] = round(flops / 1e9, 1)
    result["wire_bound_ms_per_step"] = round(flops / result["matmul_gflops_f32_bmm64"] / 1e6, 1)
    result["step_ratio_bound_wire_xbar64"] = round(
        (result["wire_bound_ms_per_step"] + result["step_ms_standard"]) / result["step_ms_standard"], 1)

    if "--no-memory" not in sys.argv:
        memory_section(result, compare=False)

    for k, v in result.items():
        if k != "baseline_method":
            print(f"{k:<40}{str(v):>14}")
    print(f"baseline: {result['baseline_method']}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
