"""Mapping, tiling, chips and the crossbar layers."""
import pytest
import torch
import torch.nn as nn

from xbarflow.crossbar import Chip, CrossbarSpec, conductance_pair, effective_weight, from_tiles, to_tiles
from xbarflow.nn import XbarConv2d, XbarLinear, convert, set_mode, xbar_mode

pytestmark = pytest.mark.numerics


def test_conductance_pair_differential_and_in_range():
    W = torch.randn(20, 10, generator=torch.Generator().manual_seed(0))
    G_pos, G_neg, k = conductance_pair(W, 5e-6, 5e-5)
    # float32: the extreme weight lands on g_max up to one rounding step
    assert float(G_pos.min()) >= 5e-6 * (1 - 1e-6) and float(G_pos.max()) <= 5e-5 * (1 + 1e-6)
    assert torch.allclose((G_pos - G_neg) / k, W, atol=1e-6)
    G_pos, G_neg, k = conductance_pair(W, 5e-6, 5e-5, w_max=0.5)
    assert torch.allclose((G_pos - G_neg) / k, W.clamp(-0.5, 0.5), atol=1e-6)


def test_tiles_round_trip_and_padding():
    G = torch.arange(7 * 5, dtype=torch.float32).reshape(7, 5)
    tiles = to_tiles(G, 3, 2, pad_value=-1.0)
    assert tiles.shape == (3, 3, 3, 2)
    assert torch.equal(tiles[0, 1], G[0:3, 2:4])
    assert float(tiles[2, 2, 1, 1]) == -1.0  # padding cell
    assert torch.equal(from_tiles(tiles, 7, 5), G)


@pytest.mark.parametrize("mapping", ["separate", "interleaved"])
def test_tiled_ideal_layer_equals_linear(mapping):
    torch.manual_seed(0)
    lin = nn.Linear(784, 500)
    spec = CrossbarSpec(rows=64, cols=64, mapping=mapping)
    xl = convert(nn.Sequential(lin), spec)[0]
    x = torch.randn(32, 784)
    set_mode(xl, "nominal")  # the full crossbar path with R = 0
    assert torch.allclose(xl(x), lin(x), atol=1e-5, rtol=1e-5)


def test_tiles_use_their_own_circuits():
    """With parasitics a 784x500 layer on 64x64 tiles equals the per-tile circuits assembled by hand."""
    torch.manual_seed(0)
    W = torch.randn(100, 70, dtype=torch.float64)
    spec = CrossbarSpec(rows=64, cols=32, r_source=1e3, r_sink=1e3)
    W_eff = effective_weight(W, spec)
    from xbarflow.crossbar import transfer_matrix

    G_pos, G_neg, k = conductance_pair(W, spec.g_min, spec.g_max)
    pad = torch.nn.functional.pad
    G_pos = pad(G_pos, (0, 96 - 70, 0, 128 - 100), value=spec.g_min)
    G_neg = pad(G_neg, (0, 96 - 70, 0, 128 - 100), value=spec.g_min)
    ref = torch.zeros(128, 96, dtype=torch.float64)
    for i in range(2):
        for j in range(3):
            sl = (slice(64 * i, 64 * i + 64), slice(32 * j, 32 * j + 32))
            ref[sl] = (transfer_matrix(G_pos[sl], r_source=1e3, r_sink=1e3)
                       - transfer_matrix(G_neg[sl], r_source=1e3, r_sink=1e3)) / k
    assert torch.allclose(W_eff, ref[:100, :70], rtol=1e-10, atol=1e-12)


def _mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def _cnn():
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, stride=2, dilation=2, padding=2),
                         nn.ReLU(), nn.Flatten(), nn.Linear(6 * 4 * 4, 10))


