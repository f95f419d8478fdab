#!/usr/bin/env python
"""Benchmark: evaluation with column ADCs, partial outputs in chunks against all at once.

Model: the paper CNN (convolutions 32, 64, then 4096-512-10) on ``--size`` tiles with 8-bit
DAC and ADC (fixed ranges), one evaluation batch of ``--batch`` images on a chip (c2c and d2d
variation), no gradient. Each variant runs in its own fresh process (peak resident memory,
``VmHWM``, is per process), alternating, ``--rounds`` times:

* ``chunked``: the default, at most ``ADC_CHUNK_PARTIALS`` partial outputs at once;
* ``whole``: every partial output of the batch at once (the chunk limit set out of reach).

Printed: per variant the median time of a forward pass and the peak memory it adds, and
whether both gave the same output (sum of the logits). The last line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = r"""
import json, re, sys, time, statistics, torch
from xbarflow.crossbar import Chip, CrossbarSpec
from xbarflow.crossbar import effective
from xbarflow.models.paper import cnn
from xbarflow.nn import convert, set_mode
size, batch, reps, whole = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "whole"
if whole:
    effective.ADC_CHUNK_PARTIALS = 1 << 62
torch.manual_seed(0)
spec = CrossbarSpec(rows=size, cols=size, r_source=1e3, r_sink=1e3, adc_bits=8, dac_bits=8, adc_range_mode="fixed")
model = convert(cnn((1, 28, 28), 10), spec).eval()
set_mode(model, "chip", Chip(seed=1, c2c=0.1, d2d=0.1))
x = torch.rand(batch, 1, 28, 28)
def hwm():
    return int(re.search(r"VmHWM:\s+(\d+)", open("/proc/self/status").read()).group(1)) * 1024
base = hwm()
times = []
with torch.no_grad():
    for _ in range(reps):
        t0 = time.perf_counter()
        y = model(x)
        times.append(time.perf_counter() - t0)
print(json.dumps({"s": statistics.median(times), "peak_added_mb": (hwm() - base) / 1e6,
                  "checksum": float(y.double().sum())}))
"""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=64, help="tile rows = cols")
    parser.add_argument("--batch", type=int, default=1000, help="images per evaluation batch")
    parser.add_argument("--reps", type=int, default=5, help="forward passes per process")
    parser.add_argument("--rounds", type=int, default=2, help="processes per variant, alternating")
    parser.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of each process")
    args = parser.parse_args(argv)
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS=str(args.threads), XBARFLOW_MALLOC="default")
    results = {"chunked": [], "whole": []}
    for _ in range(args.rounds):
        for variant in results:
            out = subprocess.run([sys.executable, "-c", CHILD, str(args.size), str(args.batch), str(args.reps), variant],
                                 capture_output=True, text=True, env=env, check=True)
            results[variant].append(json.loads(out.stdout.strip().splitlines()[-1]))
    summary = {"size": args.size, "batch": args.batch, "threads": args.threads}
    for variant, runs in results.items():
        summary[f"{variant}_s"] = round(statistics.median(r["s"] for r in runs), 3)
        summary[f"{variant}_peak_added_mb"] = round(statistics.median(r["peak_added_mb"] for r in runs))
        print(f"{variant:>8}: {summary[f'{variant}_s']:.3f} s per batch, peak +{summary[f'{variant}_peak_added_mb']} MB")
    summary["same_output"] = len({r["checksum"] for runs in results.values() for r in runs}) == 1
    summary["speedup"] = round(summary["whole_s"] / summary["chunked_s"], 2)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
