"""Device and peripheral effects: statistics or exact results, reproducibility, STE gradients."""
import math

import pytest
import torch
from conftest import compose

from xbarflow.config import validate
from xbarflow.crossbar import Chip, CrossbarSpec, DeviceModel, device_conductances, effective_weight
from xbarflow.crossbar.devices import apply_read_noise, apply_stuck, drift_factors, quantize_levels
from xbarflow.crossbar.effective import adc_apply
from xbarflow.crossbar.peripherals import adc_quantize, dac_quantize, input_scale
from xbarflow.hardware import crossbar_spec, make_chip
from xbarflow.nn import convert, set_mode

pytestmark = pytest.mark.numerics

G_MIN, G_MAX = 1 / 200e3, 1 / 20e3
SHAPE = (2, 4, 4, 64, 64)  # 131,072 devices


def _G(seed=0, shape=SHAPE):
    g = torch.Generator().manual_seed(seed)
    return G_MIN + (G_MAX - G_MIN) * torch.rand(shape, generator=g, dtype=torch.float64)


# ----------------------------------------------------------------- levels
def test_levels_are_exactly_the_configured_ones():
    q = quantize_levels(_G(), 5, G_MIN, G_MAX)
    grid = G_MIN + torch.arange(5, dtype=torch.float64) * (G_MAX - G_MIN) / 4
    assert torch.allclose(torch.unique(q), grid, rtol=0, atol=1e-18)
    # nearest level: the error is at most half a step
    assert float((q - _G()).abs().max()) <= (G_MAX - G_MIN) / 8 + 1e-18


def test_levels_in_the_layer_pipeline_and_ste_gradient():
    spec = CrossbarSpec(rows=16, cols=16, g_min=G_MIN, g_max=G_MAX, levels=4)
    W = torch.randn(40, 20, dtype=torch.float64, requires_grad=True)
    G, k = device_conductances(W, spec)
    assert len(torch.unique(G)) <= 4
    W_eff = effective_weight(W, spec)  # ideal circuit: T = G, so W_eff takes 7 values (differences of levels)
    assert len(torch.unique(W_eff.detach())) <= 7
    W_eff.pow(2).sum().backward()
    assert torch.isfinite(W.grad).all() and W.grad.abs().sum() > 0


# ----------------------------------------------------------------- stuck cells
@pytest.mark.parametrize("p_on,p_off", [(0.01, 0.05), (0.1, 0.0), (0.0, 0.2)])
def test_stuck_fractions_within_three_sigma(p_on, p_off):
    dev = DeviceModel(stuck_on=p_on, stuck_off=p_off)
    G = _G().clamp(G_MIN * 1.01, G_MAX * 0.99)   # no programmed device sits exactly at an extreme
    # pooled over 4 chips (524,288 devices)
    S = torch.stack([apply_stuck(G, dev, seed=s, name="fc1", g_min=G_MIN, g_max=G_MAX) for s in range(4)])
    n = S.numel()
    for p, frac in ((p_on, float((S == G_MAX).double().mean())), (p_off, float((S == G_MIN).double().mean()))):
        assert abs(frac - p) <= 3 * math.sqrt(p * (1 - p) / n) + 1e-12, (p, frac)
    # the others keep their programmed value
    free = (S != G_MAX) & (S != G_MIN)
    assert torch.equal(S[free], G.expand_as(S)[free])


def test_stuck_same_seed_same_cells():
    dev = DeviceModel(stuck_on=0.05, stuck_off=0.05)
    a = apply_stuck(_G(), dev, 3, "fc1", G_MIN, G_MAX)
    assert torch.equal(a, apply_stuck(_G(), dev, 3, "fc1", G_MIN, G_MAX))
    assert not torch.equal(a, apply_stuck(_G(), dev, 4, "fc1", G_MIN, G_MAX))
    assert not torch.equal(a, apply_stuck(_G(), dev, 3, "fc2", G_MIN, G_MAX))


