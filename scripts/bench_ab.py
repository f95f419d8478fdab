#!/usr/bin/env python
"""Side-by-side benchmark of the TAT step: another git revision of ``xbarflow`` against this tree.

Both versions are imported into one process (the other revision's package is extracted with
``git archive`` and imported as ``xbarflow_base``), and their steps run interleaved, so a
machine shared with other jobs slows both alike. Reported per layout and version: medians of
wall time and of process CPU time (CPU time is the steadier of the two on a loaded machine;
with ``--threads 1`` it is the work done) for a standard step (mode ``ideal``) and a
technology-aware step (mode ``nominal``), and their ratio; and the bound of the method in the
same units (``ratio_bound_cpu``: the TAT step's counted FLOPs at the matmul rate measured in
CPU time, over the standard step's CPU time).

Model and step as ``scripts/bench_crossbar.py`` (FCN 784-500-10, batch 128, float32,
r_source = r_sink = 1 kOhm, plain SGD); layouts ``xbar64`` (64x64 tiles), ``784x500`` (one
array), ``wire_xbar64`` (64x64 tiles, r_wire = 2.5 ohm; a third of the repetitions); and on
request (``--layouts``) ``adc_learned_xbar64`` / ``adc_fixed_xbar64`` (64x64 tiles, 8-bit DAC
and ADC, learned or fixed ranges).

Every timed step comes right after an untimed call of the same step (``--warm``, the default),
as consecutive training steps run: otherwise a 2 ms standard step timed right after a 1 s step
with wire would run with the other step's data in the caches, and the wire ratio would depend
on the order of the steps (+-10 % seen). ``--no-warm`` times the steps back to back, as
before 2026-11-29.

    python scripts/bench_ab.py --base main --threads 1 --reps 11

Prints a table, then one JSON line.
"""
from __future__ import annotations

import argparse
import atexit
import importlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def extract(rev: str, dest: str) -> None:
    """``xbarflow/`` of git revision ``rev`` into ``dest/xbarflow_base``."""
    archive = subprocess.run(["git", "-C", ROOT, "archive", rev, "xbarflow"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", dest], input=archive.stdout, check=True)
    os.rename(os.path.join(dest, "xbarflow"), os.path.join(dest, "xbarflow_base"))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="main", help="git revision to compare against (default main)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=11)
    ap.add_argument("--layouts", default="xbar64,784x500,wire_xbar64")
    ap.add_argument("--warm", action=argparse.BooleanOptionalAction, default=True,
                    help="an untimed call of each step right before its timed one (default)")
    args = ap.parse_args(argv)
    tmp = tempfile.mkdtemp(prefix="xbarflow_ab_")
    atexit.register(shutil.rmtree, tmp, True)
    extract(args.base, tmp)
    sys.path.insert(0, tmp)
    sys.path.insert(0, ROOT)

    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    from xbarflow.runtime import tune_allocator

    torch.set_num_threads(args.threads)
    tune_allocator()
    versions = {name: (importlib.import_module(name + ".nn"), importlib.import_module(name + ".crossbar"))
                for name in ("xbarflow_base", "xbarflow")}

    def fcn():
        torch.manual_seed(0)
        return nn.Sequential(nn.Flatten(), nn.Linear(784, 500), nn.ReLU(), nn.Linear(500, 10))

    def make_step(model, x, t):
        params = list(model.parameters())

        def step():
            loss = F.cross_entropy(model(x), t)
            for p in params:
                p.grad = None
            loss.backward()
            with torch.no_grad():
                for p in params:
                    if p.grad is not None:
                        p.add_(p.grad, alpha=-0.01)

        return step

    torch.manual_seed(0)
    x, t = torch.rand(128, 1, 28, 28), torch.randint(0, 10, (128,))
    kw = dict(r_source=1e3, r_sink=1e3)
    adc = dict(adc_bits=8, dac_bits=8)
    specs = {"xbar64": dict(rows=64, cols=64, **kw), "784x500": dict(rows=784, cols=500, **kw),
             "wire_xbar64": dict(rows=64, cols=64, r_wire=2.5, **kw),
             "adc_learned_xbar64": dict(rows=64, cols=64, adc_range_mode="learned", **adc, **kw),
             "adc_fixed_xbar64": dict(rows=64, cols=64, adc_range_mode="fixed", **adc, **kw)}
    res = {"base": args.base, "threads": args.threads, "reps": args.reps, "warm": args.warm,
           "load1_start": os.getloadavg()[0]}
    for lay in args.layouts.split(","):
        reps = max(3, args.reps // 3) if lay.startswith("wire") else args.reps
        steps = {}
        for name, (xnn, xcb) in versions.items():
            spec = xcb.CrossbarSpec(**specs[lay])
            steps[f"{name}:std"] = make_step(xnn.convert(fcn(), spec), x, t)
            steps[f"{name}:tat"] = make_step(xnn.set_mode(xnn.convert(fcn(), spec), "nominal"), x, t)
        for f in steps.values():  # warm-up
            f()
            f()
        wall = {k: [] for k in steps}
        cpu = {k: [] for k in steps}
        for _ in range(reps):
            for k, f in steps.items():
                if args.warm:
                    f()
                t0, c0 = time.perf_counter(), time.process_time()
                f()
                wall[k].append((time.perf_counter() - t0) * 1e3)
                cpu[k].append((time.process_time() - c0) * 1e3)
        for k in steps:
            res[f"{lay}:{k}:wall_ms"] = round(statistics.median(wall[k]), 2)
            res[f"{lay}:{k}:cpu_ms"] = round(statistics.median(cpu[k]), 2)
        for name in versions:
            for m in ("wall", "cpu"):
                tat, std = res[f"{lay}:{name}:tat:{m}_ms"], res[f"{lay}:{name}:std:{m}_ms"]
                res[f"{lay}:{name}:ratio_{m}"] = round(tat / std, 2)
    # The bound of the method, in the same units: the TAT step's counted FLOPs (products and
    # factorisations, scripts/bench_crossbar.py's FlopCount) at this process's matmul rate,
    # measured in CPU time with the same threads, over the median standard step.
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    from bench_crossbar import count_flops

    a, b = torch.randn(784, 500), torch.randn(500, 784)
    mm = []
    for _ in range(max(5, args.reps)):
        c0 = time.process_time()
        a @ b
        mm.append(time.process_time() - c0)
    rate = 2 * 784 * 500 * 784 / statistics.median(mm)
    res["matmul_gflops_cpu_time"] = round(rate / 1e9, 1)
    for lay in args.layouts.split(","):
        if lay != "xbar64" and lay != "784x500":
            continue  # the wire solver's products are counted by scripts/bench_wire.py; ADC layouts: no bound
        xnn, xcb = versions["xbarflow"]
        model = xnn.set_mode(xnn.convert(fcn(), xcb.CrossbarSpec(**specs[lay])), "nominal")
        flops = count_flops(make_step(model, x, t))
        res[f"{lay}:tat_gflop"] = round(flops / 1e9, 4)
        bound_ms = flops / rate * 1e3
        res[f"{lay}:ratio_bound_cpu"] = round(bound_ms / res[f"{lay}:xbarflow:std:cpu_ms"], 2)
    res["load1_end"] = os.getloadavg()[0]
    for k, v in res.items():
        print(f"{k:45s} {v}")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
