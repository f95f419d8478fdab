"""BatchNorm on the chip (``eval.bn_recalibration``, model note section 11): the re-estimation
recovers a chip that scales a whole layer, restores the trained statistics, never reads the
test split, and composes with compensation."""
import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from xbarflow import evaluation
from xbarflow.crossbar.spec import CrossbarSpec
from xbarflow.crossbar.variation import Chip
from xbarflow.nn.batchnorm import batchnorm_layers, reestimate_batchnorm, saved_batchnorm_stats
from xbarflow.nn.convert import LayerSelection, convert, set_mode

pytestmark = pytest.mark.numerics

# no parasitics and no device spread: a chip's only effect is its chip-wide conductance factor,
# which scales the differential current (I+ - I-) and hence every output of the layer by it
SPEC = CrossbarSpec(rows=16, cols=16)


def toy(seed: int = 0) -> nn.Module:
    """Linear on a crossbar -> BatchNorm -> ReLU -> a digital classifier: the chip scales one whole layer."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(12, 20), nn.BatchNorm1d(20), nn.ReLU(), nn.Linear(20, 4))
    return convert(net, SPEC, layers=LayerSelection(include=["0"])).eval()


def images(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 12, generator=torch.Generator().manual_seed(seed))


def stats(model):
    return [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in batchnorm_layers(model)]


def test_chip_scaling_a_whole_layer_is_undone():
    model, x_cal, x = toy(), images(256, 1), images(64, 2)
    set_mode(model, "nominal")
    reestimate_batchnorm(model, [x_cal])  # the trained statistics are those of the nominal array
    nominal = model(x)
    chip = Chip(seed=3, c2c=0.5)
    factor = chip.global_factor()
    assert abs(factor - 1) > 0.2  # the chip scales the first layer's outputs noticeably
    set_mode(model, "chip", chip)
    with saved_batchnorm_stats(model):
        stale = model(x)
        reestimate_batchnorm(model, [x_cal])
        recovered = model(x)
    # BN(a z) with statistics of a z equals BN(z) with statistics of z, up to BatchNorm's eps
    # (1e-5 against unit-size variances) and float32 rounding of 12- and 20-term sums
    torch.testing.assert_close(recovered, nominal, rtol=1e-4, atol=1e-4)
    assert (stale - nominal).abs().max() > 1e-2  # without it the chip is off: the test can fail


def test_statistics_restored_and_flags_kept():
    model = toy()
    before = stats(model)
    momentum = [m.momentum for m in batchnorm_layers(model)]
    set_mode(model, "chip", Chip(seed=4, c2c=0.3, d2d=0.1))
    with saved_batchnorm_stats(model):
        reestimate_batchnorm(model, [images(100, 5), images(50, 6)])
        changed = stats(model)
    after = stats(model)
    assert not torch.equal(changed[0][0], before[0][0])
    for (m0, v0, c0), (m1, v1, c1) in zip(before, after, strict=True):
        # copies put back: bitwise by construction
        assert torch.equal(m0, m1) and torch.equal(v0, v1) and torch.equal(c0, c1)
    assert [m.momentum for m in batchnorm_layers(model)] == momentum
    assert not any(m.training for m in batchnorm_layers(model))


def test_crossbar_layers_keep_their_mode_and_weights():
    model = toy()
    chip = Chip(seed=4, c2c=0.3, d2d=0.1)
    set_mode(model, "chip", chip)
    weights = [p.detach().clone() for p in model.parameters()]
    with saved_batchnorm_stats(model):
        assert reestimate_batchnorm(model, [images(30, 7), images(20, 8)]) == 50
    assert model[0].mode == "chip" and model[0].chip is chip and not model[0].training
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters(), strict=True))


def _loader(x, y, batch_size=64):
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def _evaluate(model, test, bn_loader, **kw):
    return evaluation.evaluate(model, test, num_classes=4, n_chips=3, chip_seed=10,
                               make_chip=lambda s: Chip(seed=s, c2c=0.3, d2d=0.05),
                               bn_recalibration="chip", bn_loader=bn_loader, **kw)


def test_evaluate_never_reads_the_test_split(monkeypatch):
    """Test images full of NaN: a re-estimation that read one would leave NaN statistics."""
    model = toy()
    train = _loader(images(128, 9), torch.zeros(128, dtype=torch.long))
    test = _loader(torch.full((40, 12), float("nan")), torch.zeros(40, dtype=torch.long))
    seen = []
    real = evaluation.reestimate_batchnorm

    def spy(m, batches):
        n = real(m, batches)
        seen.append(all(bool(torch.isfinite(b.running_mean).all() and torch.isfinite(b.running_var).all())
                        for b in batchnorm_layers(m)))
        return n

    monkeypatch.setattr(evaluation, "reestimate_batchnorm", spy)
    before = stats(model)
    _evaluate(model, test, train)
    assert seen == [True] * 4  # the nominal crossbar and 3 chips, each on training images only
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(before, stats(model), strict=True))
    seen.clear()
    _evaluate(model, test, test)  # the trick detects a re-estimation on the test split
    assert seen == [False] * 4


def test_recalibration_recovers_accuracy_and_composes_with_compensation():
    """A network whose labels depend on the BatchNorm's centring: a scaled chip reads wrongly with
    the trained statistics and right after re-estimation, with or without compensation."""
    torch.manual_seed(0)
    model = toy()
    x = images(512, 11)
    set_mode(model, "nominal")
    reestimate_batchnorm(model, [x])
    set_mode(model, "ideal")
    with torch.no_grad():
        y = model(x).argmax(1)
    test = _loader(x[256:], y[256:])
    train = _loader(x[:256], y[:256])

    def run(recal, compensation="none"):
        return evaluation.evaluate(model, test, num_classes=4, n_chips=3, chip_seed=20,
                                   make_chip=lambda s: Chip(seed=s, c2c=1.0), bn_recalibration=recal,
                                   bn_loader=train, compensation=compensation, calibration_loader=train)[0]

    plain, recal = run("none"), run("chip")  # chip factors 0.49, 0.62, 1.64 (c2c = 1)
    both = run("chip", "global")
    assert recal["test/acc_xbar_mean"] > plain["test/acc_xbar_mean"] + 4  # measured 99.2 against 94.1
    # every chip reads like the nominal crossbar (also re-estimated): at most one of 256 images
    # apart, where float rounding breaks a near tie
    one_image = 100 / 256
    for metrics in (recal, both):
        assert metrics["test/acc_xbar_nominal"] - metrics["test/acc_xbar_min"] <= one_image
    assert recal["test/acc_software"] == plain["test/acc_software"]  # software keeps the trained statistics


def test_bad_option_and_missing_loader_are_refused():
    model, test = toy(), _loader(images(8, 1), torch.zeros(8, dtype=torch.long))
    with pytest.raises(ValueError, match="bn_recalibration must be one of none, chip"):
        evaluation.evaluate(model, test, num_classes=4, n_chips=1, chip_seed=0, make_chip=lambda s: None,
                            bn_recalibration="layer")
    with pytest.raises(ValueError, match="needs a bn_loader"):
        evaluation.evaluate(model, test, num_classes=4, n_chips=1, chip_seed=0, make_chip=lambda s: None,
                            bn_recalibration="chip")
