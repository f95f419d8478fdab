"""Nothing loaded from a store or a file runs code (issue 27).

The probe: a run whose ``model`` artifact is an MLflow PyTorch model saved as a pickle that runs
``os.system`` when unpickled (it touches ``$XBARFLOW_PROBE_MARKER``). A control shows the payload
is live (``mlflow.pytorch.load_model`` runs it); ``mode=evaluate`` with that run as the source, by
run id, ``runs:/`` URI, the pickle file itself or the model folder, is refused with one line and
the marker never appears. A stored config (a model card) naming ``_target_: os.system`` is refused
before anything is imported or called.
"""
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO, compose, run_cli

BASE = ["experiment=smoke", "dataset=digits", "logger.experiment_name=probe"]

LOG_PICKLED = r'''
import os, sys, mlflow, mlflow.pytorch, torch

class Payload(torch.nn.Module):
    """Unpickling this object calls os.system (an MLflow PyTorch model is a pickle)."""
    def __reduce__(self):
        return (os.system, ('touch "$XBARFLOW_PROBE_MARKER"',))

uri, weights = sys.argv[1], sys.argv[2]
mlflow.set_tracking_uri(uri)
mlflow.set_experiment("probe")
with mlflow.start_run() as run:
    # pip_requirements given: MLflow would otherwise load the model to infer them
    mlflow.pytorch.log_model(Payload(), name="model", serialization_format="pickle", pip_requirements=["torch"])
    if weights != "-":
        mlflow.log_artifact(weights)  # a run logged by older xbarflow: weights.pt beside the pickled model
print(run.info.run_id)
'''

CONTROL = r'''
import sys, mlflow, mlflow.pytorch
mlflow.set_tracking_uri(sys.argv[1])
try:
    mlflow.pytorch.load_model(sys.argv[2])  # what xbarflow's source.py did before
except Exception:
    pass  # the payload has run by now; what it returned is not a module
'''


def _env(marker):
    return {"XBARFLOW_PROBE_MARKER": str(marker)}


def _smoke_state():
    from xbarflow.config import validate
    from xbarflow.data import build_datasets
    from xbarflow.pipeline import build_crossbar_model

    typed = validate(compose(BASE))
    data = build_datasets(typed.dataset)
    return typed, data, build_crossbar_model(typed, data)