def _stuck_reference(W, k, on, off, w_max):
    """Pair by pair, in plain Python: the differential weight a chip holds after program-and-verify
    with pair compensation. ``on`` / ``off``: (2, fan_in, fan_out) masks of the G+ (0) and G- (1)
    devices. A stuck device holds its value; its partner moves by the stuck device's error, within
    [G_MIN, G_MAX]; a pair with both stuck keeps both."""
    out = torch.empty_like(W)
    for i in range(W.shape[0]):
        for j in range(W.shape[1]):
            w = max(-w_max, min(w_max, float(W[i, j])))
            target = [G_MIN + k * max(w, 0.0), G_MIN + k * max(-w, 0.0)]
            stuck = [G_MAX if on[d, i, j] else G_MIN if off[d, i, j] else None for d in (0, 1)]
            g = list(target)
            for d in (0, 1):
                if stuck[d] is not None and stuck[1 - d] is None:
                    g[1 - d] = min(G_MAX, max(G_MIN, target[1 - d] + stuck[d] - target[d]))
            for d in (0, 1):
                if stuck[d] is not None:
                    g[d] = stuck[d]
            out[i, j] = (g[0] - g[1]) / k
    return out


@pytest.mark.parametrize("mapping", ["separate", "interleaved"])
def test_stuck_compensation_keeps_each_pairs_difference(mapping):
    """Against a pair-by-pair reference on an ideal circuit (T = G): a stuck-at-on device that
    carries the weight is fully compensated by its partner; the chip without compensation loses
    more."""
    w_max = 2.0
    spec = CrossbarSpec(rows=64, cols=64, g_min=G_MIN, g_max=G_MAX, mapping=mapping, w_max=w_max,
                        stuck_compensation=True)
    chip = Chip(seed=7, device=DeviceModel(stuck_on=0.1, stuck_off=0.1))
    g = torch.Generator().manual_seed(1)
    W = torch.randn(40, 20, generator=g, dtype=torch.float64)
    k = (G_MAX - G_MIN) / w_max
    # the chip's stuck cells, from apply_stuck on a layout of midpoints (no compensation code)
    shape = (2, 1, 1, 64, 64) if mapping == "separate" else (1, 1, 64, 64)
    marks = apply_stuck(torch.full(shape, (G_MIN + G_MAX) / 2, dtype=torch.float64), chip.device, chip.seed,
                        "fc", G_MIN, G_MAX)
    if mapping == "separate":
        marks = marks[:, 0, 0, :40, :20]
    else:
        marks = torch.stack((marks[0, 0, :40, 0:40:2], marks[0, 0, :40, 1:40:2]))
    on, off = marks == G_MAX, marks == G_MIN
    ref = _stuck_reference(W, k, on, off, w_max)
    got = effective_weight(W, spec, chip, name="fc")
    # float64, a handful of additions of conductances ~1e-5 S over k ~2e-5 S/unit: rounding ~1e-15
    assert torch.allclose(got, ref, rtol=0, atol=1e-12)
    carrier_on = torch.where(W > 0, on[0] & ~on[1] & ~off[1], on[1] & ~on[0] & ~off[0])
    assert int(carrier_on.sum()) > 10
    assert torch.allclose(got[carrier_on], W.clamp(-w_max, w_max)[carrier_on], rtol=0, atol=1e-12)
    # stuck-at-on on the idle side: both devices at G_MAX, the weight reads 0 (error |w|, not ~w_max)
    idle_on = torch.where(W > 0, on[1] & ~on[0] & ~off[0], on[0] & ~on[1] & ~off[1])
    assert int(idle_on.sum()) > 10 and torch.equal(got[idle_on], torch.zeros_like(got[idle_on]))
    plain = effective_weight(W, spec.replace(stuck_compensation=False), chip, name="fc")
    err_plain = (plain - W.clamp(-w_max, w_max)).abs().mean()
    err_comp = (got - W.clamp(-w_max, w_max)).abs().mean()
    assert err_comp < 0.5 * err_plain, (float(err_comp), float(err_plain))


