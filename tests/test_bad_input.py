"""Bad values for every resistance, voltage and sigma: one line naming the key, non-zero exit, no run."""
import pytest
from conftest import compose, run_cli

from xbarflow.config import ConfigError, validate

# key -> values that must be rejected (zero is allowed for resistances and sigmas: the ideal limit)
BAD = {
    "xbar.r_source": ["-1", "nan", "inf", "-inf"],
    "xbar.r_sink": ["-1", "nan", "inf"],
    "xbar.r_wire": ["-0.5", "nan", "inf"],
    "xbar.v_read": ["0", "-0.2", "nan", "inf"],
    "hardware.r_on": ["0", "-1", "nan", "inf"],
    "hardware.r_off": ["0", "-1", "nan", "inf"],
    "hardware.c2c": ["-0.1", "nan", "inf"],
    "hardware.d2d": ["-0.1", "nan", "inf"],
    "xbar.size": ["0", "-64"],
    "xbar.rows": ["0"],
    "xbar.cols": ["0"],
}
# issue 25: huge (or tiny) values that overflowed float32 in the physics core, or Lightning's seed range
# (a traceback, exit 1), and meaningless ones next to them (the bounds are explained in xbarflow/config.py)
HUGE = {
    "hardware.c2c": ["1e9", "3.01"],                 # lognormal sigmas: <= 3.0
    "hardware.d2d": ["1e9", "3.01"],
    "training.noise.mult_std": ["1e9", "3.01"],
    "xbar.r_source": ["1e300", "1.1e12"],            # resistances: <= 1e12 ohm
    "xbar.r_sink": ["1e300"],
    "xbar.r_wire": ["1e300"],
    "hardware.r_on": ["1e-300", "0.5"],              # device resistances: >= 1 ohm
    "hardware.r_off": ["1e300"],
    "xbar.w_max": ["1e300", "1e30"],                 # <= 1e6
    "xbar.adc_range": ["1e300", "2"],                # <= 1 (the largest current of a tile)
    "xbar.dac_range": ["1e-300", "1e300"],           # 1e-6 .. 1e6 input units
    "seed": ["10000000000000", "-1"],                # NumPy's seed range
    "dataset.split_seed": ["100000000000000000000"],
}
CASES = [(k, v) for k, vs in (*BAD.items(), *HUGE.items()) for v in vs]


@pytest.mark.parametrize("key,value", CASES, ids=[f"{k}={v}" for k, v in CASES])
def test_rejected_with_key_named(key, value):
    with pytest.raises(ConfigError) as info:
        validate(compose([f"{key}={value}"]))
    msg = str(info.value)
    assert "\n" not in msg and key in msg, msg


@pytest.mark.parametrize("key", ["xbar.r_source", "xbar.r_sink", "xbar.r_wire", "hardware.c2c", "hardware.d2d"])
def test_zero_is_the_ideal_limit_and_allowed(key):
    validate(compose([f"{key}=0"]))


def test_bounds_name_the_key_and_the_limit_which_is_allowed():
    with pytest.raises(ConfigError, match=r"^hardware\.c2c must be <= 3\.0 \(got 1000000000\.0\)$"):
        validate(compose(["hardware.c2c=1e9"]))
    with pytest.raises(ConfigError, match=r"^xbar\.r_source must be <= 1e\+12 \(got 1e\+300\)$"):
        validate(compose(["xbar.r_source=1e300"]))
    for at_the_bounds in (["hardware.c2c=3.0", "hardware.d2d=3.0", "training.noise.mult_std=3.0"],
                          ["hardware.r_on=1", "hardware.r_off=1e12", "xbar.r_source=1e12", "xbar.r_sink=1e12",
                           "xbar.r_wire=1e12"],
                          ["xbar.w_max=1e6", "xbar.adc_range=1.0", "xbar.dac_range=1e-6"],
                          ["xbar.dac_range=1e6", "seed=4294967295", "dataset.split_seed=4294967295"]):
        validate(compose(at_the_bounds))