@pytest.mark.parametrize("make", [_mlp, _cnn])
def test_convert_keeps_outputs_in_ideal_mode(make):
    torch.manual_seed(0)
    model = make()
    x = torch.randn(5, 1, 8, 8)
    spec = CrossbarSpec(rows=16, cols=16, r_source=1e3, r_sink=1e3)
    xmodel = convert(model, spec)
    n_xbar = sum(isinstance(m, (XbarLinear, XbarConv2d)) for m in xmodel.modules())
    assert n_xbar == sum(isinstance(m, (nn.Linear, nn.Conv2d)) for m in model.modules())
    assert torch.equal(xmodel(x), model(x))  # bitwise: ideal mode runs the same F.linear / F.conv2d on the same weights
    # with parasitics the output changes, and R = 0 brings it back (conv path included)
    with xbar_mode(xmodel, "nominal"):
        assert not torch.allclose(xmodel(x), model(x), atol=1e-3)
    ideal_spec_model = convert(model, CrossbarSpec(rows=16, cols=16))
    set_mode(ideal_spec_model, "nominal")
    assert torch.allclose(ideal_spec_model(x), model(x), atol=1e-5)


def test_chip_reproducible_and_seed_dependent():
    a = Chip(seed=3, c2c=0.1, d2d=0.2).conductance_factors("fc1", (2, 4, 64, 64))
    b = Chip(seed=3, c2c=0.1, d2d=0.2).conductance_factors("fc1", (2, 4, 64, 64))
    c = Chip(seed=4, c2c=0.1, d2d=0.2).conductance_factors("fc1", (2, 4, 64, 64))
    d = Chip(seed=3, c2c=0.1, d2d=0.2).conductance_factors("fc2", (2, 4, 64, 64))
    assert torch.equal(a, b)
    assert not torch.equal(a, c) and not torch.equal(a, d)
    # statistics: log factors ~ N(log g, d2d) around the chip's global factor
    logf = a.double().log()
    assert abs(float(logf.std()) - 0.2) < 0.01
    assert abs(float(logf.mean()) - torch.log(torch.tensor(Chip(3, 0.1, 0.2).global_factor())).item()) < 0.01


def test_chip_mode_changes_output_and_is_cached():
    torch.manual_seed(0)
    model = convert(_mlp(), CrossbarSpec(rows=32, cols=32, r_source=500.0, r_sink=500.0))
    x = torch.randn(4, 64)
    with torch.no_grad():
        set_mode(model, "chip", Chip(seed=1, c2c=0.05, d2d=0.1))
        y1 = model(x)
        layer = model[1]
        cached = layer._cache_weight
        assert torch.equal(model(x), y1) and layer._cache_weight is cached  # reused, not recomputed
        set_mode(model, "chip", Chip(seed=2, c2c=0.05, d2d=0.1))
        y2 = model(x)
        assert not torch.allclose(y2, y1)
        cached2 = layer._cache_weight
        model[1].weight.add_(0.01)  # a weight update invalidates the cache
        y3 = model(x)
        assert layer._cache_weight is not cached2 and not torch.allclose(y3, y2)


def test_training_gradient_flows_through_circuit():
    torch.manual_seed(0)
    # a fixed clipping range: the default w_max = max|W| is a (detached) scale, not differentiable
    spec = CrossbarSpec(rows=4, cols=3, r_source=1e3, r_sink=1e3, w_max=2.0, g_min=1e-4, g_max=1e-3)
    W = torch.randn(6, 5, dtype=torch.float64).requires_grad_(True)  # 2x2 tiles, padded
    assert torch.autograd.gradcheck(lambda w: effective_weight(w.t(), spec, Chip(1, 0.1, 0.1), "x"), (W,))
    model = convert(_mlp().double(), spec.replace(rows=16, cols=16))
    set_mode(model, "nominal")
    model(torch.randn(3, 64, dtype=torch.float64)).sum().backward()
    grad = model[1].weight.grad
    assert grad is not None and bool(torch.isfinite(grad).all()) and float(grad.abs().sum()) > 0


