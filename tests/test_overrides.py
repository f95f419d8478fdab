"""Every key of every config group can be set from the command line (the pre-check accepts it)."""
import json

import pytest
from conftest import CONF, compose, run_cli
from omegaconf import OmegaConf

from xbarflow.cli import check_composition, check_overrides
from xbarflow.config import GROUP_SCHEMAS, validate

# groups whose YAML files hold values of the schema (experiment files are global presets)
GROUPS = sorted(GROUP_SCHEMAS)


def _leaves(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict) and v:
            yield from _leaves(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def _text(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, list):
        return "[" + ",".join(_text(x) for x in v) + "]"
    return str(v)


def _changed(value):
    """A valid value that differs from ``value`` (when the type allows it)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value * 0.5
    return value


def _shipped_values():
    """``(option, key, value)``: every value of every key in every shipped YAML file of every schema
    group (with the file it comes from), plus a changed value of each key of the default option."""
    defaults = OmegaConf.to_container(OmegaConf.load(CONF / "config.yaml"))["defaults"]
    default_option = {k: v for d in defaults if isinstance(d, dict) for k, v in d.items()}
    cases = set()
    for group in GROUPS:
        for path in sorted((CONF / group).glob("*.yaml")):
            data = OmegaConf.to_container(OmegaConf.load(path))
            data.pop("defaults", None)
            for key, value in _leaves(data):
                cases.add((f"{group}={path.stem}", f"{group}.{key}", _text(value)))
                if path.stem == default_option[group]:
                    cases.add((f"{group}={path.stem}", f"{group}.{key}", _text(_changed(value))))
    return sorted(cases)


CASES = _shipped_values()


def test_the_cases_cover_every_schema_key_with_a_shipped_value():
    from dataclasses import fields

    keys = {key for _, key, _ in CASES}
    assert len(CASES) > 100
    for group, schema in GROUP_SCHEMAS.items():
        shipped = {f"{group}.{f.name}" for f in fields(schema)} & {k for k in keys if k.startswith(group + ".")}
        assert shipped, group
    # the device numbers that once were refused are among them
    assert {"hardware.r_on", "hardware.r_off", "hardware.c2c", "hardware.d2d", "hardware.name"} <= keys


@pytest.mark.parametrize("option,key,value", CASES, ids=[f"{o}:{k}={v}" for o, k, v in CASES])
def test_every_key_is_accepted_from_the_command_line(option, key, value):
    override = f"{key}={value}"
    assert check_overrides([override], CONF) is None, override
    assert check_overrides(["-m", f"{override},{override}"], CONF) is None, override
    typed = validate(compose([option, override]))
    if "${" in value:  # an interpolation: composed and resolved, nothing to compare with
        return
    got = typed
    for part in key.split("."):
        got = getattr(got, part)
    assert _text(got) == value or float(_text(got)) == float(value), (key, got, value)


def test_composition_check_accepts_device_numbers_and_sweeps():
    assert check_composition(["hardware.r_on=1.0e4"], CONF) is None
    assert check_composition(["-m", "experiment=smoke", "hardware.d2d=0.1,0.2"], CONF) is None
    assert check_composition(["-m", "xbar={size:16},{rows:784,cols:500}", "training=standard,tech_aware"], CONF) is None


def test_single_run_with_a_device_number(workdir):
    proc = run_cli(["experiment=smoke", "dataset=digits", "hardware.r_on=1.0e4"], cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-2000:]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("xbarflow").experiment_id])
    assert run.data.params["hardware.r_on"] == "10000.0"
    assert float(run.data.params["xbar_memory_gb"]) > 0


def test_sweep_over_a_device_number_runs_end_to_end(workdir):
    proc = run_cli(["-m", "experiment=smoke", "dataset=digits", "hardware.d2d=0.05,0.2"], cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("xbarflow").experiment_id])
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert sorted(r.data.params["hardware.d2d"] for r in children) == ["0.05", "0.2"]
    assert all(r.info.status == "FINISHED" and "test/acc_xbar_mean" in r.data.metrics for r in children)
    # the sweep table names the swept device number
    assert "hardware.d2d" in proc.stdout[proc.stdout.index("Sweep summary"):]
    json.dumps([r.data.metrics for r in children])  # metrics are plain numbers
