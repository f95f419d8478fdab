"""Noise-injection training (training=noise_aware) and per-chip compensation (eval.compensation)."""
import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import compose, run_cli
from torch.utils.data import DataLoader, Dataset, TensorDataset

from xbarflow.config import ConfigError, TrainingConfig, WeightNoiseConfig, validate
from xbarflow.crossbar import Chip, CrossbarSpec
from xbarflow.crossbar.rng import layer_generator
from xbarflow.evaluation import calibration_loader, evaluate
from xbarflow.nn import calibrate_global_gains, convert, set_mode, xbar_layers
from xbarflow.nn import compensation as comp_mod
from xbarflow.training import TRAIN_CHIP_SEED_BASE, CrossbarClassifier
from xbarflow.training.noise import forward_with_weight_noise, noisy_weights

# ---------------------------------------------------------------- noise_aware: one step's statistics

def _big_layer(w_max=None, n=1000):
    """A converted 1000 x 1000 linear layer (10^6 weights), none of them near 0."""
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(n, n, dtype=torch.float64)
    with torch.no_grad():
        sign = torch.where(torch.rand(n, n, generator=g) < 0.5, -1.0, 1.0).double()
        lin.weight.copy_(sign * (0.1 + 0.9 * torch.rand(n, n, generator=g, dtype=torch.float64)))
    return convert(nn.Sequential(lin), CrossbarSpec(rows=64, cols=64, w_max=w_max))


def _within_3_sigma(sample, mean, std):
    """Sample mean and std of ``sample`` against the configured ``mean`` and ``std``, each to 3 standard errors."""
    n = sample.numel()
    m, s = float(sample.mean()), float(sample.std())
    se_mean = s / math.sqrt(n)
    # standard error of a sample std (delta method): sqrt(Var[(x - mu)^2]) / (2 s sqrt(n))
    se_std = float(((sample - m) ** 2).std()) / (2 * s * math.sqrt(n))
    assert abs(m - mean) < 3 * se_mean, (m, mean, se_mean)
    assert abs(s - std) < 3 * se_std, (s, std, se_std)


@pytest.mark.numerics
@pytest.mark.parametrize("sigma", [0.05, 0.3])
def test_multiplicative_noise_statistics(sigma):
    model = _big_layer()
    W = model[0].weight.detach()
    noisy = noisy_weights(model, WeightNoiseConfig(mult_std=sigma), seed=11)["0.weight"].detach()
    rel = ((noisy - W) / W).flatten()
    # lognormal exp(sigma z) - 1
    mean = math.exp(sigma**2 / 2) - 1
    std = math.sqrt((math.exp(sigma**2) - 1) * math.exp(sigma**2))
    _within_3_sigma(rel, mean, std)


@pytest.mark.numerics
@pytest.mark.parametrize("w_max", [None, 0.5])
def test_additive_noise_statistics_relative_to_w_max(w_max):
    model = _big_layer(w_max=w_max)
    W = model[0].weight.detach()
    ref = float(W.abs().max()) if w_max is None else w_max
    noisy = noisy_weights(model, WeightNoiseConfig(add_std=0.1), seed=12)["0.weight"].detach()
    _within_3_sigma(((noisy - W) / ref).flatten(), 0.0, 0.1)


@pytest.mark.numerics
def test_drop_connect_fraction():
    model = _big_layer()
    noisy = noisy_weights(model, WeightNoiseConfig(pdrop=0.03), seed=13)["0.weight"].detach()
    dropped = float((noisy == 0).double().mean())
    n = noisy.numel()
    assert abs(dropped - 0.03) < 3 * math.sqrt(0.03 * 0.97 / n)


