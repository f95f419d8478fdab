"""Train once, evaluate many: logged models and evaluation-only runs (issue 15).

One technology-aware smoke run on the digits is trained once per module; the tests load its
logged model in a fresh process and evaluate its weights again, on the same and on other hardware.
"""
import json
import subprocess
import sys

import pytest
from conftest import REPO, run_cli

SECTION8 = ["test/acc_software", "test/acc_xbar_nominal", "test/acc_xbar_mean", "test/acc_xbar_std",
            "test/acc_xbar_min"]
BASE = ["experiment=smoke", "dataset=digits", "logger.experiment_name=src"]


def _client(workdir):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")


def _runs(workdir):
    client = _client(workdir)
    exp = client.get_experiment_by_name("src")
    return client.search_runs([exp.experiment_id], max_results=100, order_by=["attributes.start_time ASC"])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(start dir, the run) of one trained, logged smoke run."""
    workdir = tmp_path_factory.mktemp("trained")
    proc = run_cli(BASE, cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = _runs(workdir)
    return workdir, run


LOAD = r"""
import json, pickle, sys, torch
def refuse(*args, **kwargs):
    raise AssertionError("the loader unpickled something")
pickle.load = pickle.loads = torch.load = refuse  # nothing may be unpickled on the way
import xbarflow
from xbarflow.nn.convert import set_mode
model = xbarflow.load_model(sys.argv[2], tracking_uri=sys.argv[1])
x = torch.linspace(0, 1, 5 * 64).reshape(5, 1, 8, 8)
out = {"layers": sorted({type(m).__name__ for m in model.modules()})}
for mode in ("ideal", "nominal"):
    set_mode(model, mode)
    with torch.no_grad():
        out[mode] = model(x).tolist()