def test_stuck_compensation_gradient_and_noop_without_stuck_cells():
    spec = CrossbarSpec(rows=8, cols=8, g_min=G_MIN, g_max=G_MAX, r_source=1e3, r_sink=1e3, w_max=3.0,
                        stuck_compensation=True)
    chip = Chip(seed=2, d2d=0.1, device=DeviceModel(stuck_on=0.2, stuck_off=0.2))
    g = torch.Generator().manual_seed(0)
    W = (torch.rand(10, 5, generator=g, dtype=torch.float64) + 0.2) * torch.sign(torch.randn(10, 5, generator=g,
                                                                                              dtype=torch.float64))
    W.requires_grad_(True)
    # the partner's target is linear in the pair's targets (away from the clip): gradient exact
    assert torch.autograd.gradcheck(lambda w: effective_weight(w, spec, chip, name="fc"), (W,), atol=1e-6)
    # compensation changes nothing on a chip without stuck cells, or without a chip
    clean = Chip(seed=2, d2d=0.1)
    assert torch.equal(effective_weight(W, spec, clean, name="fc"),
                       effective_weight(W, spec.replace(stuck_compensation=False), clean, name="fc"))
    with pytest.raises(ValueError, match="stuck_compensation must be true or false"):
        spec.replace(stuck_compensation="yes")


# ----------------------------------------------------------------- read noise
def test_read_noise_statistics_and_fresh_per_read():
    dev = DeviceModel(read_noise=0.05)
    G = _G()
    r0 = apply_read_noise(G, dev, 1, "fc1", read=0)
    rel = r0 / G - 1
    n = G.numel()
    assert abs(float(rel.std()) - 0.05) < 3 * 0.05 / math.sqrt(2 * n) * 3
    assert abs(float(rel.mean())) < 3 * 0.05 / math.sqrt(n)
    assert torch.equal(r0, apply_read_noise(G, dev, 1, "fc1", read=0))     # same chip, same read: same
    assert not torch.equal(r0, apply_read_noise(G, dev, 1, "fc1", read=1))  # next read: fresh draw


def test_read_noise_in_layer_fresh_per_batch_and_reproducible_per_chip():
    torch.manual_seed(0)
    model = convert(torch.nn.Sequential(torch.nn.Linear(32, 8)), CrossbarSpec(rows=16, cols=16))
    chip = Chip(seed=5, device=DeviceModel(read_noise=0.05))
    x = torch.randn(4, 32)
    with torch.no_grad():
        set_mode(model, "chip", chip)
        y1, y2 = model(x), model(x)
        assert not torch.equal(y1, y2)        # every batch is a new read
        set_mode(model, "chip", chip)         # the chip again: reads numbered from 0
        assert torch.equal(model(x), y1) and torch.equal(model(x), y2)


# ----------------------------------------------------------------- drift
def test_drift_identity_at_t0_and_power_law():
    dev = DeviceModel(drift_nu=0.05, drift_nu_std=0.0, drift_t0=1.0)
    assert drift_factors(dev, 1.0, SHAPE, 1, "fc1", torch.float64, None) is None
    assert drift_factors(dev, None, SHAPE, 1, "fc1", torch.float64, None) is None
    f = drift_factors(dev, 1e4, SHAPE, 1, "fc1", torch.float64, None)
    assert math.isclose(float(f), 1e4 ** -0.05, rel_tol=1e-12)
    chip = Chip(seed=1, device=dev)
    G = _G()
    assert torch.equal(chip.devices(G, "fc1", G_MIN, G_MAX), G)                 # t0: identity
    assert torch.allclose(chip.at(1e4).devices(G, "fc1", G_MIN, G_MAX), G * 1e4 ** -0.05)