@pytest.mark.numerics
def test_no_noise_configured_is_the_identity_and_the_gradient_passes_straight_through():
    model = _big_layer(n=50)
    W = model[0].weight
    assert torch.equal(noisy_weights(model, WeightNoiseConfig(), seed=1)["0.weight"], W)
    # gradient of the stored weight = gradient at the noisy weight (aihwkit: noise added outside autograd)
    x = torch.randn(7, 50, dtype=torch.float64)
    noise = WeightNoiseConfig(mult_std=0.2, add_std=0.05)
    forward_with_weight_noise(model, x, noise, seed=3).square().sum().backward()
    Wn = noisy_weights(model, noise, seed=3)["0.weight"].detach().requires_grad_(True)
    F.linear(x, Wn, model[0].bias).square().sum().backward()
    assert torch.allclose(W.grad, Wn.grad, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(Wn, W)


# ---------------------------------------------------------------- noise_aware: in the Lightning module

@pytest.mark.numerics
def test_noise_aware_training_draws_fresh_noise_per_step_and_none_at_evaluation():
    import pytorch_lightning as pl

    torch.manual_seed(0)
    model = convert(nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3)), CrossbarSpec(rows=8, cols=8))
    W0 = model[0].weight.detach().clone()
    noise = WeightNoiseConfig(mult_std=0.1, add_std=0.05)
    # lr 0: the stored weights stay W0, so every difference seen in a step is the noise
    cfg = TrainingConfig(mode="noise_aware", optimizer="sgd", lr=0.0, momentum=0.0, scheduler="none",
                         epochs=1, noise=noise)
    module = CrossbarClassifier(model, cfg, num_classes=3, make_chip=lambda s: None, seed=7)
    seen = []   # (training?, weight the first layer multiplied by)
    model[0].register_forward_pre_hook(lambda layer, inp: seen.append((layer.training, layer.weight.detach().clone())))
    data = TensorDataset(torch.randn(64, 8), torch.randint(0, 3, (64,)))
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=1, num_sanity_val_steps=0,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu")
    trainer.fit(module, DataLoader(data, batch_size=16), DataLoader(data, batch_size=16))
    train_w = [w for training, w in seen if training]
    eval_w = [w for training, w in seen if not training]
    assert len(train_w) == 3 and len(eval_w) == 1
    for step, w in enumerate(train_w):
        expected = noisy_weights(model, noise, TRAIN_CHIP_SEED_BASE + 7 * 10**6 + step)["0.weight"]
        assert torch.equal(w, expected.detach())       # reproducible from the run seed and the step
        assert not torch.allclose(w, W0)
    assert not torch.allclose(train_w[0], train_w[1]) and not torch.allclose(train_w[1], train_w[2])
    assert torch.equal(eval_w[0], W0)                  # validation: the clean weights
    assert torch.equal(model[0].weight, W0)            # noise never written into the stored weights
    # evaluation: ideal arithmetic on the stored weights, exactly
    x = torch.randn(5, 8)
    ref = F.linear(torch.relu(F.linear(x, W0, model[0].bias)), model[2].weight, model[2].bias)
    metrics, _ = evaluate(model, DataLoader(TensorDataset(x, torch.zeros(5, dtype=torch.long)), batch_size=5),
                          num_classes=3, n_chips=1, chip_seed=0, make_chip=lambda s: None)
    set_mode(model, "ideal")
    assert torch.equal(model(x), ref)


def test_noise_config_is_range_checked():
    cfg = validate(compose(["training=noise_aware", "hardware=pcm"]))
    assert cfg.training.mode == "noise_aware" and cfg.training.noise.mult_std == cfg.hardware.d2d == 0.15
    for override, message in [("training.noise.add_std=-0.1", "training.noise.add_std must be >= 0.0"),
                              ("training.noise.pdrop=1.0", "training.noise.pdrop must be < 1.0"),
                              ("eval.compensation=columns", "eval.compensation must be one of none, global, column"),
                              ("eval.calibration_samples=0", "eval.calibration_samples must be >= 1")]:
        with pytest.raises(ConfigError) as info:
            validate(compose(["training=noise_aware", override]))
        assert message in str(info.value), info.value


# ---------------------------------------------------------------- compensation

