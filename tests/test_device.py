"""Device placement: the technology-aware hot path never reads a device tensor back to the host,
chips' draws land on the layer's device (and are the same as on the CPU), and scripts/check_gpu.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import xbarflow.crossbar.circuit as circuit
from xbarflow.crossbar import Chip, CrossbarSpec, DeviceModel
from xbarflow.crossbar.rng import _CACHE
from xbarflow.nn import convert, set_mode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHIP = Chip(seed=1, c2c=0.1, d2d=0.1, time=100.0,
            device=DeviceModel(stuck_on=0.01, stuck_off=0.01, read_noise=0.01, drift_nu=0.05, drift_nu_std=0.01))


def _fcn(spec):
    torch.manual_seed(0)
    return convert(nn.Sequential(nn.Flatten(), nn.Linear(300, 40), nn.ReLU(), nn.Linear(40, 10)), spec)


@pytest.mark.parametrize("rows", [64, 128])  # 64: effective weight; 128 with batch 8: effective_apply
def test_hot_path_never_reads_values_back(monkeypatch, rows):
    """On the 'meta' device every read of a value (item, bool, float) raises, like a sync would stall.

    The float32 conditioning estimate is the one documented, amortised read-back: it is
    replaced by a counter, which must run once per DEVICE_CHECK_EVERY solves of a circuit.
    """
    calls = []
    monkeypatch.setattr(circuit, "float32_error_estimate", lambda *a: calls.append(1) or 0.0)
    monkeypatch.setattr(circuit, "_device_checks", {})
    spec = CrossbarSpec(rows=rows, cols=rows, r_source=1e3, r_sink=1e3)
    model = _fcn(spec).to("meta")
    set_mode(model, "chip", CHIP)
    x = torch.rand(8, 300, device="meta")
    y = torch.randint(0, 10, (8,), device="meta")
    steps = circuit.DEVICE_CHECK_EVERY + 1
    for _ in range(steps):
        F.cross_entropy(model(x), y).backward()  # raises if anything reads a value back
    assert model[1].weight.grad.device.type == "meta"
    n_circuits = len(circuit._device_checks)
    assert n_circuits >= 2
    assert len(calls) == 2 * n_circuits   # calls 0 and DEVICE_CHECK_EVERY of each circuit


def test_sticky_float64_on_device(monkeypatch):
    """Once the estimate asks for float64 on an accelerator, that circuit stays in float64 unchecked."""
    calls = []
    monkeypatch.setattr(circuit, "float32_error_estimate", lambda *a: calls.append(1) or 1.0)
    monkeypatch.setattr(circuit, "_device_checks", {})
    G = torch.rand(2, 4, 4, device="meta")
    with pytest.warns(RuntimeWarning):
        assert circuit._float64_if_needed(G, 1e3, 1e3)
    assert all(circuit._float64_if_needed(G, 1e3, 1e3) for _ in range(5))
    assert len(calls) == 1


@pytest.mark.numerics
def test_chip_draws_on_device_equal_cpu_draws():
    """A chip's conductances on another device equal the CPU ones (same seed, same devices), and the
    static draws are cached there; read noise is drawn afresh per read."""
    _CACHE.clear()
    G = torch.rand(2, 3, 8, 8, dtype=torch.float64) * 4e-5 + 5e-6
    ref = CHIP.read(CHIP.devices(G, "fc1", 5e-6, 5e-5), "fc1", 0)
    on_meta = CHIP.read(CHIP.devices(G.to("meta"), "fc1", 5e-6, 5e-5), "fc1", 0)
    assert on_meta.device.type == "meta" and on_meta.shape == ref.shape
    # per device: d2d factors, stuck cells, drift exponents; not the read noise
    assert sorted(k[0][0] for k in _CACHE._items) == ["drift", "drift", "factors", "factors", "stuck", "stuck"]
    again = CHIP.read(CHIP.devices(G, "fc1", 5e-6, 5e-5), "fc1", 0)
    assert torch.equal(ref, again)  # cached draws give the same chip
    assert not torch.equal(ref, CHIP.read(CHIP.devices(G, "fc1", 5e-6, 5e-5), "fc1", 1))
    other = Chip(seed=2, c2c=0.1, d2d=0.1, time=100.0, device=CHIP.device)
    assert not torch.equal(ref, other.read(other.devices(G, "fc1", 5e-6, 5e-5), "fc1", 0))


def test_draw_cache_is_bounded():
    from xbarflow.crossbar.rng import _DrawCache

    cache = _DrawCache(max_bytes=1000)
    for i in range(10):
        cache.put(i, torch.zeros(50, dtype=torch.float64))  # 400 bytes each
    assert cache._bytes <= 1000 and set(cache._items) == {8, 9}
    cache.put("big", torch.zeros(200, dtype=torch.float64))  # larger than the cache: not kept
    assert cache.get("big") is None and cache.get(9) is not None


def _check_gpu(*args):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "check_gpu.py"), *args],
                          capture_output=True, text=True, env=env, timeout=1800)


def test_check_gpu_without_cuda_exits_0_with_one_line():
    """Also with Hydra, OmegaConf, Lightning, MLflow, torchmetrics and torchvision unimportable:
    a GPU node with nothing but PyTorch runs the script."""
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the script would run the full check")
    blocked = ["hydra", "omegaconf", "pytorch_lightning", "lightning", "mlflow", "torchmetrics", "torchvision"]
    code = (f"import sys, runpy\nfor m in {blocked!r}: sys.modules[m] = None\n"
            f"sys.argv = ['check_gpu.py']\nrunpy.run_path({os.path.join(ROOT, 'scripts', 'check_gpu.py')!r}, "
            "run_name='__main__')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, PYTHONPATH=ROOT))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1
    out = json.loads(lines[0])
    assert out["status"] == "skipped" and "no CUDA device" in out["message"]


@pytest.mark.numerics
def test_check_gpu_runs_every_check_on_cpu():
    """--device cpu: the float32 device results against the float64 CPU reference, TAT steps,
    the benchmarks' ratios (one quick rep) and no smoke run."""
    r = _check_gpu("--device", "cpu", "--quick", "--no-smoke")
    assert r.returncode == 0, r.stdout + r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["status"] == "passed", out
    assert out["device"] == "cpu"
    for k in ("nowire_max_rel_err_f32", "wire_max_rel_err_f32", "nowire_grad_rel_err_f32",
              "wire_grad_rel_err_f32"):
        assert 0.0 < out[k] < 1e-3, (k, out[k])  # float32 against float64: small, and not trivially 0
    assert out["tat_step_finite"] and out["tat_wire_step_finite"]
    assert out["step_ratio_xbar64"] > 1.0 and out["step_ratio_wire_xbar64"] > 1.0


def test_bench_compile_runs_eager_and_reports_ratios():
    """scripts/bench_compile.py on the CPU with no compile mode (the eager side only, 2 timed steps):
    one JSON line per layout and mode, the step ratios over the plain network's step."""
    r = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "bench_compile.py"), "--device", "cpu",
                        "--modes", "", "--reps", "2"], capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, PYTHONPATH=ROOT))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    for lay in ("xbar64", "784x500"):
        assert out[f"{lay}:eager:loss_rel_diff"] == 0.0 and out[f"{lay}:eager:step_ms"] > 0
        assert out[f"{lay}:eager:ratio"] > 1.0  # the exact circuit costs more than a plain step