def test_spec_rejects_bad_values():
    with pytest.raises(ValueError, match="rows"):
        CrossbarSpec(rows=0)
    with pytest.raises(ValueError, match="r_source"):
        CrossbarSpec(r_source=-1.0)
    with pytest.raises(ValueError, match="g_max must be > g_min"):
        CrossbarSpec(g_min=1e-4, g_max=1e-5)
    with pytest.raises(ValueError, match="mapping"):
        CrossbarSpec(mapping="diagonal")


@pytest.mark.parametrize("mapping", ["separate", "interleaved"])
@pytest.mark.parametrize("chip", [None, Chip(seed=5, c2c=0.05, d2d=0.1)])
@torch.random.fork_rng()  # keep the global RNG stream of the other tests as it was
def test_fused_training_path_matches_effective_weight(mapping, chip):
    """XbarLinear's fused training forward (large tiles, small batch) equals x @ W_eff, gradients included."""
    from xbarflow.crossbar.effective import effective_apply, fused_is_cheaper

    torch.manual_seed(0)
    spec = CrossbarSpec(rows=160, cols=128, r_source=1e3, r_sink=1e3, mapping=mapping)
    layer = convert(nn.Sequential(nn.Linear(300, 150)), spec)[0].double()
    layer.set_mode("chip", chip) if chip is not None else layer.set_mode("nominal")
    x = torch.randn(5, 300, dtype=torch.float64, requires_grad=True)
    assert fused_is_cheaper(5, spec, 150)
    y = layer(x)  # fused path (2 x 2 tiles, padding on both sides)
    W = layer._weight_matrix()
    ref = x @ effective_weight(W, spec, chip, layer.xbar_name) + layer.bias
    assert torch.allclose(y, ref, rtol=1e-10, atol=1e-12)
    w = torch.randn_like(y)
    g1 = torch.autograd.grad((y * w).sum(), (x, layer.weight, layer.bias))
    g2 = torch.autograd.grad((ref * w).sum(), (x, layer.weight, layer.bias))
    for a, b in zip(g1, g2, strict=True):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)
    # exact gradient in x and W (fixed clipping range: max|W| is a detached scale)
    # (small tiles keep gradcheck quick: 3 x 2 tiles of 8 x 6, padded)
    small = CrossbarSpec(rows=8, cols=6, r_source=1e3, r_sink=1e3, mapping=mapping, w_max=0.5)
    xs = torch.randn(3, 20, dtype=torch.float64, requires_grad=True)
    Ws = (torch.rand(20, 5, dtype=torch.float64) - 0.5).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: effective_apply(a, b, small, chip, "l"), (xs, Ws))


@torch.random.fork_rng()  # keep the global RNG stream of the other tests as it was
def test_narrow_layer_on_wide_array_uses_few_columns_exactly():
    """A 50x6 layer on one 64x48 array (6 of 48 columns used) equals the explicit tile circuit."""
    from xbarflow.crossbar import transfer_matrix

    torch.manual_seed(1)
    W = torch.randn(50, 6, dtype=torch.float64)
    spec = CrossbarSpec(rows=64, cols=48, r_source=2e3, r_sink=500.0)
    G_pos, G_neg, k = conductance_pair(W, spec.g_min, spec.g_max)
    pad = torch.nn.functional.pad
    T = [transfer_matrix(pad(g, (0, 42, 0, 14), value=spec.g_min), r_source=2e3, r_sink=500.0) for g in (G_pos, G_neg)]
    ref = ((T[0] - T[1]) / k)[:50, :6]
    assert torch.allclose(effective_weight(W, spec), ref, rtol=1e-10, atol=1e-12)
    Wr = torch.randn(20, 3, dtype=torch.float64, requires_grad=True)
    small = CrossbarSpec(rows=24, cols=16, r_source=2e3, r_sink=500.0, w_max=3.0)  # 3 of 16 columns used
    assert torch.autograd.gradcheck(lambda w: effective_weight(w, small), (Wr,))


