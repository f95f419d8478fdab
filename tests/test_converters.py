"""Converter ranges: calibrated (a percentile of the array's outputs), learned (LSQ gradient), data used."""
import math

import pytest
import torch
from torch.utils.data import TensorDataset

from xbarflow.crossbar import CrossbarSpec, effective_weight
from xbarflow.crossbar.peripherals import adc_quantize
from xbarflow.nn import calibrate_converters, convert, set_mode

pytestmark = pytest.mark.numerics

SPEC = CrossbarSpec(rows=16, cols=16, r_source=1e3, r_sink=1e3, adc_bits=8, adc_range_mode="calibrated",
                    adc_percentile=90.0)
EPS32 = torch.finfo(torch.float32).eps  # 1.19e-7


def _partial_rounding(spec) -> float:
    """How far a tile row's partial output, as a fraction of the tile's largest current, may move
    when a matmul of another shape forms it (another kernel blocking: whether the last bit agrees
    depends on the CPU). It is a float32 sum of ``spec.rows`` products whose magnitudes add up to
    about that full scale at most (1.1 of it with g_max / g_min = 10): ~rows * eps, doubled."""
    return 2 * spec.rows * EPS32


def _layer(spec, fan_in=40, fan_out=24, seed=0):
    torch.manual_seed(seed)
    return convert(torch.nn.Sequential(torch.nn.Linear(fan_in, fan_out)), spec)


def _coverage(model, x, spec, slack=0.0):
    """Fraction of |tile outputs| within each converter's range (widened by ``slack``, fraction units),
    computed from the circuit directly."""
    layer = model[0]
    W = layer.weight.detach().t()
    W_eff = effective_weight(W, spec)                            # nominal array
    x_max = x.abs().amax(-1, keepdim=True)                       # per-sample DAC scale
    full = spec.rows * W.abs().max() * x_max                     # a tile's largest current, output units
    n_r = math.ceil(W.shape[0] / spec.rows)
    xp = torch.nn.functional.pad(x, (0, n_r * spec.rows - W.shape[0]))
    Wp = torch.nn.functional.pad(W_eff, (0, 0, 0, n_r * spec.rows - W.shape[0]))
    rng = layer.log_adc_range.exp().detach()
    out = []
    for r in range(n_r):
        frac = (xp[:, r * spec.rows:(r + 1) * spec.rows] @ Wp[r * spec.rows:(r + 1) * spec.rows] / full).abs()
        if spec.adc_granularity == "column":
            out.append((frac <= rng[r] + slack).double().mean(0))
        else:
            for t in range(rng.shape[1]):
                out.append((frac[:, t * spec.cols:(t + 1) * spec.cols] <= rng[r, t] + slack).double().mean().reshape(1))
    return torch.cat(out)


def _assert_covers_the_90th_percentile(model, x, spec, values):
    """90 % of the calibration outputs lie inside each range, up to the quantile's interpolation (2 of
    the ``values`` outputs of a group). The outputs here come from products of other shapes than
    calibration's: one within float32 rounding of a range may fall on either side of it, so the
    coverage calibration saw lies between the counts with the range narrowed and widened by that."""
    slack = _partial_rounding(spec)
    widened, narrowed = _coverage(model, x, spec, slack), _coverage(model, x, spec, -slack)
    assert (widened >= 0.90 - 1e-9).all(), widened
    assert (narrowed <= 0.90 + 2.0 / values + 1e-9).all(), narrowed


@pytest.mark.parametrize("granularity", ["tile", "column"])
def test_calibrated_range_covers_the_percentile(granularity):
    spec = SPEC.replace(adc_granularity=granularity)
    model = _layer(spec)
    x = torch.rand(400, 40)
    assert calibrate_converters(model, x)
    assert model[0].log_adc_range.shape == ((3, 2) if granularity == "tile" else (3, 24))
    values = 400 * (16 if granularity == "tile" else 1)
    _assert_covers_the_90th_percentile(model, x, spec, values)
    # the ranges are far below the fixed full scale's fraction (1.0 here): that is the point
    assert float(model[0].log_adc_range.exp().max()) < 0.2


def test_calibrated_dac_scale_is_the_input_percentile():
    spec = CrossbarSpec(rows=16, cols=16, dac_bits=6, dac_range_mode="calibrated", dac_percentile=99.0)
    model = _layer(spec)
    x = torch.rand(300, 40) * 3.0
    calibrate_converters(model, x)
    expected = torch.quantile(x.abs().flatten(), 0.99)
    assert torch.allclose(model[0].dac_scale, expected, rtol=1e-5)


