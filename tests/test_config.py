"""Every config option composes and validates; bad values stop with one line naming the key."""
import pytest
from conftest import CONF, compose, run_cli

from xbarflow.config import ConfigError, validate
from xbarflow.hardware import crossbar_spec

GROUPS = ["model", "dataset", "hardware", "xbar", "nonideality", "training", "trainer", "logger", "eval", "experiment"]
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONF / g).glob("*.yaml"))]


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes_and_validates(group, option):
    cfg = compose([f"{group}={option}"])
    typed = validate(cfg)
    crossbar_spec(typed)  # the core accepts what the schema accepts


def test_defaults():
    typed = validate(compose())
    assert typed.dataset.name == "mnist5k" and typed.training.mode == "tech_aware"
    assert typed.nonideality.name == "paper" and typed.eval.n_chips == 5
    spec = crossbar_spec(typed)
    assert spec.r_source == 1000.0 and spec.rows == spec.cols == 64


def test_nonideality_none_switches_off_the_circuit():
    spec = crossbar_spec(validate(compose(["nonideality=none"])))
    assert spec.is_ideal_circuit


@pytest.mark.parametrize(
    "override,message",
    [
        ("xbar.r_source=-5", "xbar.r_source must be >= 0.0 (got -5.0)"),
        ("xbar.r_sink=nan", "xbar.r_sink must be a finite number (got nan)"),
        ("xbar.r_wire=inf", "xbar.r_wire must be a finite number (got inf)"),
        ("xbar.size=0", "xbar.size must be >= 1 (got 0)"),
        ("xbar.v_read=0", "xbar.v_read must be > 0.0 (got 0.0)"),
        ("xbar.mapping=diagonal", "xbar.mapping must be one of separate, interleaved (got 'diagonal')"),
        ("hardware.c2c=-0.1", "hardware.c2c must be >= 0.0 (got -0.1)"),
        ("hardware.r_on=300e3", "hardware.r_off must be > hardware.r_on"),
        ("eval.n_chips=0", "eval.n_chips must be >= 1 (got 0)"),
        ("training.lr=0", "training.lr must be > 0.0 (got 0.0)"),
        # device technologies: probabilities in [0, 1], sigmas >= 0
        ("hardware.r_on=200e3", "hardware.r_off must be > hardware.r_on"),
        ("hardware.stuck_on=1.5", "hardware.stuck_on must be <= 1.0 (got 1.5)"),
        ("hardware.stuck_off=-0.01", "hardware.stuck_off must be >= 0.0 (got -0.01)"),
        ("hardware.d2d=-0.1", "hardware.d2d must be >= 0.0 (got -0.1)"),
        ("hardware.read_noise=-0.02", "hardware.read_noise must be >= 0.0 (got -0.02)"),
        ("hardware.drift_nu=-0.05", "hardware.drift_nu must be >= 0.0 (got -0.05)"),
        ("hardware.drift_nu_std=-0.01", "hardware.drift_nu_std must be >= 0.0 (got -0.01)"),
        ("hardware.drift_t0=0", "hardware.drift_t0 must be > 0.0 (got 0.0)"),
        ("hardware.levels=1", "hardware.levels must be >= 2 (got 1)"),
        ("xbar.adc_bits=0", "xbar.adc_bits must be >= 1 (got 0)"),
        ("xbar.dac_bits=0", "xbar.dac_bits must be >= 1 (got 0)"),
        ("xbar.adc_range=0", "xbar.adc_range must be > 0.0 (got 0.0)"),
        ("eval.times=[3600,0]", "eval.times[1] must be > 0.0 (got 0.0)"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError) as info:
        validate(compose([override]))
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_stuck_probabilities_must_sum_to_at_most_one():
    with pytest.raises(ConfigError) as info:
        validate(compose(["hardware.stuck_on=0.6", "hardware.stuck_off=0.5"]))
    assert "hardware.stuck_off must be <= 1 - hardware.stuck_on" in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("hw", ["rram", "pcm", "mram", "ideal"])
def test_every_device_file_gives_every_number(hw):
    import yaml

    keys = set(yaml.safe_load((CONF / "hardware" / f"{hw}.yaml").read_text()))
    assert {"r_on", "r_off", "levels", "c2c", "d2d", "read_noise", "drift_nu", "drift_nu_std", "drift_t0",
            "stuck_on", "stuck_off"} <= keys


def test_nonideality_presets():
    from xbarflow.hardware import device_model, has_variation

    paper = validate(compose(["nonideality=paper"]))
    assert not crossbar_spec(paper).has_peripherals and device_model(paper).is_ideal
    par = validate(compose(["nonideality=parasitics"]))
    assert not has_variation(par) and crossbar_spec(par).r_source == 1000.0 and crossbar_spec(par).levels is None
    var = validate(compose(["nonideality=variation", "hardware=pcm"]))
    assert crossbar_spec(var).is_ideal_circuit and crossbar_spec(var).levels == 8
    assert device_model(var).has_stuck and device_model(var).has_drift and device_model(var).has_read_noise
    full = validate(compose(["nonideality=full", "hardware=pcm"]))
    spec = crossbar_spec(full)
    assert spec.r_source == 1000.0 and spec.levels == 8 and spec.dac_bits == 8 and spec.adc_bits == 8
    assert not device_model(full).is_ideal


def test_unknown_key_is_rejected():
    with pytest.raises(Exception, match="nosuch"):
        compose(["xbar.nosuch=1"])


def test_bad_value_on_the_command_line_stops_before_any_work(workdir):
    proc = run_cli(["xbar.r_source=-5", "experiment=smoke"], cwd=workdir)
    assert proc.returncode != 0
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert lines == ["error: xbar.r_source must be >= 0.0 (got -5.0)"], proc.stderr
    assert not (workdir / "mlflow.db").exists()  # no run, not even a database


def test_unknown_option_lists_the_available_ones(workdir):
    proc = run_cli(["hardware=nosuch"], cwd=workdir)
    assert proc.returncode != 0
    assert "nosuch" in proc.stderr and "rram" in proc.stderr and "pcm" in proc.stderr
