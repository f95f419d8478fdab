#!/usr/bin/env python
"""Where the technology-aware step's time goes, op by op, and the floors that follow (issue 30).

Every ATen op of one training step (forward, backward and the SGD update; the FCN 784-500-10,
batch 128, float32, r_source = r_sink = 1 kOhm, as ``scripts/bench_ab.py``) is timed where it
runs, inside the step, by a dispatch mode below autograd, and classed:

* ``gemm``: matrix products (mm, bmm, addmm, baddbmm); FLOPs as ``bench_crossbar.FlopCount``;
* ``lapack``: factorisations and solves (Cholesky, triangular and Cholesky solves, LU);
* ``pass``: every other op that touches data (element-wise, copies, reductions, fills);
  its bytes are the sizes of the tensors it reads and writes;
* ``view``: ops that only make views or allocate (no data moved; timed all the same).

The same kernels are then timed alone on warm caches: every distinct product shape of the
step, one pass over a tensor of the step's typical pass size (byte-weighted median), and an op
on a one-element tensor (the fixed cost of dispatching any op). From these, per layout:

* ``in_situ``: milliseconds per class inside the step, and the rest (Python and autograd);
* ``gemm_gflops_in_situ`` against ``gemm_gflops_alone``: how much slower the same products
  run inside the step (their operands come from memory, not from cache); the same for the
  passes (``pass_gb_s_in_situ`` / ``pass_gb_s_alone``);
* floors, as ratios over the standard step measured in the same process:
  ``ratio_floor_fused`` (products and factorisations at their in-situ times, every other op
  fused away: what a perfect fusion of the element-wise work could reach without new
  algorithms); ``ratio_floor_eager`` (every product at its rate alone on warm operands, the
  factorisations in situ, every pass at the warm bandwidth of the step's typical pass size and
  every op at the fixed dispatch cost: eager PyTorch with each kernel as fast as it runs alone).
  ``bench_ab.py``'s ``ratio_bound_cpu`` (every counted FLOP at the rate of one large product)
  is the bound of the method itself.

    python scripts/bench_floor.py --threads 1 --reps 7 [--layouts xbar64,784x500,wire_xbar64] [--wire-solver nested]

Prints a table per layout, then one JSON line. Timings inside the dispatch mode carry its own
overhead (a few microseconds an op), which lands in ``rest``, not in the classes.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import torch  # noqa: E402
from bench_crossbar import fcn, make_step  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_leaves  # noqa: E402

from xbarflow.crossbar import CrossbarSpec, circuit  # noqa: E402
from xbarflow.nn import convert, set_mode  # noqa: E402
from xbarflow.runtime import tune_allocator  # noqa: E402

aten = torch.ops.aten

GEMM = {aten.mm, aten.bmm, aten.addmm, aten.baddbmm}
LAPACK = {aten.linalg_cholesky_ex, aten.linalg_solve_triangular, aten.cholesky_solve, aten._cholesky_solve_helper,
          aten.linalg_lu_factor_ex, aten.linalg_lu_solve, aten.cholesky_inverse, aten.linalg_inv_ex}
VIEW = {aten.view, aten._unsafe_view, aten.as_strided, aten.slice, aten.select, aten.transpose, aten.t,
        aten.permute, aten.expand, aten.unsqueeze, aten.squeeze, aten.detach, aten.alias, aten.diagonal,
        aten.unfold, aten.split, aten.split_with_sizes, aten.chunk, aten.narrow, aten.unbind, aten.lift_fresh,
        aten.empty, aten.empty_like, aten.empty_strided, aten.new_empty, aten.new_empty_strided, aten._reshape_alias,
        aten.view_as, aten.unflatten, aten.flatten, aten.reshape, aten.resize_, aten.set_, aten.movedim}

LAYOUTS = {"xbar64": dict(rows=64, cols=64), "784x500": dict(rows=784, cols=500),
           "wire_xbar64": dict(rows=64, cols=64, r_wire=2.5)}


def _prod(shape) -> int:
    p = 1
    for s in shape:
        p *= int(s)
    return p


def _gemm_operands(pkt, args):
    """The two factors of a product: ``mm(a, b)`` / ``bmm(a, b)``, or ``addmm(c, a, b)`` / ``baddbmm(c, a, b)``."""
    return (args[0], args[1]) if pkt in (aten.mm, aten.bmm) else (args[1], args[2])


def _bytes(x) -> int:
    return sum(t.numel() * t.element_size() for t in tree_leaves(x) if isinstance(t, torch.Tensor) and t.dim() > 0)


class OpClock(TorchDispatchMode):
    """Times every op where it runs and sums time, count, FLOPs (gemm) and bytes (pass) per class."""

    def __init__(self):
        super().__init__()
        self.ms = collections.Counter()
        self.ops = collections.Counter()
        self.flops = 0
        self.bytes = 0
        self.gemm_shapes = collections.Counter()
        self.pass_sizes = collections.Counter()  # bytes of a pass -> how many
        self.detail = collections.defaultdict(lambda: [0, 0.0, 0])  # (class, op, shapes) -> [calls, ms, bytes]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        t0 = time.perf_counter()
        out = func(*args, **kwargs)
        dt = (time.perf_counter() - t0) * 1e3
        pkt = func.overloadpacket
        cls = "gemm" if pkt in GEMM else "lapack" if pkt in LAPACK else "view" if pkt in VIEW else "pass"
        self.ms[cls] += dt
        shapes = tuple(tuple(a.shape) for a in args if isinstance(a, torch.Tensor))
        d = self.detail[(cls, str(pkt).replace("aten.", ""), shapes)]
        d[0] += 1
        d[1] += dt
        self.ops[cls] += 1
        if cls == "gemm":
            a, b = _gemm_operands(pkt, args)
            self.flops += 2 * _prod(a.shape) * b.shape[-1]
            self.gemm_shapes[(tuple(a.shape), tuple(b.shape))] += 1
        elif cls == "pass":
            nb = _bytes((args, kwargs)) + _bytes(out)
            self.bytes += nb
            self.pass_sizes[nb] += 1
            d[2] += nb
        return out


def _median_ms(fn, reps: int) -> float:
    fn()
    fn()
    ts = []
    for _ in range(reps):
        fn()  # warm, as consecutive training steps run
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


def gemm_alone_ms(shapes: collections.Counter, reps: int) -> float:
    """Milliseconds of the step's products run alone on warm operands: each distinct shape timed, times its count."""
    total = 0.0
    for (sa, sb), count in shapes.items():
        a, b = torch.randn(*sa), torch.randn(*sb)
        total += count * _median_ms(lambda a=a, b=b: torch.matmul(a, b), reps)
    return total