def test_calibration_runs_on_the_nominal_array_whatever_the_mode():
    from xbarflow.crossbar import Chip

    model = _layer(SPEC)
    x = torch.rand(200, 40)
    set_mode(model, "chip", Chip(seed=1, c2c=0.3, d2d=0.3))
    calibrate_converters(model, x)
    a = model[0].log_adc_range.clone()
    set_mode(model, "ideal")
    calibrate_converters(model, x)
    # bitwise: both calibrations run the same products on the same nominal array and inputs
    assert torch.equal(a, model[0].log_adc_range) and model[0].mode == "ideal"


def test_lsq_gradient_of_the_range():
    """dq/dr = (q - y) / r inside the range, q / r = +-(1 - 1/n) where the converter saturates."""
    r = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0.3, -1.1, 1.99, 2.5, -7.0], dtype=torch.float64, requires_grad=True)
    q = adc_quantize(y, 3, r)
    grads = [torch.autograd.grad(q[i], (y, r), retain_graph=True) for i in range(5)]
    n = 8
    for i, (gy, gr) in enumerate(grads):
        inside = abs(float(y[i].detach())) < 2.0
        assert float(gy[i]) == (1.0 if inside else 0.0)
        qi, yi = float(q[i].detach()), float(y[i].detach())
        expected = (qi - yi) / 2.0 if inside else math.copysign(1 - 1 / n, yi)
        assert abs(float(gr) - expected) < 1e-12, (i, float(gr), expected)
    # a fixed range keeps the straight-through gradient (identity, also beyond the range)
    y2 = y.detach().requires_grad_(True)
    adc_quantize(y2, 3, torch.tensor(2.0, dtype=torch.float64)).sum().backward()
    assert torch.equal(y2.grad, torch.ones_like(y2))


@pytest.mark.parametrize("start", [0.002, 1.0])
def test_learned_range_moves_to_reduce_the_conversion_error(start):
    """A 4-bit ADC that clips almost everything (0.002) or rounds almost everything to one code
    (1.0): training only the range against the unconverted output lowers the error."""
    spec = SPEC.replace(adc_bits=4, adc_range=start, adc_range_mode="learned")
    model = _layer(spec)
    layer = model[0]
    set_mode(model, "nominal")
    x = torch.rand(256, 40)
    with torch.no_grad():
        reference = torch.nn.functional.linear(x, effective_weight(layer.weight.t(), spec).t(), layer.bias)
    opt = torch.optim.Adam([layer.log_adc_range], lr=0.05)

    def loss():
        return torch.nn.functional.mse_loss(model(x), reference)

    with torch.no_grad():
        before = float(loss())
    for _ in range(150):
        opt.zero_grad()
        value = loss()
        value.backward()
        assert layer.log_adc_range.grad is not None and layer.log_adc_range.grad.abs().sum() > 0
        opt.step()
    with torch.no_grad():
        after = float(loss())
    assert after < 0.3 * before, (before, after)
    moved = layer.log_adc_range.exp().detach()
    assert (moved > start).all() if start < 0.01 else (moved < start).all()


def test_calibration_never_reads_the_test_split():
    """The pipeline's calibration reads the training split only: NaN test images change nothing,
    NaN training images poison every range."""
    from conftest import compose
    from omegaconf import OmegaConf

    from xbarflow.config import validate
    from xbarflow.data import DataSplits
    from xbarflow.pipeline import build_crossbar_model, calibrate_periphery

    typed = validate(compose(["dataset=digits", "nonideality=full", "training=standard", "xbar.size=32",
                              "xbar.calibration_samples=64"]))
    x = torch.rand(300, 1, 8, 8)
    y = torch.randint(0, 10, (300,))
    nan = torch.full_like(x, float("nan"))
    clean = DataSplits(TensorDataset(x, y), TensorDataset(x, y), TensorDataset(nan, y), (1, 8, 8), 10)
    model = build_crossbar_model(typed, clean)
    calibrate_periphery(typed, model, clean, "cpu")
    for layer in (m for m in model.modules() if hasattr(m, "log_adc_range")):
        assert torch.isfinite(layer.log_adc_range).all() and (layer.log_adc_range < math.log(0.25)).all()
    poisoned = DataSplits(TensorDataset(nan, y), TensorDataset(x, y), TensorDataset(x, y), (1, 8, 8), 10)
    model = build_crossbar_model(typed, poisoned)
    calibrate_periphery(typed, model, poisoned, "cpu")
    first = next(m for m in model.modules() if hasattr(m, "log_adc_range"))
    assert not torch.isfinite(first.log_adc_range).any()
    assert OmegaConf is not None