print(json.dumps(out))
"""


@pytest.mark.parametrize("form", ["runs-uri", "run-id"])
def test_logged_model_loads_in_a_fresh_process(trained, form):
    """xbarflow.load_model in a fresh process (pickle and torch.load disabled there) gives the
    trained network's outputs, in ideal mode and on the nominal crossbar."""
    workdir, run = trained
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    model_uri = f"runs:/{run.info.run_id}/model" if form == "runs-uri" else run.info.run_id
    proc = subprocess.run([sys.executable, "-c", LOAD, uri, model_uri], cwd=workdir,
                          capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "XbarLinear" in loaded["layers"]

    # the reference: the run's own weights.pt in a model built here from the run's config
    import torch
    from conftest import compose
    from omegaconf import OmegaConf

    from xbarflow.config import validate
    from xbarflow.data import build_datasets
    from xbarflow.nn.convert import set_mode
    from xbarflow.pipeline import build_crossbar_model

    client = _client(workdir)
    typed = validate(compose(BASE))
    model = build_crossbar_model(typed, build_datasets(typed.dataset))
    weights = client.download_artifacts(run.info.run_id, "weights.pt", str(workdir))
    model.load_state_dict(torch.load(weights, weights_only=True))
    model.eval()
    x = torch.linspace(0, 1, 5 * 64).reshape(5, 1, 8, 8)
    for mode in ("ideal", "nominal"):
        set_mode(model, mode)
        with torch.no_grad():
            torch.testing.assert_close(torch.tensor(loaded[mode]), model(x), rtol=1e-5, atol=1e-6)
    ideal, nominal = torch.tensor(loaded["ideal"]), torch.tensor(loaded["nominal"])
    assert not torch.allclose(ideal, nominal)  # the crossbar layers really ran the circuit

    # its card says what it was trained for; the logged model is its weights (no pickle) and its card
    model_info = client.search_logged_models([run.info.experiment_id])[0]
    assert model_info.tags["hardware"] == "rram" and model_info.tags["training"] == "tech_aware"
    assert "64x64 tiles" in model_info.tags["crossbar"] and "c2c" in model_info.tags["nonideality"]
    from pathlib import Path

    weights_bytes = (Path(run.data.tags["output_dir"]) / "weights.pt").stat().st_size
    sizes = [p.stat().st_size for p in (workdir / "mlruns").rglob("weights.safetensors")]
    assert sizes and max(sizes) < 1.5 * weights_bytes
    assert not list((workdir / "mlruns").rglob("*.pth")) and not list((workdir / "mlruns").rglob("*.pkl"))
    assert OmegaConf.to_container(compose(BASE))["mode"] == "train"


def test_evaluate_same_config_reproduces_metrics(trained):
    workdir, run = trained
    proc = run_cli(BASE + ["mode=evaluate", f"source={run.info.run_id}"], cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    evaluated = _runs(workdir)[-1]
    assert "train/loss" not in evaluated.data.metrics  # nothing was trained
    assert evaluated.info.run_id != run.info.run_id and evaluated.info.status == "FINISHED"
    assert evaluated.data.tags["source_run"] == run.info.run_id and evaluated.data.tags["mode"] == "evaluate"
    assert evaluated.data.tags["column_gains"] == "source"
    for key in SECTION8:
        assert evaluated.data.metrics[key] == run.data.metrics[key], key
    assert "train/loss" not in evaluated.data.metrics


def test_evaluate_reproduces_a_calibrated_periphery_under_augmentation(workdir):
    """With random crop and flip on the training split, an evaluation-only run still calibrates
    exactly as its source did after training: calibration reads the training images without
    augmentation (``DataSplits.calibration_images``). Reading the augmented split, the crops were
    drawn from the global generator, whose state after training differs from a fresh process's,
    and the calibrated DAC scales and ADC ranges (continuous, logged) differed between the two."""
    cfg = BASE + ["training=standard", "dataset.crop_padding=1", "dataset.hflip=true", "nonideality.dac=true",
                  "nonideality.adc=true", "xbar.dac_range_mode=calibrated"]
    proc = run_cli(cfg, cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = _runs(workdir)
    proc = run_cli(cfg + ["mode=evaluate", f"source={run.info.run_id}"], cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    evaluated = _runs(workdir)[-1]
    calibrated = [k for k in run.data.metrics if k.startswith(("dac_scale/", "adc_range/"))]
    assert any(k.startswith("dac_scale/") for k in calibrated) and any(k.startswith("adc_range/") for k in calibrated)
    for key in calibrated + SECTION8:
        assert evaluated.data.metrics[key] == run.data.metrics[key], key


def test_evaluate_on_other_hardware_from_logged_model(trained):
    workdir, run = trained
    proc = run_cli(BASE + ["mode=evaluate", f"source=runs:/{run.info.run_id}/model", "hardware=pcm", "xbar.size=16"],
                   cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    evaluated = _runs(workdir)[-1]
    tags = evaluated.data.tags
    assert tags["source_run"] == run.info.run_id and tags["hardware"] == "pcm"
    assert tags["training"] == "tech_aware" and tags["column_gains"] == "recalibrated"
    assert evaluated.data.params["xbar.size"] == "16"
    m = evaluated.data.metrics
    assert m["test/acc_software"] == run.data.metrics["test/acc_software"]  # the same weights
    assert 0 <= m["test/acc_xbar_min"] <= m["test/acc_xbar_mean"] <= 100


def test_mismatched_or_missing_source_is_refused(trained):
    workdir, run = trained
    before = len(_runs(workdir))
    proc = run_cli(BASE + ["mode=evaluate", f"source={run.info.run_id}", "model.hidden=[50]"], cwd=workdir)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"error: source={run.info.run_id}: trained for model.hidden=[500], not "
                                   f"model.hidden=[50] (evaluate it with the source's model and dataset)")
    proc = run_cli(BASE + ["mode=evaluate", "source=0123456789abcdef0123456789abcdef"], cwd=workdir)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "no run 0123456789abcdef" in proc.stderr
    proc = run_cli(BASE + ["mode=evaluate"], cwd=workdir)
    assert proc.returncode == 2 and "source must be set" in proc.stderr
    assert len(_runs(workdir)) == before  # no run left behind


def test_reused_standard_training_gives_the_metrics_of_training_again(workdir):
    """`training.reuse`: the second standard job of a crossbar sweep evaluates the first one's
    weights, and its metrics are those of training it again (standard training never sees the crossbar)."""
    std = BASE + ["training=standard"]
    proc = run_cli(["-m"] + std + ["training.reuse=true", "xbar.size=16,32"], cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    children = [r for r in _runs(workdir) if "mlflow.parentRunId" in r.data.tags]
    first, second = sorted(children, key=lambda r: int(r.data.tags["job_num"]))
    # trained once: the quiet console no longer prints Lightning's "Trainer.fit stopped", so ask the runs
    assert "train/loss" in first.data.metrics and "train/loss" not in second.data.metrics
    assert "train_key" in first.data.tags and second.data.tags["reused_from"] == first.info.run_id
    assert second.data.tags["training"] == "standard" and second.data.params["xbar.size"] == "32"
    proc = run_cli(std + ["xbar.size=32", "logger.experiment_name=again"], cwd=workdir)  # trained anew
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = _client(workdir)
    (again,) = client.search_runs([client.get_experiment_by_name("again").experiment_id])
    for key in SECTION8:
        assert second.data.metrics[key] == again.data.metrics[key], key


def test_keep_reads_a_changed_crossbar_with_the_learned_periphery(trained, tmp_path):
    """An evaluation-only ablation (one crossbar setting changed) keeps the source's learned column
    gains with ``eval.source_periphery=keep``; by default (auto) they are refitted for that crossbar."""
    import torch

    workdir, run = trained
    (source_weights,) = [p for p in workdir.rglob("weights.pt") if "evaluated" not in str(p)][:1]
    gains = {k: v for k, v in torch.load(source_weights, weights_only=True).items() if k.endswith("log_column_gain")}
    assert gains and any(bool(v.abs().max() > 0) for v in gains.values())  # tech_aware learned them
    for periphery, tag in (("auto", "recalibrated"), ("keep", "source")):
        out = tmp_path / f"evaluated_{periphery}"
        proc = run_cli(BASE + ["mode=evaluate", f"source={run.info.run_id}", "xbar.r_source=500",
                               f"eval.source_periphery={periphery}", f"hydra.run.dir={out}"], cwd=workdir)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert _runs(workdir)[-1].data.tags["column_gains"] == tag
        # auto says so in one line, naming the changed key and the way to keep the periphery
        notes = [line for line in proc.stdout.splitlines() if line.startswith("note: ")]
        if periphery == "auto":
            assert len(notes) == 1 and "xbar.r_source" in notes[0] and "eval.source_periphery=keep" in notes[0], notes
        else:
            assert not notes, notes
        state = torch.load(out / "weights.pt", weights_only=True)
        same = [torch.equal(state[k], v) for k, v in gains.items()]  # a copy, or a least-squares refit
        assert all(same) if periphery == "keep" else not any(same), (periphery, same)


def test_keep_refuses_a_periphery_that_does_not_fit(trained):
    workdir, run = trained
    proc = run_cli(BASE + ["mode=evaluate", f"source={run.info.run_id}", "xbar.size=16", "eval.source_periphery=keep"],
                   cwd=workdir)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith("error: eval.source_periphery=keep:") and "another tile size" in lines[0]


def test_a_key_added_after_the_source_ran_counts_at_its_default():
    """A source run logged before a crossbar key existed (e.g. xbar.stuck_compensation) ran with that
    key's default behaviour: the same setting here is no difference (its learned periphery is kept),
    another value is one."""
    from conftest import compose

    from xbarflow.source import Source, _flat, crossbar_differences

    cfg = compose(["experiment=smoke"])
    old_params = {k: v for k, v in _flat(cfg).items() if k != "xbar.stuck_compensation"}
    source = Source("x", {}, "run", old_params, "tech_aware")
    assert crossbar_differences(source, cfg) == []
    assert crossbar_differences(source, compose(["experiment=smoke", "xbar.stuck_compensation=true"])) == [
        "xbar.stuck_compensation"]
    assert crossbar_differences(source, compose(["experiment=smoke", "xbar.r_source=500"])) == ["xbar.r_source"]
    # a weights file logged no parameters: every crossbar key is unknown
    assert "xbar.r_source" in crossbar_differences(Source("w.pt", {}, None, {}, None), cfg)
