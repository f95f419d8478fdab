"""scripts/bench_floor.py: the per-op clock classes and counts ops exactly, and the script reports its floors."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

from bench_floor import OpClock  # noqa: E402


def test_op_clock_counts_flops_bytes_and_classes():
    """A product, two element-wise passes, a factorisation and views: FLOPs of the product (2 m k n),
    bytes of each pass (every tensor read and written), one op per class as dispatched."""
    a, b = torch.randn(3, 5, 7), torch.randn(3, 7, 4)
    spd = torch.eye(6) * 2.0
    with OpClock() as clock:
        c = torch.bmm(a, b)              # gemm: 2 * 3 * 5 * 7 * 4 flops
        d = c * 2.0                      # pass: reads c (60 floats), writes d (60)
        d.add_(c)                        # pass: reads d and c, writes d
        torch.linalg.cholesky_ex(spd)    # lapack
        c.transpose(1, 2)                # view
    assert clock.flops == 2 * 3 * 5 * 7 * 4
    assert clock.ops["gemm"] == 1 and clock.ops["lapack"] == 1
    assert clock.ops["pass"] == 2
    assert clock.bytes == (60 + 60) * 4 + (60 + 60 + 60) * 4
    assert clock.ops["view"] >= 1
    assert clock.gemm_shapes == {((3, 5, 7), (3, 7, 4)): 1}
    assert all(clock.ms[k] >= 0.0 for k in ("gemm", "lapack", "pass", "view"))


def test_bench_floor_reports_floors_for_a_layout():
    """Three repetitions on 64x64 tiles (medians): the classes' in-step times fit inside the clocked step, the
    product FLOPs are those bench_crossbar counts for the same step's products, and the floors are ratios."""
    r = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "bench_floor.py"), "--reps", "3",
                        "--layouts", "xbar64", "--detail", "3"], capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, PYTHONPATH=ROOT))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])["xbar64"]
    assert 0.0 < out["in_situ_total_ms"] <= out["clocked_step_ms"]
    # FCN 784-500-10 on 64x64 tiles: the TAT step's products (bench_ab.py's tat_gflop also counts
    # the factorisations' 0.0046 GFLOP)
    assert 0.80 < out["gemm_gflop"] < 0.86
    assert out["ops"]["gemm"] > 0 and out["ops"]["pass"] > 0 and out["pass_mb"] > 10
    assert out["ratio"] > 1.0 and out["ratio_floor_fused"] > 1.0 and out["ratio_floor_eager"] > 1.0
    assert len(out["detail"]) == 3
