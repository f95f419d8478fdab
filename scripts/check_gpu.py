#!/usr/bin/env python
"""Checks of xbarflow's crossbar core on a GPU: accuracy against the CPU, training steps, speed.

Needs only PyTorch and ``xbarflow.crossbar`` / ``xbarflow.nn`` (no Hydra, Lightning or
MLflow; the optional smoke run uses them and is skipped where they are missing), so it
runs on a GPU node that has nothing but a PyTorch install:

    PYTHONPATH=/path/to/xbarflow python scripts/check_gpu.py

Checks, each on the device in float32 against the CPU in float64 (the reference):

1. the no-wire solver (``transfer_matrix``) on random tiles, square and not, value and
   gradient; the wire solver likewise (``r_wire = 2.5`` ohm);
2. a technology-aware training step (FCN 784-500-10 on 64x64 tiles (784-32-10 with ``--quick``), nominal chip and a
   drawn chip with every device effect) without and with wire resistance: loss and
   weight gradient against the CPU float64 step, everything finite;
3. the benchmarks' step ratios on the device (``scripts/bench_crossbar.py``,
   ``scripts/bench_wire.py``: TAT step over standard step, batch 128, medians);
4. a one-epoch smoke run (``run.py experiment=smoke``) on the GPU, if Hydra, Lightning
   and MLflow are installed (``--no-smoke`` skips it).

Prints one JSON line. Exit status 0 when every check passed, or when there is no CUDA
device (``status: skipped``); 1 when a check failed. ``--device cpu`` runs every check
on the CPU (the "device" side then is float32 on the CPU), which is what the test suite
does, so the script itself stays tested on machines without a GPU.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from xbarflow.crossbar import Chip, CrossbarSpec, DeviceModel, transfer_matrix  # noqa: E402
from xbarflow.nn import convert, set_mode  # noqa: E402

R_SOURCE, R_SINK, R_WIRE = 1e3, 1e3, 2.5
G_MIN, G_MAX = 1 / 200e3, 1 / 20e3
# float32 against float64: relative errors of a few 1e-6 are expected; these leave room
# for the order of summation on a GPU without letting a wrong result through.
TOL_VALUE, TOL_GRAD, TOL_STEP = 1e-4, 1e-3, 1e-3


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check_solver(device, r_wire: float, shapes) -> dict:
    """Max relative error of T and of d<T, W>/dG, float32 on ``device`` against float64 on the CPU."""
    gen = torch.Generator().manual_seed(0)
    err_T, err_g = 0.0, 0.0
    for shape in shapes:
        G64 = (G_MIN + (G_MAX - G_MIN) * torch.rand(shape, generator=gen, dtype=torch.float64)).requires_grad_()
        W = torch.randn(shape, generator=gen, dtype=torch.float64)
        T64 = transfer_matrix(G64, r_source=R_SOURCE, r_sink=R_SINK, r_wire=r_wire)
        (g64,) = torch.autograd.grad((T64 * W).sum(), G64)
        G32 = G64.detach().to(device=device, dtype=torch.float32).requires_grad_()
        T32 = transfer_matrix(G32, r_source=R_SOURCE, r_sink=R_SINK, r_wire=r_wire)
        (g32,) = torch.autograd.grad((T32 * W.to(device=device, dtype=torch.float32)).sum(), G32)
        assert T32.device.type == device.type and g32.device.type == device.type
        err_T = max(err_T, _rel(T32, T64))
        err_g = max(err_g, _rel(g32, g64))
    return {"T": err_T, "grad": err_g}


def fcn(hidden: int = 500, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(784, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def _chip() -> Chip:
    dev = DeviceModel(stuck_on=0.005, stuck_off=0.005, read_noise=0.01, drift_nu=0.02, drift_nu_std=0.005)
    return Chip(seed=7, c2c=0.05, d2d=0.1, device=dev, time=1e3)


def check_tat_step(device, r_wire: float, batch: int, hidden: int = 500, tile: int = 64) -> dict:
    """Loss and first-layer gradient of one TAT step on ``device`` (float32) against CPU float64.

    Done twice: nominal devices, and a drawn chip with every device effect (its draws
    must be the same on the device as on the CPU).
    """
    spec = CrossbarSpec(rows=tile, cols=tile, r_source=R_SOURCE, r_sink=R_SINK, r_wire=r_wire)
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(batch, 1, 28, 28, generator=gen)
    y = torch.randint(0, 10, (batch,), generator=gen)
    out = {"loss_rel_err": 0.0, "grad_rel_err": 0.0, "finite": True}
    for mode, chip in (("nominal", None), ("chip", _chip())):
        res = []
        for dev, dt in ((torch.device("cpu"), torch.float64), (device, torch.float32)):
            model = set_mode(convert(fcn(hidden), spec).to(device=dev, dtype=dt), mode, chip)
            loss = F.cross_entropy(model(x.to(device=dev, dtype=dt)), y.to(dev))
            loss.backward()
            grad = model[1].weight.grad
            out["finite"] &= bool(torch.isfinite(loss)) and bool(torch.isfinite(grad).all())
            res.append((loss, grad))
        (l64, g64), (l32, g32) = res
        out["loss_rel_err"] = max(out["loss_rel_err"], _rel(l32, l64))
        out["grad_rel_err"] = max(out["grad_rel_err"], _rel(g32, g64))
    return out


def _step_fn(model, x, y, lr=0.01):
    params = list(model.parameters())

    def step():
        loss = F.cross_entropy(model(x), y)
        for p in params:
            p.grad = None
        loss.backward()
        with torch.no_grad():
            for p in params:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-lr)

    return step


def step_ratio(device, spec: CrossbarSpec, reps: int, batch: int = 128, hidden: int = 500) -> dict:
    """Median TAT step over median standard step, interleaved, synchronised (float32)."""
    torch.manual_seed(0)
    x = torch.rand(batch, 1, 28, 28, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    steps = {"std": _step_fn(convert(fcn(hidden), spec).to(device), x, y),
             "tat": _step_fn(set_mode(convert(fcn(hidden), spec).to(device), "nominal"), x, y)}
    times = {k: [] for k in steps}
    for rep in range(reps + 1):
        for k, f in steps.items():
            _sync(device)
            t0 = time.perf_counter()
            f()
            _sync(device)
            if rep:  # the first round warms up
                times[k].append((time.perf_counter() - t0) * 1e3)
    std, tat = statistics.median(times["std"]), statistics.median(times["tat"])
    return {"std_ms": round(std, 3), "tat_ms": round(tat, 3), "ratio": round(tat / std, 2)}


def smoke_run(device) -> dict:
    """``run.py experiment=smoke`` on the device in a temporary directory (needs the full stack)."""
    try:
        import hydra  # noqa: F401
        import mlflow  # noqa: F401
        import pytorch_lightning  # noqa: F401
    except ImportError as e:
        return {"status": "skipped", "message": f"missing {e.name}"}
    accel = "gpu" if device.type == "cuda" else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, os.path.join(ROOT, "run.py"), "experiment=smoke",
                            f"trainer.accelerator={accel}", "trainer.devices=1", "hydra.run.dir=."],
                           cwd=tmp, env=env, capture_output=True, text=True)
    status = "passed" if r.returncode == 0 else "failed"
    return {"status": status, "wall_s": round(time.perf_counter() - t0, 1),
            **({} if r.returncode == 0 else {"stderr_tail": r.stderr[-500:]})}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda",
                    help="device to check (default cuda; 'cpu' runs every check on the CPU)")
    ap.add_argument("--quick", action="store_true",
                    help="for tests: a 784-32-10 network for the steps and the ratios, one timing repetition")
    ap.add_argument("--no-smoke", action="store_true", help="skip the one-epoch smoke run")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    res = {"torch": torch.__version__, "device": args.device}
    if device.type == "cuda":
        if not torch.cuda.is_available():
            res.update(status="skipped", message="no CUDA device available: nothing checked (torch "
                       f"{torch.__version__}, cuda build {torch.version.cuda})")
            print(json.dumps(res))
            return 0
        res["device_name"] = torch.cuda.get_device_name(device)
        res["tf32_matmul"] = bool(torch.backends.cuda.matmul.allow_tf32)
    reps, hidden = (1, 32) if args.quick else (15, 500)
    res["hidden"] = hidden
    failures = []
    t_start = time.perf_counter()

    nowire = check_solver(device, 0.0, [(16, 64, 64), (8, 64, 32), (8, 32, 64), (2, 500, 300)])
    wire = check_solver(device, R_WIRE, [(8, 32, 32), (4, 32, 16), (4, 16, 32)])
    res.update(nowire_max_rel_err_f32=nowire["T"], nowire_grad_rel_err_f32=nowire["grad"],
               wire_max_rel_err_f32=wire["T"], wire_grad_rel_err_f32=wire["grad"])
    for k in ("nowire_max_rel_err_f32", "wire_max_rel_err_f32"):
        if not res[k] < TOL_VALUE:
            failures.append(k)
    for k in ("nowire_grad_rel_err_f32", "wire_grad_rel_err_f32"):
        if not res[k] < TOL_GRAD:
            failures.append(k)

    for key, r_wire, batch in (("tat", 0.0, 32), ("tat_wire", R_WIRE, 8)):
        st = check_tat_step(device, r_wire, batch, hidden, tile=16 if args.quick and r_wire else 64)
        res[f"{key}_step_finite"] = st["finite"]
        res[f"{key}_step_loss_rel_err_f32"] = st["loss_rel_err"]
        res[f"{key}_step_grad_rel_err_f32"] = st["grad_rel_err"]
        if not (st["finite"] and st["loss_rel_err"] < TOL_STEP and st["grad_rel_err"] < TOL_STEP):
            failures.append(f"{key}_step")

    kw = dict(r_source=R_SOURCE, r_sink=R_SINK)
    layouts = [("xbar64", CrossbarSpec(rows=64, cols=64, **kw), reps),
               ("784x500", CrossbarSpec(rows=784, cols=500, **kw), reps),
               ("wire_xbar64", CrossbarSpec(rows=64, cols=64, r_wire=R_WIRE, **kw), max(1, reps // 5))]
    if args.quick:  # the machinery only: small tiles for the wire step, no 784x500 array
        layouts = [layouts[0], ("wire_xbar64", CrossbarSpec(rows=16, cols=16, r_wire=R_WIRE, **kw), 1)]
        res["quick_wire_tile"] = 16
    for name, spec, n in layouts:
        r = step_ratio(device, spec, n, hidden=hidden)
        res[f"step_ratio_{name}"] = r["ratio"]
        res[f"step_ms_standard_{name}"] = r["std_ms"]
        res[f"step_ms_tech_aware_{name}"] = r["tat_ms"]
        if not math.isfinite(r["ratio"]):
            failures.append(f"step_ratio_{name}")

    if args.no_smoke:
        res["smoke"] = {"status": "skipped", "message": "--no-smoke"}
    else:
        res["smoke"] = smoke_run(device)
        if res["smoke"]["status"] == "failed":
            failures.append("smoke")
    res["wall_s"] = round(time.perf_counter() - t_start, 1)
    res["status"] = "failed" if failures else "passed"
    if failures:
        res["failed"] = failures
    print(json.dumps(res))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
