#!/usr/bin/env python
"""Does ``torch.compile`` pay for the technology-aware step? The step eager against the whole model
compiled (forward and backward), side by side in one process.

Model and step as ``scripts/bench_crossbar.py`` (FCN 784-500-10, batch 128, float32, r_source = r_sink
= 1 kOhm, nominal chip, mode ``nominal``), layouts ``xbar64`` (64x64 tiles) and ``784x500`` (one array).
Reported per layout and compile mode: the first call (compile time included), the median step time
after warm-up, and the loss and first weight gradient's norm against eager (they agree to float
tolerance: the same arithmetic, another kernel order). Also the plain (standard) step.

    python scripts/bench_compile.py --device cpu --threads 1
    PYTHONPATH=. python scripts/bench_compile.py --device cuda --modes default,max-autotune-no-cudagraphs

Needs only PyTorch and ``xbarflow.crossbar`` / ``xbarflow.nn`` (runs on a GPU node without Hydra or
MLflow). Prints one JSON line per layout and mode as it goes, the last one holding everything.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from xbarflow.crossbar import CrossbarSpec  # noqa: E402
from xbarflow.nn import convert, set_mode  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    ap.add_argument("--modes", default="default", help="torch.compile modes, comma-separated (eager always runs)")
    ap.add_argument("--reps", type=int, default=30)
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    torch.set_num_threads(args.threads)
    if dev.type == "cpu":
        from xbarflow.runtime import tune_allocator

        tune_allocator()
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    res = {"torch": torch.__version__, "device": args.device, "threads": args.threads}
    if dev.type == "cuda":
        res["device_name"] = torch.cuda.get_device_name(dev)

    def fcn():
        torch.manual_seed(0)
        return nn.Sequential(nn.Flatten(), nn.Linear(784, 500), nn.ReLU(), nn.Linear(500, 10))

    torch.manual_seed(0)
    x, t = torch.rand(128, 1, 28, 28, device=dev), torch.randint(0, 10, (128,), device=dev)

    def timed(f):
        for _ in range(5):
            f()
        sync()
        ts = []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            f()
            sync()
            ts.append(time.perf_counter() - t0)
        ts.sort()
        return round(ts[len(ts) // 2] * 1e3, 3)

    def make_step(model, forward):
        params = list(model.parameters())

        def step():
            loss = F.cross_entropy(forward(x), t)
            for p in params:
                p.grad = None
            loss.backward()
            return loss, params[0].grad

        return step

    for lay, shape in (("xbar64", dict(rows=64, cols=64)), ("784x500", dict(rows=784, cols=500))):
        ref = None
        for mode in ["eager", *[m for m in args.modes.split(",") if m]]:
            model = set_mode(convert(fcn(), CrossbarSpec(r_source=1e3, r_sink=1e3, **shape)), "nominal").to(dev)
            step = make_step(model, model if mode == "eager" else torch.compile(model, mode=mode))
            try:
                t0 = time.perf_counter()
                loss, grad = step()
                sync()
                res[f"{lay}:{mode}:first_call_s"] = round(time.perf_counter() - t0, 2)
                if ref is None:
                    ref = (float(loss), grad.clone())
                res[f"{lay}:{mode}:loss_rel_diff"] = abs(float(loss) - ref[0]) / abs(ref[0])
                res[f"{lay}:{mode}:grad_rel_diff"] = float((grad - ref[1]).norm() / ref[1].norm())
                res[f"{lay}:{mode}:step_ms"] = timed(step)
            except Exception as e:  # a compiler missing or failing: say so, go on
                res[f"{lay}:{mode}:error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            print(json.dumps(res), flush=True)
        std = fcn().to(dev)
        res[f"{lay}:standard_step_ms"] = timed(make_step(std, std))
        for mode in ["eager", *args.modes.split(",")]:
            if f"{lay}:{mode}:step_ms" in res:
                res[f"{lay}:{mode}:ratio"] = round(res[f"{lay}:{mode}:step_ms"] / res[f"{lay}:standard_step_ms"], 2)
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