@pytest.mark.parametrize("mapping,levels,fan_out", [
    ("separate", None, 6), ("interleaved", None, 3), ("separate", 9, 6),  # one tile column, few used
    ("separate", None, 53), ("interleaved", 9, 26),                      # two tile columns, the last narrow
])
def test_narrow_layers_merged_columns_equal_the_whole_tiles(mapping, levels, fan_out):
    """The merged padded columns (programmed once, or sliced from the tiles) give the effective
    weight of the whole tiles' circuit (unmerged: every padded cell solved for), value and gradient."""
    from xbarflow.crossbar import transfer_matrix
    from xbarflow.crossbar.effective import device_conductances

    gen = torch.Generator().manual_seed(fan_out)
    W = torch.randn(50, fan_out, dtype=torch.float64, generator=gen).requires_grad_(True)
    spec = CrossbarSpec(rows=64, cols=48, r_source=2e3, r_sink=500.0, mapping=mapping, levels=levels, w_max=2.0)
    G, k = device_conductances(W, spec)  # the whole tiles, padded with g_min
    T = transfer_matrix(G, r_source=spec.r_source, r_sink=spec.r_sink)
    if mapping == "interleaved":
        full = from_tiles(T, 50, 2 * fan_out)
        ref = (full[..., 0::2] - full[..., 1::2]) / k
    else:
        ref = (from_tiles(T[0], 50, fan_out) - from_tiles(T[1], 50, fan_out)) / k
    W_eff = effective_weight(W, spec)
    assert torch.allclose(W_eff, ref, rtol=1e-10, atol=1e-12)
    probe = torch.randn(50, fan_out, dtype=torch.float64, generator=gen)
    (g_ref,) = torch.autograd.grad((ref * probe).sum(), W)
    (g,) = torch.autograd.grad((W_eff * probe).sum(), W)
    assert torch.allclose(g, g_ref, rtol=1e-9, atol=1e-12)


def test_column_gain_calibration_least_squares():
    """After calibration each column's crossbar output is the least-squares fit of the ideal one."""
    from xbarflow.nn import calibrate_column_gains, reset_column_gains

    torch.manual_seed(0)
    model = convert(_mlp(), CrossbarSpec(rows=64, cols=32, r_source=1e3, r_sink=1e3))
    x = torch.rand(256, 64)
    layer = model[1]
    with torch.no_grad():
        ideal = torch.nn.functional.linear(x, layer.weight)
        set_mode(model, "nominal")
        before = layer(x) - layer.bias
        calibrate_column_gains(model, x)
        after = layer(x) - layer.bias
    gain = layer.log_column_gain.exp()
    assert bool((gain > 1.5).all())  # the parasitics attenuate: the gains undo it
    err_before = ((before - ideal) ** 2).sum(0)
    err_after = ((after - ideal) ** 2).sum(0)
    assert bool((err_after <= err_before).all())
    # least squares: the residual is orthogonal to the fitted column
    assert float(((after - ideal) * after).sum(0).abs().max()) < 1e-3 * float((after * after).sum(0).max())
    set_mode(model, "ideal")
    assert torch.allclose(model(x), _mlp_like(model)(x))  # ideal mode ignores the gain
    reset_column_gains(model)
    assert float(layer.log_column_gain.detach().abs().max()) == 0.0


def _mlp_like(xmodel):
    plain = _mlp()
    from xbarflow.nn.layers import CROSSBAR_ONLY_PARAMS

    plain.load_state_dict({k: v for k, v in xmodel.state_dict().items() if not k.endswith(CROSSBAR_ONLY_PARAMS)})
    return plain


