#!/usr/bin/env python
"""Benchmark: cost of technology-aware (TAT) training steps against standard ones.

Model: the paper's FCN ``Flatten, Linear(784, 500), ReLU, Linear(500, 10)`` in float32,
on crossbars with ``r_source = r_sink = 1 kOhm`` (default g range), in two layouts:

* ``xbar64``  - 64x64 tiles;
* ``784x500`` - one 784x500 array for the first layer (and one for the second).

Measured in one process, repetitions of the two variants interleaved (each timed call right
after an untimed one of the same step), medians:

* ``effective_weights_ms_*``: every layer's :func:`effective_weight` under ``no_grad``;
* ``step_ratio_*``: one SGD training step at batch 128 with the layers in mode
  ``"nominal"`` (technology-aware) divided by the same step in mode ``"ideal"``.

It also measures the machine's float32 matmul rate and counts the FLOPs of the
step (matrix products and LAPACK factorisations/solves, counted at dispatch), so
that ``tat_flops / matmul_rate`` shows the bound the method itself sets.

The last line printed is one JSON object with all numbers.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from xbarflow.crossbar import CrossbarSpec, effective_weight  # noqa: E402
from xbarflow.nn import convert, set_mode, xbar_layers  # noqa: E402
from xbarflow.runtime import tune_allocator  # noqa: E402

aten = torch.ops.aten


def _prod(shape):
    p = 1
    for s in shape:
        p *= int(s)
    return p


class FlopCount(TorchDispatchMode):
    """Counts FLOPs of matrix products and dense factorisations/solves as they dispatch.

    Elementwise ops and reductions are not counted (they are memory-bound and small).
    Conventions: a (m x k) @ (k x n) product is 2mkn; Cholesky of n x n is n^3/3;
    a triangular solve with n x n factor and k right-hand sides is n^2 k;
    ``cholesky_solve`` is two of those.
    """

    def __init__(self):
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        pkt = func.overloadpacket
        try:
            if pkt in (aten.mm, aten.bmm):
                a, b = args[0], args[1]
                self.flops += 2 * _prod(a.shape) * b.shape[-1]
            elif pkt in (aten.addmm, aten.baddbmm):
                a, b = args[1], args[2]
                self.flops += 2 * _prod(a.shape) * b.shape[-1]
            elif pkt is aten.linalg_cholesky_ex:
                A = args[0]
                self.flops += _prod(A.shape[:-2]) * A.shape[-1] ** 3 // 3
            elif pkt is aten.linalg_solve_triangular:
                A, Bm = args[0], args[1]
                batch = max(_prod(A.shape[:-2]), _prod(Bm.shape[:-2]))
                n = A.shape[-1]
                k = Bm.shape[-1] if kwargs.get("left", True) else Bm.shape[-2]
                self.flops += batch * n * n * k
            elif pkt in (aten.cholesky_solve, aten._cholesky_solve_helper):
                Bm, L = args[0], args[1]
                batch = max(_prod(L.shape[:-2]), _prod(Bm.shape[:-2]))
                self.flops += 2 * batch * L.shape[-1] ** 2 * Bm.shape[-1]
            elif pkt is aten.cholesky_inverse:
                L = args[0]
                self.flops += _prod(L.shape[:-2]) * 2 * L.shape[-1] ** 3 // 3
        except Exception:  # counting must never break the benchmark
            pass
        return out


def fcn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 500), nn.ReLU(), nn.Linear(500, 10))


def layouts():
    kw = dict(r_source=1e3, r_sink=1e3)
    return {"xbar64": CrossbarSpec(rows=64, cols=64, **kw), "784x500": CrossbarSpec(rows=784, cols=500, **kw)}


def make_step(model, x, target, lr=0.01):
    params = list(model.parameters())

    def step():
        out = model(x)
        loss = F.cross_entropy(out, target)
        for p in params:
            p.grad = None
        loss.backward()
        with torch.no_grad():
            for p in params:
                if p.grad is not None:  # the column gains get none in ideal mode, as torch.optim skips them
                    p.add_(p.grad, alpha=-lr)  # plain SGD step, in place as torch.optim.SGD does
        return loss

    return step


def all_effective_weights(model):
    with torch.no_grad():
        for layer in xbar_layers(model):
            effective_weight(layer._weight_matrix(), layer.spec, None, layer.xbar_name)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def interleaved(fns: dict, reps: int, warmup: int = 2) -> dict:
    """Median ms of each callable, the callables run in turn within each repetition.

    Each timed call comes right after an untimed call of the same callable, as consecutive
    training steps run: a 2 ms standard step timed right after a much larger step would run
    with that step's data in the caches and look slower than it is in training.
    """
    for _ in range(warmup):
        for f in fns.values():
            f()
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            f()
            times[k].append(timed(f))
    return {k: statistics.median(v) for k, v in times.items()}


def count_flops(fn) -> int:
    with FlopCount() as fc:
        fn()
    return fc.flops


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--batch", type=int, default=128)
    args = ap.parse_args(argv)
    # as run.py does (XBARFLOW_MALLOC=default measures glibc's defaults instead)
    allocator_tuned = tune_allocator()

    torch.manual_seed(0)
    x = torch.rand(args.batch, 1, 28, 28)
    target = torch.randint(0, 10, (args.batch,))
    res = {"threads": torch.get_num_threads(), "batch": args.batch, "allocator_tuned": allocator_tuned}
    rows = []
    mm_a, mm_b = torch.randn(784, 500), torch.randn(500, 784)
    mm = lambda: mm_a @ mm_b  # noqa: E731  (timed in the same loop: the machine's load is shared)
    mm_ms = []
    for name, spec in layouts().items():
        std_model = convert(fcn(), spec)
        tat_model = set_mode(convert(fcn(), spec), "nominal")
        std_step = make_step(std_model, x, target)
        tat_step = make_step(tat_model, x, target)
        ew = lambda m=tat_model: all_effective_weights(m)  # noqa: E731
        med = interleaved({"std": std_step, "tat": tat_step, "ew": ew, "mm": mm}, args.reps)
        mm_ms.append(med["mm"])
        gflops = 2 * 784 * 500 * 784 / (med["mm"] * 1e-3) / 1e9
        flops_std = count_flops(std_step)
        flops_tat = count_flops(tat_step)
        flops_ew = count_flops(ew)
        bound_ms = flops_tat / (gflops * 1e9) * 1e3
        res.update({
            f"effective_weights_ms_{name}": round(med["ew"], 3),
            f"step_ratio_{name}": round(med["tat"] / med["std"], 3),
            f"step_ms_standard_{name}": round(med["std"], 3),
            f"step_ms_tech_aware_{name}": round(med["tat"], 3),
            f"step_gflop_standard_{name}": round(flops_std / 1e9, 4),
            f"step_gflop_tech_aware_{name}": round(flops_tat / 1e9, 4),
            f"effective_weights_gflop_{name}": round(flops_ew / 1e9, 4),
            f"step_ms_tech_aware_at_matmul_rate_{name}": round(bound_ms, 3),
            f"step_ratio_bound_{name}": round((bound_ms) / med["std"], 3),
        })
        rows.append((name, med["std"], med["tat"], med["tat"] / med["std"], med["ew"], flops_tat / 1e9, bound_ms))

    gflops = 2 * 784 * 500 * 784 / (statistics.median(mm_ms) * 1e-3) / 1e9
    res["matmul_gflops"] = round(gflops, 1)
    print(f"float32 matmul 784x500 @ 500x784: {gflops:.1f} GFLOP/s, {torch.get_num_threads()} threads, "
          f"batch {args.batch}, {args.reps} interleaved reps (medians)")
    hdr = f"{'layout':>8} | {'std step ms':>11} | {'TAT step ms':>11} | {'ratio':>6} | {'eff. weights ms':>15} | " \
          f"{'TAT GFLOP':>9} | {'TAT ms at matmul rate':>21}"
    print(hdr)
    print("-" * len(hdr))
    for name, s, t, r, e, gf, b in rows:
        print(f"{name:>8} | {s:11.3f} | {t:11.3f} | {r:6.2f} | {e:15.3f} | {gf:9.3f} | {b:21.3f}")
    print("(targets: step_ratio_xbar64 <= 6, step_ratio_784x500 <= 10; 'TAT ms at matmul rate' = counted "
          "FLOPs / measured matmul rate, a lower bound for this method)")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