def test_auto_mode_resolves_by_training_mode():
    from conftest import compose

    from xbarflow.config import validate
    from xbarflow.hardware import crossbar_spec

    def mode(*over):
        return crossbar_spec(validate(compose(["nonideality=full", *over]))).adc_range_mode

    assert mode("training=tech_aware") == "learned" and mode("training=standard") == "calibrated"
    assert mode("training=standard", "xbar.adc_range_mode=learned") == "calibrated"
    assert mode("training=standard", "xbar.adc_range_mode=fixed") == "fixed"


def _assert_equal_but_for_a_few_codes(actual, expected, lsb, n_r, bits, max_fraction=0.01):
    """``actual`` equals ``expected`` to the float32 rounding of a digital sum over ``n_r`` tile rows
    of converted values (each at most ``2**(bits-1)`` LSB ``lsb``, per sample), except on at most
    ``max_fraction`` of the elements, which may be up to 2 LSB off.

    A partial output formed by a matmul of another shape may differ in its last bit and so cross
    a code boundary: one code of one tile row. A code flipped in the conv of the test below moves
    one input of its linear layer by a conv LSB, which moves the linear layer's partial outputs by
    less than one of its own LSB: again at most one code of the tile row that reads that input."""
    diff = (actual - expected).detach().abs()
    rounding = EPS32 * (n_r * n_r * 2 ** (bits - 1) * lsb + 2 * expected.abs())
    off = diff > rounding
    fraction, worst = float(off.double().mean()), float((diff / lsb).detach().max())
    assert fraction <= max_fraction, f"{int(off.sum())} of {off.numel()} outputs differ, up to {worst:.3g} LSB"
    assert bool((diff <= 2 * lsb + rounding).all()), f"up to {worst:.3g} LSB off"