def _net(seed=0, tile=8):
    """A float64 FCN 20-12-5 on 8 x 8 tiles with no parasitic resistance and 16 levels."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(20, 12), nn.ReLU(), nn.Linear(12, 5)).double()
    model = convert(net, CrossbarSpec(rows=tile, cols=tile, r_source=0.0, r_sink=0.0, levels=16))
    with torch.no_grad():   # trained gains are not 1: compensation works relative to them
        for layer in xbar_layers(model):
            layer.log_column_gain.uniform_(-0.2, 0.2)
    return model


def _outputs(model, mode, x, chip=None):
    set_mode(model, mode, chip)
    with torch.no_grad():
        return model(x)


@pytest.mark.numerics
def test_global_restores_the_nominal_outputs_on_a_chip_with_only_a_c2c_factor():
    model = _net()
    x_cal, x = torch.rand(32, 20, dtype=torch.float64), torch.rand(16, 20, dtype=torch.float64)
    nominal = _outputs(model, "nominal", x)
    chip = Chip(seed=3, c2c=0.4)
    assert abs(chip.global_factor() - 1) > 0.05
    before = _outputs(model, "chip", x, chip)
    assert not torch.allclose(before, nominal, rtol=1e-3)
    set_mode(model, "chip", chip)
    calibrate_global_gains(model, x_cal)
    after = _outputs(model, "chip", x, chip)
    assert torch.allclose(after, nominal, rtol=1e-12, atol=1e-12)
    # and on the nominal crossbar the factor is exactly 1
    model2 = _net()
    gains = [l.log_column_gain.detach().clone() for l in xbar_layers(model2)]
    set_mode(model2, "nominal")
    calibrate_global_gains(model2, x_cal)
    # bitwise: the nominal output is both reference and output, mean |y| / mean |y| = 1 exactly
    assert all(torch.equal(l.log_column_gain, g) for l, g in zip(xbar_layers(model2), gains, strict=True))


@dataclass(frozen=True)
class ColumnGainChip(Chip):
    """A chip whose every output column j has its own conductance factor c_j (e.g. a per-column sense gain)."""

    def devices(self, G, name, g_min, g_max):
        c = torch.exp(0.3 * torch.randn(G.shape[-1], generator=layer_generator(self.seed, name, "col"),
                                        dtype=torch.float64))
        return G * c.to(G.dtype)


@pytest.mark.numerics
def test_column_restores_the_nominal_outputs_on_a_chip_with_per_column_gains():
    model = _net()
    set_mode(model, "nominal")
    for layer in xbar_layers(model):
        layer.spec = CrossbarSpec(rows=8, cols=8, r_source=0.0, r_sink=0.0)   # continuous devices: nominal == software
    x_cal, x = torch.rand(32, 20, dtype=torch.float64), torch.rand(16, 20, dtype=torch.float64)
    software = _outputs(model, "ideal", x)
    chip = ColumnGainChip(seed=5)
    before = _outputs(model, "chip", x, chip)
    assert not torch.allclose(before, software, rtol=1e-2)
    # a single factor cannot undo per-column gains; the per-column fit does
    set_mode(model, "chip", chip)
    comp_mod.compensate(model, "column", x_cal)
    after = _outputs(model, "chip", x, chip)
    assert torch.allclose(after, software, rtol=1e-10, atol=1e-10)
    # the nominal crossbar, compensated the same way, gives the same outputs
    set_mode(model, "nominal")
    comp_mod.compensate(model, "column", x_cal)
    assert torch.allclose(after, _outputs(model, "nominal", x), rtol=1e-10, atol=1e-10)


class _Recording(Dataset):
    """A dataset that records every index read."""

    def __init__(self, x, y):
        self.x, self.y, self.reads = x, y, []

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        self.reads.append(int(i))
        return self.x[i], self.y[i]


def _eval(model, test, train, compensation, n_chips=2, chip_seed=100, chip=lambda s: Chip(seed=s, c2c=0.3, d2d=0.2)):
    return evaluate(model, DataLoader(test, batch_size=8), num_classes=5, n_chips=n_chips, chip_seed=chip_seed,
                    make_chip=chip, compensation=compensation,
                    calibration_loader=calibration_loader(train, 24, seed=3, batch_size=10))


@pytest.mark.numerics
@pytest.mark.parametrize("compensation", ["global", "column"])
def test_compensation_is_fitted_on_training_images_only(monkeypatch, compensation):
    model = _net()
    g = torch.Generator().manual_seed(1)
    train = _Recording(torch.rand(40, 20, generator=g, dtype=torch.float64), torch.randint(0, 5, (40,), generator=g))
    # NaN test images: any fit that touched one would give NaN gains
    test = _Recording(torch.full((16, 20), float("nan"), dtype=torch.float64), torch.zeros(16, dtype=torch.long))
    fitted = []
    real = comp_mod.compensate

    def recording(model_, how, x):
        real(model_, how, x)
        fitted.append((x.clone(), [l.log_column_gain.detach().clone() for l in xbar_layers(model_)]))

    monkeypatch.setattr("xbarflow.evaluation.compensate", recording)
    _eval(model, test, train, compensation)
    # nominal + 2 chips, each fitted on the same 24 training images (a seeded draw), with finite gains
    assert len(fitted) == 3
    pick = torch.randperm(40, generator=torch.Generator().manual_seed(3))[:24]
    for x, gains in fitted:
        assert torch.equal(x, train.x[pick])
        assert all(torch.isfinite(gn).all() for gn in gains)
    assert sorted(train.reads) == sorted(pick.tolist())
    # the test split is read only by the accuracy passes: as often as without compensation
    test_reads = sorted(test.reads)
    test.reads.clear()
    _eval(_net(), test, train, "none")
    assert test_reads == sorted(test.reads)


def test_compensation_needs_a_calibration_loader():
    with pytest.raises(ValueError, match="calibration_loader"):
        evaluate(_net(), DataLoader(TensorDataset(torch.rand(4, 20).double(), torch.zeros(4, dtype=torch.long))),
                 num_classes=5, n_chips=1, chip_seed=0, make_chip=lambda s: None, compensation="column")


@pytest.mark.numerics
@pytest.mark.parametrize("compensation", ["global", "column"])
def test_compensation_does_not_leak_into_the_next_chip(compensation):
    g = torch.Generator().manual_seed(2)
    train = TensorDataset(torch.rand(40, 20, generator=g, dtype=torch.float64), torch.randint(0, 5, (40,), generator=g))
    xt = torch.rand(64, 20, generator=g, dtype=torch.float64)
    model = _net()
    set_mode(model, "ideal")
    with torch.no_grad():   # labels = the software network's answers, so accuracies are informative
        test = TensorDataset(xt, model(xt).argmax(1))
    gains = [l.log_column_gain.detach().clone() for l in xbar_layers(model)]
    _, two = _eval(model, test, train, compensation, n_chips=2, chip_seed=100)
    assert all(torch.equal(l.log_column_gain, gn) for l, gn in zip(xbar_layers(model), gains, strict=True))
    _, second_alone = _eval(_net(), test, train, compensation, n_chips=1, chip_seed=101)
    assert two[1] == second_alone[0]
    _, uncompensated = _eval(_net(), test, train, "none", n_chips=2, chip_seed=100)
    assert two != uncompensated   # the compensation did change something


# ---------------------------------------------------------------- end to end

def test_noise_aware_with_column_compensation_end_to_end(workdir):
    from mlflow.tracking import MlflowClient

    proc = run_cli(["experiment=smoke", "training=noise_aware", "eval.compensation=column",
                    "logger.experiment_name=strategies_e2e"], cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("strategies_e2e").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["training"] == "noise_aware"
    p, m = run.data.params, run.data.metrics
    assert p["training.mode"] == "noise_aware" and p["eval.compensation"] == "column"
    assert p["training.noise.mult_std"] == "0.1" and p["training.noise.add_std"] == "0.1"   # rram: d2d 0.1
    for key in ["test/acc_software", "test/acc_xbar_nominal", "test/acc_xbar_mean", "test/acc_xbar_std",
                "test/acc_xbar_min", "train/loss", "val/acc"]:
        assert key in m, key
    assert m["test/acc_software"] > 20 and 0 <= m["test/acc_xbar_min"] <= m["test/acc_xbar_mean"] <= 100


def test_strategies_study_composes_the_grid():
    cfg = compose(["experiment=strategies"], return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    assert set(params["hardware"].split(",")) == {"rram", "pcm"}
    assert set(params["xbar.size"].split(",")) == {"64", "256"}
    assert set(params["training"].split(",")) == {"standard", "noise_aware", "tech_aware"}
    assert set(params["eval.compensation"].split(",")) == {"none", "column"}
    typed = validate(compose(["experiment=strategies", "hardware=pcm", "training=noise_aware"]))
    assert typed.nonideality.name == "full" and typed.eval.times == [86400.0, 31536000.0]
    assert typed.logger.experiment_name == "strategies"