@pytest.fixture(scope="module")
def probe_store(tmp_path_factory):
    """(start dir, store URI, run without weights.pt, older run with weights.pt, marker path)."""
    workdir = tmp_path_factory.mktemp("probe")
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    _, _, model = _smoke_state()
    weights = workdir / "weights.pt"
    torch.save({k: v.detach() for k, v in model.state_dict().items()}, weights)
    env = dict(os.environ, PYTHONPATH=str(REPO), XBARFLOW_PROBE_MARKER=str(workdir / "logging-must-not-run-it"))
    ids = []
    for w in ("-", str(weights)):
        proc = subprocess.run([sys.executable, "-c", LOG_PICKLED, uri, w], cwd=workdir, env=env, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        ids.append(proc.stdout.strip().splitlines()[-1])
    weights.unlink()
    assert not (workdir / "logging-must-not-run-it").exists()
    return workdir, uri, ids[0], ids[1], workdir / "PAYLOAD-RAN"


def test_the_payload_is_live(probe_store, tmp_path):
    """The control: loading the probe's model as xbarflow did before runs the payload."""
    workdir, uri, bare, _, _ = probe_store
    control = tmp_path / "control-marker"
    proc = subprocess.run([sys.executable, "-c", CONTROL, uri, f"runs:/{bare}/model"], cwd=workdir,
                          env=dict(os.environ, **_env(control)), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert control.exists()


def _model_folder(uri, run_id):
    """Where the store keeps the run's logged model (its MLmodel and data/model.pth)."""
    from pathlib import Path
    from urllib.parse import urlparse

    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    run = client.get_run(run_id)
    (model,) = [m for m in client.search_logged_models([run.info.experiment_id]) if m.source_run_id == run_id]
    location = model.artifact_location
    return Path(urlparse(location).path if location.startswith("file:") else location)


@pytest.mark.parametrize("form", ["run-id", "runs-uri", "pickle-file", "model-folder"])
def test_pickled_model_is_never_executed(probe_store, form):
    workdir, uri, bare, _, marker = probe_store
    folder = _model_folder(uri, bare)
    assert (folder / "data" / "model.pth").is_file()
    source = {"run-id": bare, "runs-uri": f"runs:/{bare}/model", "pickle-file": str(folder / "data" / "model.pth"),
              "model-folder": str(folder)}[form]
    proc = run_cli(BASE + ["mode=evaluate", f"source={source}", f"logger.tracking_uri={uri}"], cwd=workdir,
                   env_extra=_env(marker))
    assert not marker.exists(), "the pickled payload ran"
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith(f"error: source={source}: ") and "pickle" in lines[0] and "could run code" in lines[0]
    if form in ("run-id", "runs-uri"):
        assert lines[0] == (f"error: source={source}: the run has no weights.pt and its model artifact is a pickle, "
                            "which xbarflow does not load (it could run code); log the weights with this version")


def test_older_run_is_evaluated_from_its_weights(probe_store):
    """A run logged by older xbarflow (pickled model and weights.pt): its weights.pt is read, never the pickle."""
    workdir, uri, _, older, marker = probe_store
    proc = run_cli(BASE + ["mode=evaluate", f"source=runs:/{older}/model", f"logger.tracking_uri={uri}"], cwd=workdir,
                   env_extra=_env(marker))
    assert not marker.exists(), "the pickled payload ran"
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "the logged model is a pickle (older xbarflow), not loaded; reading the run's weights.pt" in proc.stdout


# ---------------------------------------------------------------- stored configs: the model card's _target_
@pytest.fixture(scope="module")
def logged_folder(tmp_path_factory):
    """A model folder as this version logs it (card.json + weights.safetensors), and the network."""
    from xbarflow.logged_model import card_document, portable_copy, save_model

    typed, data, model = _smoke_state()
    folder = tmp_path_factory.mktemp("logged") / "model"

    class _Model:  # the part of mlflow.models.Model that save_model uses
        signature = None

        def __init__(self):
            self.flavors = {}

        def add_flavor(self, name, **params):
            self.flavors[name] = params

        def save(self, path):
            import yaml

            with open(path, "w") as f:
                yaml.safe_dump({"flavors": self.flavors}, f)

    portable = portable_copy(model)
    save_model(folder, _Model(), model=portable, card=card_document(typed, data.in_shape, data.num_classes))
    return folder, portable


def _with_card(src, dst, edit):
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    card = json.loads((dst / "card.json").read_text())
    edit(card["config"])
    (dst / "card.json").write_text(json.dumps(card))
    return dst


def test_logged_folder_loads_with_the_same_outputs(logged_folder):
    import xbarflow
    from xbarflow.nn.convert import set_mode

    folder, portable = logged_folder
    model = xbarflow.load_model(str(folder))
    x = torch.linspace(0, 1, 3 * 64).reshape(3, 1, 8, 8)
    for mode in ("ideal", "nominal"):
        set_mode(model, mode)
        set_mode(portable, mode)
        with torch.no_grad():
            assert torch.equal(model(x), portable(x)), mode
    set_mode(portable, "ideal")


OS_SYSTEM = {"_target_": "os.system", "command": 'touch "$XBARFLOW_PROBE_MARKER"'}


@pytest.mark.parametrize("name,edit,key,target", [
    ("top", lambda c: c.__setitem__("model", dict(OS_SYSTEM)), "model._target_", "os.system"),
    ("nested", lambda c: c["model"].__setitem__("hidden", dict(OS_SYSTEM)), "model.hidden._target_", "os.system"),
    # a trusted module's name, walked to a callable of another module
    ("walk", lambda c: c["model"].__setitem__("_target_", "xbarflow.data.datasets.os.system"), "model._target_",
     "xbarflow.data.datasets.os.system"),
    ("dunder", lambda c: c["model"].__setitem__("_target_", "xbarflow.models.__builtins__"), "model._target_",
     "xbarflow.models.__builtins__"),
])
def test_stored_target_outside_the_allowlist_is_refused_before_anything_runs(logged_folder, tmp_path, monkeypatch,
                                                                              name, edit, key, target):
    import xbarflow
    from xbarflow.config import ConfigError

    folder, _ = logged_folder
    marker = tmp_path / "PAYLOAD-RAN"
    monkeypatch.setenv("XBARFLOW_PROBE_MARKER", str(marker))
    evil = _with_card(folder, tmp_path / name, edit)
    with pytest.raises(ConfigError) as err:
        xbarflow.load_model(str(evil))
    message = str(err.value)
    assert not marker.exists()
    assert "\n" not in message and message.startswith(f"{evil}: {key}={target} (the model card) is not a trusted target")
    assert "trusted_targets=[" in message


def test_interpolation_in_a_card_is_refused(logged_folder, tmp_path):
    import xbarflow
    from xbarflow.config import ConfigError

    folder, _ = logged_folder
    evil = _with_card(folder, tmp_path / "interp", lambda c: c["model"].__setitem__("hidden", "${oc.env:HOME}"))
    with pytest.raises(ConfigError, match=r"model.hidden \(the model card\) holds an interpolation"):
        xbarflow.load_model(str(evil))


USER_NET = '''
import torch.nn as nn

def net(in_shape, num_classes, hidden=(500,)):
    """The FCN of the smoke run, under the user's own module name."""
    from xbarflow.models import fcn
    return fcn(in_shape=in_shape, num_classes=num_classes, hidden=hidden)
'''


def test_trusted_targets_allows_a_named_module(logged_folder, tmp_path, monkeypatch):
    import xbarflow
    from xbarflow.config import ConfigError

    folder, portable = logged_folder
    (tmp_path / "usernets").mkdir()
    (tmp_path / "usernets" / "__init__.py").write_text("")
    (tmp_path / "usernets" / "models.py").write_text(USER_NET)
    monkeypatch.syspath_prepend(str(tmp_path))
    mine = _with_card(folder, tmp_path / "mine", lambda c: c["model"].__setitem__("_target_", "usernets.models.net"))
    with pytest.raises(ConfigError, match=r"model._target_=usernets.models.net \(the model card\) is not a trusted "
                                          r"target.*set trusted_targets=\[usernets.models\]"):
        xbarflow.load_model(str(mine))
    model = xbarflow.load_model(str(mine), trusted_targets=["usernets.models"])
    x = torch.linspace(0, 1, 2 * 64).reshape(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(model(x), portable(x))


def test_evaluate_refuses_a_card_naming_os_system(logged_folder, tmp_path):
    """run.py, mode=evaluate with a model folder whose card names os.system: one line, nothing runs."""
    folder, _ = logged_folder
    marker = tmp_path / "PAYLOAD-RAN"
    evil = _with_card(folder, tmp_path / "evil", lambda c: c.__setitem__("model", dict(OS_SYSTEM)))
    proc = run_cli(BASE + ["mode=evaluate", f"source={evil}"], cwd=tmp_path, env_extra=_env(marker))
    assert not marker.exists()
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: source={evil}: model._target_=os.system (the model card) "
                                                   "is not a trusted target"), proc.stderr[-3000:]


class _OpensAFile:
    """Unpickling this object calls ``open(marker, "w")``: the file appears if the pickle runs."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_resume_refuses_a_checkpoint_that_needs_unpickling(workdir):
    """``resume=true`` reads the folder's last.ckpt without unpickling (Lightning's default would
    run it): a tampered checkpoint is refused in one line, exit 2, and its payload never runs; an
    honest checkpoint of the same run resumes."""
    run_dir = workdir / "run"
    common = ["experiment=smoke", "dataset=digits", "trainer.limit_train_batches=2", f"hydra.run.dir={run_dir}"]
    first = run_cli(common + ["training.epochs=1"], cwd=workdir)
    assert first.returncode == 0, first.stderr[-2000:]
    last = run_dir / "checkpoints" / "last.ckpt"
    honest = torch.load(last, map_location="cpu", weights_only=True)
    marker = workdir / "payload_ran"
    torch.save({**honest, "callbacks": _OpensAFile(marker)}, last)
    torch.load(last, map_location="cpu", weights_only=False).clear()  # control: plain unpickling runs it
    assert marker.exists()
    marker.unlink()

    refused = run_cli(common + ["training.epochs=2", "resume=true"], cwd=workdir)
    assert refused.returncode == 2, refused.stderr[-2000:]
    lines = [l for l in refused.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and "resume=true" in lines[0] and "last.ckpt" in lines[0], lines
    assert not marker.exists()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("xbarflow").experiment_id])
    assert len(runs) == 1 and runs[0].info.status != "RUNNING"  # no half-open run left behind

    torch.save(honest, last)
    resumed = run_cli(common + ["training.epochs=2", "resume=true"], cwd=workdir)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert not marker.exists() and (run_dir / "checkpoints" / "epoch1.ckpt").exists()
    assert resumed.stderr.strip() == ""  # a quiet console: resuming into its own folder is no warning


@pytest.mark.parametrize("mode", ["standard", "noise_aware", "tech_aware"])
def test_model_description_says_what_acc_software_is(mode):
    """The logged model's description (also the run's MLflow note): for a run trained through the
    crossbar or its noise, test/acc_software is a digital read of those weights, not the software
    network, and gaps are measured from a standard run; a standard run's description says nothing of it."""
    from xbarflow.config import validate
    from xbarflow.logged_model import describe, model_card

    text = describe(model_card(validate(compose(BASE + [f"training.mode={mode}"]))))
    assert f"trained ({mode})" in text
    assert ("not the software network's accuracy" in text) == (mode != "standard")
    assert ("standard-trained run's test/acc_software" in text) == (mode != "standard")