def test_drift_exponent_spread_statistics_and_reproducible():
    dev = DeviceModel(drift_nu=0.06, drift_nu_std=0.02, drift_t0=1.0)
    t = 1e6
    f = drift_factors(dev, t, SHAPE, 2, "fc1", torch.float64, None)
    nu = -f.log() / math.log(t)
    n = f.numel()
    assert abs(float(nu.mean()) - 0.06) < 3 * 0.02 / math.sqrt(n)
    assert abs(float(nu.std()) - 0.02) < 0.001
    assert torch.equal(f, drift_factors(dev, t, SHAPE, 2, "fc1", torch.float64, None))
    assert not torch.equal(f, drift_factors(dev, t, SHAPE, 3, "fc1", torch.float64, None))


# ----------------------------------------------------------------- DAC
def test_dac_values_and_one_bit():
    x = torch.rand(50, 30, dtype=torch.float64)
    x_max = input_scale(x, None, 1)
    q = dac_quantize(x, 3, x_max)
    steps = q / x_max * 7
    assert torch.allclose(steps, steps.round(), atol=1e-9)          # 2**3 values per sample, 0 and x_max included
    assert float((q - x).abs().max()) <= float(x_max.max()) / 14 + 1e-12
    q1 = dac_quantize(x, 1, x_max)
    assert set(torch.unique(q1 / x_max).tolist()) <= {0.0, 1.0}     # binary inputs
    xr = x.clone().requires_grad_(True)
    dac_quantize(xr, 2, x_max).sum().backward()
    assert torch.equal(xr.grad, torch.ones_like(x))                  # STE


# ----------------------------------------------------------------- ADC
def test_one_bit_adc_gives_two_values_and_ste():
    y = torch.randn(100, 7, dtype=torch.float64, requires_grad=True)
    q = adc_quantize(y, 1, torch.tensor(2.0, dtype=torch.float64))
    assert set(torch.unique(q.detach()).tolist()) == {-1.0, 1.0}
    q.sum().backward()
    assert torch.isfinite(y.grad).all() and torch.equal(y.grad, torch.ones_like(y))
    q4 = adc_quantize(y.detach(), 4, torch.tensor(2.0, dtype=torch.float64))
    assert len(torch.unique(q4)) <= 16 and float(q4.abs().max()) <= 2.0


def test_adc_quantises_each_tile_before_the_sum():
    torch.manual_seed(0)
    spec = CrossbarSpec(rows=16, cols=16, adc_bits=1, adc_range=1.0)
    W = torch.randn(40, 5, dtype=torch.float64)          # 3 tile rows (16 + 16 + 8 padded)
    x = torch.rand(6, 40, dtype=torch.float64)
    W_eff = effective_weight(W, spec)
    w_range = W.abs().max()
    x_max = input_scale(x, None, 1)
    y = adc_apply(x, W_eff, spec, w_range, x_max)
    # a 1-bit ADC per tile row: each partial is +-full_scale/2, so the sum of 3 takes 4 values
    half = (spec.adc_range * spec.rows * w_range * x_max / 2)
    k = (y / half + 3) / 2                                 # number of positive partials, 0..3
    assert torch.allclose(k, k.round(), atol=1e-9) and set(k.round().unique().tolist()) <= {0.0, 1.0, 2.0, 3.0}
    # with many bits the ADC path equals the plain product
    fine = spec.replace(adc_bits=24)
    step = float(2 * fine.rows * w_range * x_max.max()) / 2**24
    assert torch.allclose(adc_apply(x, W_eff, fine, w_range, x_max), x @ W_eff, rtol=0, atol=3 * step)