def pass_and_op_rates(pass_numel: int, reps: int) -> dict:
    """A pass over ``pass_numel`` floats alone (warm), and the fixed cost of any op."""
    x, y = torch.randn(pass_numel), torch.empty(pass_numel)
    pass_ms = _median_ms(lambda: torch.mul(x, 2.0, out=y), 5 * reps)
    one = torch.ones(1)
    op_us = _median_ms(lambda: [torch.add(one, one) for _ in range(100)], reps) * 10  # us per op
    return {"pass_gb_s_alone": 2 * pass_numel * 4 / pass_ms / 1e6, "op_us_alone": op_us}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--layouts", default="xbar64,784x500")
    ap.add_argument("--wire-solver", default=None, choices=("auto", "sweep", "nested"),
                    help="circuit.WIRE_SOLVER for the wire layouts (default: the module's, auto)")
    ap.add_argument("--detail", type=int, default=0, help="also list the N costliest (op, shapes) of the step")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    tune_allocator()
    if args.wire_solver:
        circuit.WIRE_SOLVER = args.wire_solver
    torch.manual_seed(0)
    x, t = torch.rand(128, 1, 28, 28), torch.randint(0, 10, (128,))
    res = {"threads": args.threads, "reps": args.reps, "torch": torch.__version__, "wire_solver": circuit.WIRE_SOLVER}
    for lay in args.layouts.split(","):
        reps = max(3, args.reps // 3) if lay.startswith("wire") else args.reps
        spec = CrossbarSpec(r_source=1e3, r_sink=1e3, **LAYOUTS[lay])
        std = make_step(convert(fcn(), spec), x, t)
        tat = make_step(set_mode(convert(fcn(), spec), "nominal"), x, t)
        std_ms, tat_ms = _median_ms(std, reps), _median_ms(tat, reps)
        clocks, clocked_ms = [], []
        for _ in range(reps):
            tat()
            with OpClock() as clock:
                t0 = time.perf_counter()
                tat()
                clocked_ms.append((time.perf_counter() - t0) * 1e3)
            clocks.append(clock)
        ms = {k: statistics.median(c.ms[k] for c in clocks) for k in ("gemm", "lapack", "pass", "view")}
        first = clocks[0]
        ops = {k: first.ops[k] for k in ("gemm", "lapack", "pass", "view")}
        flops, nbytes = first.flops, first.bytes
        # the byte-weighted median pass: half the bytes move in passes at least this large
        acc, typical = 0, 0
        for nb in sorted(first.pass_sizes):
            acc += nb * first.pass_sizes[nb]
            if acc >= nbytes / 2:
                typical = nb
                break
        rates = pass_and_op_rates(max(1, typical // 8), reps)  # read and write: typical / 8 floats
        alone = gemm_alone_ms(first.gemm_shapes, reps)
        n_ops = sum(ops.values())
        fused = ms["gemm"] + ms["lapack"]
        eager = alone + ms["lapack"] + nbytes / rates["pass_gb_s_alone"] / 1e6 + n_ops * rates["op_us_alone"] / 1e3
        r = {"std_ms": round(std_ms, 2), "tat_ms": round(tat_ms, 2), "ratio": round(tat_ms / std_ms, 2),
             "clocked_step_ms": round(statistics.median(clocked_ms), 2),
             "in_situ_ms": {k: round(v, 2) for k, v in ms.items()},
             # median of the per-step sums (<= the median clocked step, as each sum <= its step)
             "in_situ_total_ms": round(statistics.median(sum(c.ms.values()) for c in clocks), 2),
             "rest_ms": round(statistics.median(clocked_ms) - sum(ms.values()), 2), "ops": ops,
             "gemm_gflop": round(flops / 1e9, 4),
             "gemm_gflops_in_situ": round(flops / ms["gemm"] / 1e6, 1),
             "gemm_gflops_alone": round(flops / alone / 1e6, 1),
             "pass_mb": round(nbytes / 2 ** 20, 1), "pass_gb_s_in_situ": round(nbytes / ms["pass"] / 1e6, 1),
             "typical_pass_mb": round(typical / 2 ** 20, 2),
             **{k: round(v, 2) for k, v in rates.items()},
             "ratio_floor_fused": round(fused / std_ms, 2),
             "ratio_floor_eager": round(eager / std_ms, 2)}
        res[lay] = r
        print(f"# {lay}: TAT step {r['tat_ms']} ms / standard {r['std_ms']} ms = {r['ratio']}x")
        for k, v in r.items():
            print(f"  {k:28s} {v}")
        if args.detail:
            rows = sorted(first.detail.items(), key=lambda kv: -kv[1][1])[: args.detail]
            r["detail"] = [{"class": c, "op": op, "shapes": [list(x) for x in sh], "calls": n, "ms": round(t_, 3),
                            "mb": round(b / 2 ** 20, 2)} for (c, op, sh), (n, t_, b) in rows]
            for d in r["detail"]:
                print(f"    {d['class']:6s} {d['op']:28s} x{d['calls']:<3d} {d['ms']:7.3f} ms {d['mb']:7.2f} MB  {d['shapes']}")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