@pytest.mark.parametrize("granularity", ["tile", "column"])
def test_evaluation_in_chunks_equals_one_pass_and_its_gradient_path(monkeypatch, granularity):
    """Without a gradient the ADC path converts its reads in chunks (memory bounded by
    ADC_CHUNK_PARTIALS): a conv and a linear layer give the same output as in one pass (but for
    a code where a partial output's rounding crosses a code boundary), the chip's devices read
    once per forward (the same effective weight for every chunk)."""
    import torch.nn as nn

    from xbarflow.crossbar import Chip
    from xbarflow.crossbar import effective as eff

    torch.manual_seed(0)
    spec = CrossbarSpec(rows=16, cols=16, r_source=1e3, r_sink=1e3, adc_bits=6, dac_bits=6, adc_range_mode="fixed",
                        adc_granularity=granularity)
    model = convert(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 20)), spec)
    set_mode(model, "chip", Chip(seed=3, c2c=0.1, d2d=0.1))
    x = torch.rand(37, 3, 6, 6)
    with torch.no_grad():
        whole = model(x)  # 37 images: 1332 reads of the conv, well below the default chunk
        linear_in = model[:3](x)  # the linear layer's input in that pass (the same products again)
    reads_seen = []
    apply = eff._adc_apply
    monkeypatch.setattr(eff, "_adc_apply", lambda x2, *a: reads_seen.append(x2.shape[0]) or apply(x2, *a))
    monkeypatch.setattr(eff, "ADC_CHUNK_PARTIALS", 500)
    with torch.no_grad():
        chunked = model(x)
    # conv (27 inputs): 500 // (2 tile rows x 8 outputs) = 31 reads, less than an image (36):
    # one image per chunk, converted 31 + 5; linear: 500 // (18 tile rows x 20 outputs) = 1 read
    assert reads_seen == [31, 5] * 37 + [1] * 37
    # chunks of other sizes take other matmul blockings: a partial output may differ in its last
    # bit and cross an ADC code boundary, so a few outputs may be a code off
    linear = model[3]
    x_max = linear_in.abs().amax(-1, keepdim=True)  # the linear layer's DAC scale per image
    lsb = 2 * spec.adc_range * spec.rows * linear.weight_range() * x_max / 2 ** spec.adc_bits
    _assert_equal_but_for_a_few_codes(chunked, whole, lsb * linear.log_column_gain.exp(),
                                      n_r=-(-linear.in_features // spec.rows), bits=spec.adc_bits)
    reads_seen.clear()
    y = model(x)  # with a gradient: one pass per layer, the same output
    # bitwise: the same products on the same reads as the one pass, and the same conversion
    assert reads_seen == [37 * 36, 37] and torch.equal(y.detach(), whole)


def test_lsq_range_gradient_with_a_per_sample_scale_is_the_product_rule():
    """The range ``r = full_scale * scale`` (scale per sample, no gradient): the gradient that
    the LSQ Function forms for ``full_scale`` directly (summed over the samples, then one
    division) equals autograd's product rule through a full-size ``r``; the fixed-range (STE)
    path gives the same output values."""
    torch.manual_seed(0)
    y = (torch.randn(3, 7, 5, dtype=torch.float64) * 0.5).requires_grad_()
    frac = (torch.rand(3, 1, 5, dtype=torch.float64) * 0.5 + 0.1).requires_grad_()
    scale = torch.rand(7, 1, dtype=torch.float64) + 0.5
    grad = torch.randn(3, 7, 5, dtype=torch.float64)
    for bits in (1, 3, 8):
        q = adc_quantize(y, bits, frac, scale)
        gy, gf = torch.autograd.grad(q, (y, frac), grad)
        q_ref = adc_quantize(y, bits, frac * scale)  # r full-size, its gradient through autograd's mul
        gy_ref, gf_ref = torch.autograd.grad(q_ref, (y, frac), grad)
        assert torch.equal(q, q_ref) and torch.equal(gy, gy_ref)
        assert torch.allclose(gf, gf_ref, rtol=1e-12, atol=0), (bits, (gf - gf_ref).abs().max())
        assert torch.equal(adc_quantize(y, bits, frac.detach(), scale), q)  # STE: same values
        some_saturate = (y.detach().abs() > frac.detach() * scale).any()
        assert some_saturate  # the clipping branch of the gradient is exercised


@pytest.mark.parametrize("granularity,mapping,min_columns,chunks", [
    # 40 outputs on 16-column tiles: 3 tiles, the last one half used (8 outputs)
    ("tile", "separate", 1, {1: [16, 16, 8], 2: [32, 8], 3: [40]}),
    ("tile", "separate", 32, {1: [32, 8]}),  # at least 32 outputs a product: two tiles
    ("tile", "interleaved", 1, {2: [16, 16, 8], 5: [40]}),  # 8 outputs a tile: 5 tiles, all whole
    ("column", "separate", 1, {7: [7] * 5 + [5], 40: [40]}),
    ("column", "separate", 32, {1: [32, 8]}),
])
def test_calibration_in_chunks_of_adc_groups_equals_one_pass(monkeypatch, granularity, mapping, min_columns, chunks):
    """The ranges' percentiles go through in chunks of whole ADC groups (memory bounded by
    ADC_CHUNK_PARTIALS, at least MIN_CALIBRATION_COLUMNS outputs a product): the same ranges as
    with every partial output at once (to float32 rounding of the partial outputs), and they
    still cover the percentile against the circuit computed directly."""
    from xbarflow.crossbar import effective as eff
    from xbarflow.nn import calibration

    spec = SPEC.replace(adc_granularity=granularity, mapping=mapping)
    x = torch.rand(400, 40)
    one_pass = _layer(spec, fan_out=40)
    calibrate_converters(one_pass, x)
    per_group = 1 if granularity == "column" else spec.cols // (2 if mapping == "interleaved" else 1)
    tile_partials = eff.tile_partials
    monkeypatch.setattr(calibration, "MIN_CALIBRATION_COLUMNS", min_columns)
    for groups, widths in chunks.items():
        seen: list = []
        monkeypatch.setattr(eff, "ADC_CHUNK_PARTIALS", groups * 3 * 400 * per_group)  # 3 tile rows, 400 reads
        monkeypatch.setattr(eff, "tile_partials", lambda x2, W, rows, seen=seen: seen.append(W.shape[1])
                            or tile_partials(x2, W, rows))
        model = _layer(spec, fan_out=40)
        calibrate_converters(model, x)
        # the pre-hook's calls, then the layer's own forward (its reads in chunks, every output)
        assert seen[:len(widths)] == widths and set(seen[len(widths):]) == {40}, seen
        if widths == [40]:  # one chunk: the one pass's own product, bitwise
            assert torch.equal(model[0].log_adc_range, one_pass[0].log_adc_range), groups
        else:
            # narrower products take other matmul blockings: the partial outputs, and so their
            # percentiles (sorted values, interpolated), agree to the partials' float32 rounding
            torch.testing.assert_close(model[0].log_adc_range.exp(), one_pass[0].log_adc_range.exp(),
                                       rtol=4 * EPS32, atol=_partial_rounding(spec),
                                       msg=lambda m, groups=groups: f"{groups} groups a chunk: {m}")
    if mapping == "separate":
        _assert_covers_the_90th_percentile(one_pass, x, spec, 400 * 8 if granularity == "tile" else 400)