def test_effective_weight_equals_the_physical_read_out():
    """Voltages in, currents through both arrays, differential rescale out == x @ W_eff (section 3)."""
    from xbarflow.crossbar import solve
    from xbarflow.crossbar.mapping import input_voltages, output_from_currents

    torch.manual_seed(0)
    W = torch.randn(40, 30, dtype=torch.float64)
    x = torch.rand(7, 40, dtype=torch.float64) * 3.0
    spec = CrossbarSpec(rows=40, cols=30, r_source=800.0, r_sink=1200.0, v_read=0.25)
    G_pos, G_neg, k = conductance_pair(W, spec.g_min, spec.g_max)
    x_max = float(x.max())
    V = input_voltages(x, spec.v_read, x_max)
    I_pos = solve(G_pos, V, r_source=spec.r_source, r_sink=spec.r_sink)
    I_neg = solve(G_neg, V, r_source=spec.r_source, r_sink=spec.r_sink)
    y = output_from_currents(I_pos, I_neg, k, spec.v_read, x_max)
    assert torch.allclose(y, x @ effective_weight(W, spec), rtol=1e-10, atol=1e-12)
    assert float((y - x @ W).abs().max()) > 1e-2  # the parasitics do change the product


@pytest.mark.parametrize("w_max", [None, 0.5])
@pytest.mark.parametrize("fan_in,fan_out,rows,cols", [(10, 7, 4, 3), (8, 6, 8, 6), (5, 9, 16, 16)])
def test_tiled_conductance_pair_against_closed_form(w_max, fan_in, fan_out, rows, cols):
    """The fused mapping Function against its closed form, value and gradient, with weights at 0,
    on the clipping range and beyond it: G+- = g_min + k clip(+-W, 0, w_max), dG+/dW = k on
    0 < W <= w_max, dG-/dW = -k on -w_max <= W < 0, half of each at W = 0, 0 beyond."""
    from xbarflow.crossbar.mapping import tiled_conductance_pair

    g_min, g_max = 5e-6, 5e-5
    torch.manual_seed(fan_in + rows)
    W0 = torch.randn(fan_in, fan_out, dtype=torch.float64)
    W0[0, 0], W0[1, 1] = 0.0, 0.5  # a zero weight; a weight on w_max
    W0[2, 2] = W0.abs().max() * (1 if w_max is None else -1)  # a tie on max |W|, or clipped below -w_max
    n_r, n_c = -(-fan_in // rows), -(-fan_out // cols)
    cot = torch.randn(2, n_r, n_c, rows, cols, dtype=torch.float64)
    W = W0.clone().requires_grad_(True)
    G, k = tiled_conductance_pair(W, g_min, g_max, rows, cols, w_max)
    (G * cot).sum().backward()

    w_range = float(W0.abs().max()) if w_max is None else w_max
    k_ref = (g_max - g_min) / w_range
    pos_ref = g_min + k_ref * W0.clamp(0.0, w_range)
    neg_ref = g_min + k_ref * (-W0).clamp(0.0, w_range)
    G_ref = to_tiles(torch.stack((pos_ref, neg_ref)), rows, cols, pad_value=g_min)
    cot_pos, cot_neg = (from_tiles(c, fan_in, fan_out) for c in cot)
    on_pos = ((W0 > 0) & (W0 <= w_range)).double() + 0.5 * (W0 == 0)
    on_neg = ((W0 < 0) & (W0 >= -w_range)).double() + 0.5 * (W0 == 0)
    grad_ref = k_ref * (cot_pos * on_pos - cot_neg * on_neg)
    assert float(k) == pytest.approx(k_ref, rel=1e-15)
    assert torch.allclose(G, G_ref, rtol=1e-14, atol=0)
    assert torch.allclose(W.grad, grad_ref, rtol=1e-14, atol=0)
    if w_max is not None:
        assert float(W.grad[2, 2]) == 0.0  # clipped: no gradient
    # the untiled pair is the same Function on one tile
    G_pos, G_neg, _ = conductance_pair(W0, g_min, g_max, w_max)
    assert torch.allclose(torch.stack((G_pos, G_neg)), torch.stack((pos_ref, neg_ref)), rtol=1e-14, atol=0)
