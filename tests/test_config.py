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
        ("model.hidden=[500,0]", "model.hidden[1] must be >= 1 (got 0)"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError) as info:
        validate(compose([override]))
    assert message in str(info.value)
    assert "\n" not in str(info.value)


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