@pytest.mark.parametrize("conv", [False, True])
def test_peripheral_layers_forward_and_ste_gradients(conv):
    torch.manual_seed(0)
    spec = CrossbarSpec(rows=16, cols=16, r_source=1e3, r_sink=1e3, levels=8, dac_bits=4, adc_bits=6, adc_range=0.3)
    if conv:
        m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(8 * 6 * 6, 4))
        x = torch.rand(5, 3, 6, 6)
    else:
        m = torch.nn.Sequential(torch.nn.Linear(40, 24), torch.nn.ReLU(), torch.nn.Linear(24, 4))
        x = torch.rand(5, 40)
    xm = convert(m, spec)
    chip = Chip(seed=3, c2c=0.05, d2d=0.1, device=DeviceModel(stuck_on=0.01, stuck_off=0.01, read_noise=0.02,
                                                               drift_nu=0.05, drift_nu_std=0.01)).at(1e4)
    set_mode(xm, "chip", chip)
    y = xm(x)
    assert y.shape == (5, 4) and torch.isfinite(y).all()
    y.pow(2).sum().backward()
    for p in xm.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    # the same chip reproduces the same outputs (reads renumbered by set_mode)
    with torch.no_grad():
        set_mode(xm, "chip", chip)
        a = xm(x)
        set_mode(xm, "chip", chip)
        assert torch.equal(xm(x), a)
    # the conv ADC path matches the unquantised conv when the ADC is fine enough
    if conv:
        fine = convert(m, spec.replace(levels=None, dac_bits=None, adc_bits=24, adc_range=1.0))
        plain = convert(m, spec.replace(levels=None, dac_bits=None, adc_bits=None))
        set_mode(fine, "nominal"), set_mode(plain, "nominal")
        with torch.no_grad():
            assert torch.allclose(fine(x), plain(x), rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------- combined, from the config
def test_full_preset_chip_reproducible_and_nominal_deterministic():
    typed = validate(compose(["nonideality=full", "hardware=pcm", "xbar.size=32"]))
    spec = crossbar_spec(typed)
    assert spec.levels == 8 and spec.adc_bits == 8 and spec.dac_bits == 8
    W = torch.randn(70, 20, dtype=torch.float64)
    a = effective_weight(W, spec, make_chip(typed, 11).at(86400.0), "fc1", read=2)
    b = effective_weight(W, spec, make_chip(typed, 11).at(86400.0), "fc1", read=2)
    c = effective_weight(W, spec, make_chip(typed, 12).at(86400.0), "fc1", read=2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    # training chips are read at a seeded random age within [t0, max(eval.times)]
    t1, t2 = make_chip(typed, 5, train=True).time, make_chip(typed, 5, train=True).time
    assert t1 == t2 and 1.0 <= t1 <= max(typed.eval.times)
    # paper keeps its meaning: no device effects beyond c2c/d2d, no peripherals
    paper = validate(compose(["nonideality=paper"]))
    ps = crossbar_spec(paper)
    assert ps.levels is None and not ps.has_peripherals and make_chip(paper, 1).device.is_ideal


def test_narrow_tiles_refused_for_a_chip():
    """Cutting arrays narrower than built (the nominal narrow-layer path) never applies a chip's devices."""
    spec = CrossbarSpec(rows=16, cols=16, r_source=1e3, r_sink=1e3)
    W = torch.randn(40, 3, dtype=torch.float64)
    chip = Chip(seed=1, c2c=0.1, d2d=0.1)
    with pytest.raises(ValueError, match="cols=None"):
        device_conductances(W, spec, chip, "fc1", cols=4)
    G, _ = device_conductances(W, spec, None, "fc1", cols=4)  # nominal: the used columns and one padded
    assert G.shape == (2, 3, 1, 16, 4) and bool((G[..., 3] == spec.g_min).all())
    assert device_conductances(W, spec, chip, "fc1", cols=16)[0].shape == (2, 3, 1, 16, 16)


def test_no_effect_path_unchanged():
    torch.manual_seed(0)
    spec = CrossbarSpec(rows=16, cols=16, r_source=1e3, r_sink=1e3)
    W = torch.randn(40, 20, dtype=torch.float64)
    chip = Chip(seed=1, c2c=0.1, d2d=0.1)
    G, k = device_conductances(W, spec, chip, "fc1")
    from xbarflow.crossbar import physical_arrays
    G0, _ = physical_arrays(W, spec)
    assert torch.equal(G, chip.apply(G0, "fc1"))  # bitwise: the same operations on the same arrays