@pytest.mark.parametrize("override", ["xbar.r_sink=nan", "xbar.v_read=0", "hardware.d2d=inf", "xbar.size=0"])
def test_command_line_rejects_before_any_run(workdir, override):
    proc = run_cli([override, "experiment=smoke"], cwd=workdir)
    assert proc.returncode == 2
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and override.split("=")[0] in lines[0], proc.stderr
    assert not (workdir / "mlflow.db").exists()


def test_bad_job_in_a_sweep_is_rejected_and_reported(workdir):
    proc = run_cli(["-m", "experiment=smoke", "dataset=digits", "xbar.r_source=1000,-5"], cwd=workdir)
    assert proc.returncode != 0
    assert "error: xbar.r_source must be >= 0.0 (got -5.0)" in proc.stderr
    table = proc.stdout[proc.stdout.index("Sweep summary"):]
    assert "| 0 | FINISHED | 1000 |" in table and "| 1 | REJECTED | -5 |" in table
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("xbarflow").experiment_id])
    assert not any(r.info.status == "RUNNING" for r in runs)


CONF = __import__("pathlib").Path(__file__).resolve().parents[1] / "conf"


@pytest.mark.parametrize("args,named", [
    (["hardware=foo"], "allowed: ideal, mram, pcm, rram"),
    (["xbar.sizee=5"], "no such key (keys of xbar: size,"),
    (["xbar.size=abc"], "could not be converted to Integer"),
    (["-m", "xbar.size=64,abc"], "could not be converted to Integer"),
    (["xbar={sizee:16}"], "Key 'sizee' not in 'XbarConfig'"),
])
def test_structural_override_errors_are_one_line(args, named):
    from xbarflow.cli import check_overrides

    error = check_overrides(args, CONF)
    assert error and error.startswith("error: ") and "\n" not in error and named in error, error


@pytest.mark.parametrize("args", [
    ["hardware=rram", "experiment=smoke", "hydra/launcher=parallel"],
    ["-m", "xbar={size:16},{rows:784,cols:500}", "training=standard,tech_aware"],
    ["+extra=1", "~seed", "xbar.r_wire=range(0,10,2)", "model.hidden=[10,20]", "hydra.run.dir=x"],
    ["-m", "xbar.r_source=1000,-5"],  # a range error: validate() rejects that job only
    ["-cd", "/elsewhere", "hardware=taox"],  # another search path: left to Hydra
    ["experiment=null", "xbar.rows=null", "xbar.r_source=1e3"],
])
def test_valid_or_unreadable_overrides_pass(args):
    from xbarflow.cli import check_overrides

    assert check_overrides(args, CONF) is None


@pytest.mark.parametrize("args", [["hardware=foo", "experiment=smoke"], ["-m", "experiment=smoke", "xbar.sizee=1,2"]])
def test_command_line_structural_error_exits_before_any_run(workdir, args):
    proc = run_cli(args, cwd=workdir)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert not (workdir / "mlflow.db").exists() and not (workdir / "multirun").exists()


# ---------------------------------------------------------------- issue 11: inputs that once gave tracebacks
def _one_line_exit_2(proc, *needles):
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _no_run_left(workdir):
    assert not (workdir / "mlflow.db").exists() and not (workdir / "multirun").exists()


def test_array_too_large_for_memory_is_refused_with_the_estimate(workdir):
    proc = run_cli(["experiment=smoke", "xbar.size=100000"], cwd=workdir)
    line = _one_line_exit_2(proc, "layer '1'", "784x500 weights", "100000x100000 tiles", "GB")
    assert "more than the" in line
    _no_run_left(workdir)


def test_array_too_large_in_a_sweep_rejects_that_job_only(workdir):
    proc = run_cli(["-m", "experiment=smoke", "dataset=digits", "xbar.size=32,100000"], cwd=workdir)
    assert proc.returncode != 0
    table = proc.stdout[proc.stdout.index("Sweep summary"):]
    assert "| 0 | FINISHED | 32 |" in table and "| 1 | REJECTED | 100000 |" in table
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("xbarflow").experiment_id])
    assert not any(r.info.status == "RUNNING" for r in runs)


def test_memory_limit_is_configurable_and_warns_near_it(workdir):
    # digits FCN 64-500-10 on 64x64 tiles, technology-aware: 32 tiles, ~0.0034 GB, and the training
    # step's activations at batch 128, ~0.0015 GB: 0.0055 GB warns, 0.001 refuses
    proc = run_cli(["experiment=smoke", "dataset=digits", "trainer.memory_limit_gb=0.001"], cwd=workdir)
    _one_line_exit_2(proc, "trainer.memory_limit_gb", "activations at training.batch_size")
    proc = run_cli(["experiment=smoke", "dataset=digits", "trainer.memory_limit_gb=0.0055"], cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "warning: the crossbar simulation needs about" in proc.stderr


def test_adc_partial_outputs_too_large_name_their_batch_and_a_smaller_one_runs(workdir):
    # the paper CNN with column ADCs on 64x64 tiles: 147,536 partial outputs per image (n_r times
    # each layer's output); calibrating the converters on 512 images needs ~0.67 GB (its percentiles
    # go in chunks, but each layer's im2col view of the batch is whole), the arrays 0.09
    cnn_adc = ["experiment=smoke", "dataset=digits", "model=cnn", "nonideality.adc=true", "xbar.adc_range_mode=calibrated",
               "trainer.memory_limit_gb=0.5"]
    proc = run_cli(cnn_adc, cwd=workdir)
    line = _one_line_exit_2(proc, "xbar.calibration_samples:", "to calibrate the converters",
                            "ADC partial outputs at xbar.calibration_samples", "lower xbar.calibration_samples")
    assert line.startswith("error: xbar.calibration_samples:")
    _no_run_left(workdir)
    # smaller batches in every phase fit (~0.19 GB, a training step) and the run goes through, without a warning
    proc = run_cli([*cnn_adc, "xbar.calibration_samples=64", "eval.batch_size=100", "training.batch_size=32"],
                   cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "the crossbar simulation needs" not in proc.stderr


def test_init_from_a_missing_file(workdir):
    proc = run_cli(["experiment=smoke", f"training.init_from={workdir / 'nope.pt'}"], cwd=workdir)
    _one_line_exit_2(proc, "training.init_from=", "nope.pt", "no such file")
    _no_run_left(workdir)


def test_init_from_a_file_that_is_not_a_checkpoint(workdir):
    bad = workdir / "notes.txt"
    bad.write_text("these are not weights\n")
    proc = run_cli(["experiment=smoke", f"training.init_from={bad}"], cwd=workdir)
    _one_line_exit_2(proc, "training.init_from=", "notes.txt", "not a PyTorch checkpoint")
    _no_run_left(workdir)


def test_init_from_weights_of_another_model(workdir):
    import torch

    bad = workdir / "other.pt"
    torch.save({"0.weight": torch.zeros(3, 3)}, bad)
    proc = run_cli(["experiment=smoke", "dataset=digits", f"training.init_from={bad}"], cwd=workdir)
    _one_line_exit_2(proc, "training.init_from=", "does not fit the model")
    _no_run_left(workdir)


def test_init_from_good_weights_and_a_lightning_checkpoint(workdir):
    """The success paths: an earlier run's weights.pt and its Lightning checkpoint both load."""
    first = run_cli(["experiment=smoke", "dataset=digits", f"hydra.run.dir={workdir / 'first'}"], cwd=workdir)
    assert first.returncode == 0, first.stderr[-2000:]
    import torch
    from safetensors.torch import save_file

    # the form a logged model (and a study's committed network) keeps its weights in
    logged = workdir / "weights.safetensors"
    save_file(torch.load(workdir / "first" / "weights.pt", weights_only=True), str(logged))
    for path in (workdir / "first" / "weights.pt", workdir / "first" / "checkpoints" / "last.ckpt", logged):
        proc = run_cli(["experiment=smoke", "dataset=digits", f"training.init_from={path}"], cwd=workdir)
        assert proc.returncode == 0, proc.stderr[-2000:]


def test_init_from_safetensors_loads_every_tensor(tmp_path):
    """``training.init_from`` with a ``.safetensors`` file: the model holds the file's values afterwards."""
    import torch
    from safetensors.torch import save_file

    from xbarflow.crossbar import CrossbarSpec
    from xbarflow.nn import convert
    from xbarflow.pipeline import load_initial_weights

    model = convert(torch.nn.Sequential(torch.nn.Linear(6, 3)), CrossbarSpec(rows=4, cols=4))
    state = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    save_file(state, str(tmp_path / "w.safetensors"))
    load_initial_weights(model, "w.safetensors", str(tmp_path))  # relative to the run's start folder
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_init_from_a_broken_safetensors_file(workdir):
    bad = workdir / "weights.safetensors"
    bad.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{not json")
    proc = run_cli(["experiment=smoke", f"training.init_from={bad}"], cwd=workdir)
    _one_line_exit_2(proc, "training.init_from=", "weights.safetensors", "not a safetensors file")
    _no_run_left(workdir)


def test_init_from_weights_trained_on_another_tile_size(workdir):
    """Technology-aware fine-tuning of a network trained on other tiles: its per-tile converter
    ranges do not apply and are calibrated again; the weights load."""
    adc = ["experiment=smoke", "dataset=digits", "nonideality.adc=true", "xbar.adc_range_mode=calibrated"]
    first = run_cli([*adc, "xbar.size=16", f"hydra.run.dir={workdir / 'first'}"], cwd=workdir)
    assert first.returncode == 0, first.stderr[-2000:]
    import torch

    state = torch.load(workdir / "first" / "weights.pt", weights_only=True)
    assert any(k.endswith("log_adc_range") for k in state)  # per-tile ranges of 16x16 tiles
    proc = run_cli([*adc, "xbar.size=32", "training=tech_aware", "xbar.adc_range_mode=learned",
                    f"training.init_from={workdir / 'first' / 'weights.pt'}"], cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.parametrize("sweep", [False, True])
def test_device_yaml_with_a_syntax_error(workdir, tmp_path_factory, sweep):
    extra = tmp_path_factory.mktemp("userconf")
    (extra / "hardware").mkdir()
    (extra / "hardware" / "broken.yaml").write_text("name: broken\nr_on: 1.0e4\nr_off: [1.0e5\nc2c: 0.0\nd2d: 0.0\n")
    choice = ["-m", "hardware=rram,broken"] if sweep else ["hardware=broken"]
    proc = run_cli(["experiment=smoke", f"hydra.searchpath=[file://{extra}]", *choice], cwd=workdir)
    _one_line_exit_2(proc, "YAML syntax error", "broken.yaml", "line 4")
    _no_run_left(workdir)


@pytest.mark.parametrize("args,named", [
    (["xbar.mapping=interleaved", "xbar.cols=63"], "xbar.cols must be even for interleaved mapping"),
    (["trainer.accelerator=tpu"], "trainer (accelerator=tpu"),
    (["trainer.devices=abc"], "devices=abc"),
    # the 1,258 training images of 100,000 x 100,000 pixels would take 50 TB: refused before any allocation
    (["dataset.image_size=100000"], "dataset.image_size=100000: 1258 images of 100000x100000"),
])
def test_inputs_the_core_or_lightning_refuse_are_one_line(workdir, args, named):
    proc = run_cli(["experiment=smoke", "dataset=digits", *args], cwd=workdir)
    _one_line_exit_2(proc, named)
    _no_run_left(workdir)


def test_bad_values_are_refused_before_torch_lightning_and_mlflow_load(workdir):
    """A value out of range (found by the checks before Hydra's app, or by validation in the app)
    is answered before the heavy imports: under a second instead of 6 on 2 cores. A missing
    ``training.init_from`` file is found once the config is valid (checking the model config
    imports the model, so torch), still before Lightning and MLflow: 2.6 s instead of 6.8."""
    import os
    import re
    import subprocess
    import sys

    from conftest import REPO

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("MLFLOW_TRACKING_URI", None)
    heavy = {"pytorch_lightning", "lightning", "mlflow"}
    for bad, needle, not_loaded in (
            ("xbar.size=-3", "xbar.size must be >= 1", heavy | {"torch"}),
            ("training.epochs=0", "training.epochs must be >= 1", heavy | {"torch"}),
            ("hardware.g_max=1", "hardware.g_max=1: no such key", heavy | {"torch"}),
            ("training.init_from=nope.pt", "training.init_from=nope.pt: no such file", heavy)):
        proc = subprocess.run([sys.executable, "-X", "importtime", str(REPO / "run.py"), "experiment=smoke", bad],
                              cwd=workdir, env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, proc.stderr[-2000:]
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and needle in errors[0], proc.stderr[-2000:]
        imported = {m.group(1) for m in re.finditer(r"^import time:.*\|\s+(\S+)$", proc.stderr, re.M)}
        assert "xbarflow.config" in imported  # the log is read right
        assert not imported & not_loaded, (bad, sorted(imported & not_loaded))
        _no_run_left(workdir)


# ---------------------------------------------------------------- issue 25: inputs that misbehaved
@pytest.mark.parametrize("overrides,line", [
    (["model=resnet20", "model.width=0"], "model.width must be >= 1 (got 0)"),
    (["model=resnet20", "model.width=-16"], "model.width must be >= 1 (got -16)"),
    (["model=user", "model._target_=xbarflow.models.CifarResNet", "model.depth=21"],
     "model.depth must be 6n + 2 >= 8: 8, 14, 20, 26, 32, 44, 56, 110, ... (got 21)"),
    (["model=fcn", "model.hidden=[0]"], "model.hidden[0] must be >= 1 (got 0)"),
    (["model=fcn", "model.hidden=[100,-1]"], "model.hidden[1] must be >= 1 (got -1)"),
    (["model=fcn", "model.hidden=500"], "model.hidden must be a list of integers >= 1 (got 500)"),
    (["model=cnn", "model.channels=[32,0]"], "model.channels[1] must be >= 1 (got 0)"),
    (["model=cnn", "model.classifier_hidden=0"], "model.classifier_hidden must be >= 1 (got 0)"),
    (["model=vgg", "model.width=0"], "model.width must be >= 1 (got 0)"),
    (["model=vgg", "model.width=1.5"], "model.width must be an integer >= 1 (got 1.5)"),
    (["model=vgg", "model.layers=[1,M,X]"], "model.layers[2] must be an integer >= 1 (a channel multiple) or M (got 'X')"),
    (["model=vgg", "model.classifier_hidden=0"], "model.classifier_hidden must be >= 1 (got 0)"),
])
def test_model_arguments_are_checked_at_validation(overrides, line):
    """Before any data is read (the old code built the network: an IndexError traceback for width=0)."""
    with pytest.raises(ConfigError) as info:
        validate(compose(overrides))
    assert str(info.value) == line


@pytest.mark.parametrize("cfg,line", [
    ({"_target_": "xbarflow.models.cnn", "channels": [8] * 6}, "model.channels: 6 2x2 poolings leave nothing of 32x32 images"),
    ({"_target_": "xbarflow.models.vgg", "layers": [1, "M"] * 6}, "model.layers: 6 2x2 poolings leave nothing of 32x32 images"),
])
def test_too_many_poolings_for_the_images_are_refused_when_built(cfg, line):
    from xbarflow.builders import build_model

    with pytest.raises(ConfigError) as info:
        build_model(cfg, (1, 28, 28), 10)
    assert str(info.value).startswith(line), info.value


def _digits_model(overrides):
    from xbarflow import pipeline

    typed = validate(compose(["experiment=smoke", "dataset=digits", *overrides]))
    return pipeline.build_crossbar_model(typed, pipeline.build_datasets(typed.dataset))


def test_a_layer_selection_that_selects_nothing_is_refused_unless_include_is_empty():
    from xbarflow.nn.convert import xbar_layers

    on_purpose = "xbar.layers.include=[] runs the network without crossbars on purpose"
    for overrides, named in (
            (["xbar.layers.include=[nomatch*]"], "xbar.layers.include=['nomatch*'] matches no layer of the model "
                                                 "(its layers: 1, 3)"),
            (["xbar.layers.exclude=[*]"], "selects no layer once xbar.layers.exclude=['*'] is applied (its layers: 1, 3)"),
            (["xbar.layers.first_last_digital=true"], "once xbar.layers.first_last_digital=true is applied")):
        with pytest.raises(ConfigError) as info:
            _digits_model(overrides)
        msg = str(info.value)
        assert "\n" not in msg and named in msg and on_purpose in msg, msg
    # allowed: no crossbars on purpose, an exclude pattern that matches nothing, and one include
    # pattern of several that matches nothing (the set selects layer 3)
    assert not list(xbar_layers(_digits_model(["xbar.layers.include=[]"])))
    assert [layer.xbar_name for layer in xbar_layers(_digits_model(["xbar.layers.exclude=[nomatch*]"]))] == ["1", "3"]
    assert [layer.xbar_name for layer in xbar_layers(_digits_model(["xbar.layers.include=[3,fc]"]))] == ["3"]


def test_layer_selection_that_selects_nothing_on_the_command_line(workdir):
    """The old code trained a software network and logged it as a crossbar run (exit 0)."""
    proc = run_cli(["experiment=smoke", "dataset=digits", "xbar.layers.include=[nomatch*]"], cwd=workdir)
    _one_line_exit_2(proc, "xbar.layers.include=['nomatch*'] matches no layer", "its layers: 1, 3")
    _no_run_left(workdir)


def test_a_missing_source_file_is_no_such_file(tmp_path):
    from xbarflow.source import resolve_source

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    for spec in ("missing.pt", "runs/old/weights.pth", "last.ckpt", "w.safetensors", "./weights", str(tmp_path / "w")):
        with pytest.raises(ConfigError) as info:
            resolve_source(spec, uri, str(tmp_path))
        assert str(info.value) == f"source={spec}: no such file"
    # neither a path nor a run id: the message lists what a source may be
    with pytest.raises(ConfigError, match="not a weights file"):
        resolve_source("my-best-run", uri, str(tmp_path))


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
def test_non_finite_loss_or_weights_end_training_with_one_line():
    import torch
    from torch import nn

    from xbarflow.training.module import CrossbarClassifier, TrainingDiverged

    cfg = validate(compose(["training=standard", "training.lr=1e9"])).training
    module = CrossbarClassifier(nn.Sequential(nn.Flatten(), nn.Linear(4, 3)), cfg, num_classes=3, make_chip=lambda s: None)
    x, y = torch.ones(2, 1, 2, 2), torch.tensor([0, 1])
    module.training_step((x, y), 0)  # finite: no error
    with torch.no_grad():
        module.model[1].weight[0, 0] = float("inf")
    with pytest.raises(TrainingDiverged) as info:
        module.on_train_batch_end({"loss": torch.tensor(2.5)}, (x, y), 0)
    assert str(info.value) == ("training diverged in epoch 0 (loss 2.5, the weights are no longer finite): "
                               "lower training.lr (got 1e+09)")
    with pytest.raises(TrainingDiverged, match=r"^training diverged in epoch 0 \(loss nan\): lower training.lr"):
        module.training_step((x, y), 1)
    assert isinstance(info.value, ConfigError)  # run.py: one line, exit 2
    # with weight decay, the step is also lr * weight_decay
    cfg = validate(compose(["training=standard", "training.optimizer=sgd", "training.weight_decay=1e9"])).training
    module = CrossbarClassifier(nn.Sequential(nn.Flatten(), nn.Linear(4, 3)), cfg, num_classes=3, make_chip=lambda s: None)
    assert str(module._diverged(torch.tensor(float("inf")))) == (
        "training diverged in epoch 0 (loss inf): lower training.lr (got 0.001) or training.weight_decay (got 1e+09)")


def test_diverged_training_ends_with_one_line_and_a_failed_run(workdir):
    """lr=1e9: the weights overflow after the first steps. The old code went on into the physics
    core (ValueError: G must be finite, a traceback, exit 1)."""
    proc = run_cli(["experiment=smoke", "dataset=digits", "training.lr=1e9"], cwd=workdir)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-2000:]
    assert errors[0].startswith("error: training diverged in epoch 0 (loss ")
    assert errors[0].endswith("lower training.lr (got 1e+09)")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("xbarflow").experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]
