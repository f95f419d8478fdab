"""The tracking store: refused with one line when it cannot be used, shared safely, never leaking a secret,
and a server that goes away mid-run loses no result."""
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import REPO, run_cli

QUICK = ["experiment=smoke", "dataset=digits", "trainer.limit_train_batches=2", "eval.n_chips=1"]
SECTION8 = ["test/acc_software", "test/acc_xbar_nominal", "test/acc_xbar_mean", "test/acc_xbar_std", "test/acc_xbar_min"]
ADMIN_PASSWORD = "admin-Pw-4f1c9e2b7a"
ALICE_PASSWORD = "alice-Pw-93d0c1e5aa"
API_TOKEN = "tok-5b8e2d7c41f0a9"


# ---------------------------------------------------------------- redaction, against literal expectations
@pytest.mark.parametrize("text,expected", [
    ("postgresql://user:secret@db/mlflow", "postgresql://user:***@db/mlflow"),
    ("mysql+pymysql://u:p4ss@h:3306/db", "mysql+pymysql://u:***@h:3306/db"),
    ("https://host/data.zip?token=abc123&part=2", "https://host/data.zip?token=***&part=2"),
    ("logger.tracking_uri=http://a:b@h:5000 seed=3", "logger.tracking_uri=http://a:***@h:5000 seed=3"),
    ("logger.tracking_uri=http\\://a\\:b@h\\:5000", "logger.tracking_uri=http\\://a\\:***@h\\:5000"),  # Hydra-escaped
    ("{'_target_': 'm.Cb', 'api_token': 'xyz'}", "{'_target_': 'm.Cb', 'api_token': '***'}"),
    ("db_password: hunter2", "db_password: ***"),
    # nothing secret: unchanged
    ("sqlite:////tmp/x/mlflow.db", "sqlite:////tmp/x/mlflow.db"),
    ("http://127.0.0.1:5000 hardware.r_on=1.0e4", "http://127.0.0.1:5000 hardware.r_on=1.0e4"),
])
def test_redact(text, expected):
    from xbarflow.tracking import redact

    assert redact(text) == expected


def test_redact_config_masks_secret_keys():
    from xbarflow.tracking import redact_config

    cfg = {"logger": {"tracking_uri": "postgresql://u:pw@db/m", "experiment_name": "x"},
           "my_secret": "s", "auth": {"password": "p", "token": None}, "n": 3}
    assert redact_config(cfg) == {"logger": {"tracking_uri": "postgresql://u:***@db/m", "experiment_name": "x"},
                                  "my_secret": "***", "auth": {"password": "***", "token": None}, "n": 3}


# ---------------------------------------------------------------- stores no run can go to (issue 11 rows, issue 17)
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bad_store(workdir, kind):
    """(tracking URI, words the one line must contain) for each kind of unusable store."""
    if kind == "ftp":
        return "ftp://host/x", ["unsupported scheme 'ftp'", "sqlite", "http", "postgresql"]
    if kind == "sqlite-not-a-db":
        text = workdir / "notes.txt"
        text.write_text("this is a text file, not a database\n")
        return f"sqlite:///{text}", [str(text), "is not an SQLite database"]
    port = _free_port()  # nothing listens there
    return f"http://127.0.0.1:{port}", [f"http://127.0.0.1:{port}", "unreachable", "Connection refused"]


@pytest.mark.parametrize("sweep", [False, True], ids=["single", "sweep"])
@pytest.mark.parametrize("kind", ["ftp", "sqlite-not-a-db", "unreachable-server"])
def test_unusable_store_is_one_line_and_leaves_nothing(workdir, kind, sweep):
    uri, words = _bad_store(workdir, kind)
    before = {p: p.read_bytes() for p in workdir.iterdir()}
    args = (["-m", *QUICK, "seed=0,1"] if sweep else QUICK) + [f"logger.tracking_uri={uri}"]
    proc = run_cli(args, cwd=workdir)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    assert all(w in lines[0] for w in words), lines[0]
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not (workdir / "mlflow.db").exists() and not (workdir / "multirun").exists()
    assert {p: p.read_bytes() for p in workdir.iterdir() if p.is_file()} == before  # the text file untouched


# ---------------------------------------------------------------- a server with authentication
def _start_server(tmp, port, auth=False):
    env = dict(os.environ)
    for k in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{tmp / 'server.db'}", "--artifacts-destination", str(tmp / "art")]
    if auth:
        (tmp / "auth.ini").write_text(textwrap.dedent(f"""
            [mlflow]
            default_permission = READ
            database_uri = sqlite:///{tmp / 'auth.db'}
            admin_username = admin
            authorization_function = mlflow.server.auth:authenticate_request_basic_auth
        """))
        env.update(MLFLOW_AUTH_CONFIG_PATH=str(tmp / "auth.ini"), MLFLOW_AUTH_ADMIN_PASSWORD=ADMIN_PASSWORD,
                   MLFLOW_FLASK_SERVER_SECRET_KEY="test-only-csrf-key")
        cmd += ["--app-name", "basic-auth"]
    server = subprocess.Popen(cmd, cwd=tmp, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    deadline = time.time() + 300  # MLflow 3's server starts its job consumers first: slow on a busy machine
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return server
        except OSError:
            if server.poll() is not None or time.time() > deadline:
                _stop(server)
                pytest.fail("mlflow server did not start")
            time.sleep(1)


def _stop(server):
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGKILL)
    server.wait(timeout=30)


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    """A basic-auth MLflow server on 127.0.0.1; user alice created by the admin, as the README says."""
    tmp = tmp_path_factory.mktemp("authserver")
    port = _free_port()
    server = _start_server(tmp, port, auth=True)
    url = f"http://127.0.0.1:{port}"
    try:
        env = dict(os.environ, MLFLOW_TRACKING_USERNAME="admin", MLFLOW_TRACKING_PASSWORD=ADMIN_PASSWORD)
        script = f"from mlflow.server.auth.client import AuthServiceClient; " \
                 f"AuthServiceClient({url!r}).create_user('alice', {ALICE_PASSWORD!r})"
        subprocess.run([sys.executable, "-c", script], env=env, check=True, capture_output=True, timeout=120)
        yield url, tmp
    finally:
        _stop(server)


def _as(user, password):
    return {"MLFLOW_TRACKING_USERNAME": user, "MLFLOW_TRACKING_PASSWORD": password}


def _server_runs(monkeypatch, url, experiment="xbarflow"):
    """An admin's client and the runs of ``experiment`` (call after the jobs: it sets the admin's
    credentials in this process's environment, which run_cli would pass on)."""
    from mlflow.tracking import MlflowClient

    for k, v in _as("admin", ADMIN_PASSWORD).items():
        monkeypatch.setenv(k, v)
    client = MlflowClient(url)
    exp = client.get_experiment_by_name(experiment)
    return client, ([] if exp is None else client.search_runs([exp.experiment_id], max_results=100))


def test_auth_server_refuses_a_job_without_credentials(auth_server, workdir, monkeypatch):
    url, _ = auth_server
    proc = run_cli([*QUICK, f"logger.tracking_uri={url}", "logger.experiment_name=refused"], cwd=workdir)
    assert proc.returncode == 2
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and "requires a login (HTTP 401)" in lines[0] and "MLFLOW_TRACKING_USERNAME" in lines[0]
    wrong = run_cli([*QUICK, f"logger.tracking_uri={url}", "logger.experiment_name=refused"], cwd=workdir,
                    env_extra=_as("alice", "not-her-password"))
    assert wrong.returncode == 2
    lines = [l for l in wrong.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and "refused user 'alice' (HTTP 401)" in lines[0] and "not-her-password" not in wrong.stderr
    _, runs = _server_runs(monkeypatch, url, "refused")
    assert runs == []


def test_auth_server_accepts_a_job_with_credentials_from_the_environment(auth_server, workdir, monkeypatch):
    url, _ = auth_server
    proc = run_cli([*QUICK, f"logger.tracking_uri={url}", "logger.experiment_name=accepted"], cwd=workdir,
                   env_extra=_as("alice", ALICE_PASSWORD))
    assert proc.returncode == 0, proc.stderr[-3000:]
    client, runs = _server_runs(monkeypatch, url, "accepted")
    (run,) = runs
    assert run.info.status == "FINISHED" and all(k in run.data.metrics for k in SECTION8)
    assert ALICE_PASSWORD not in proc.stdout + proc.stderr


SECRET_CALLBACK = textwrap.dedent('''
    import pytorch_lightning as pl

    class Noop(pl.Callback):
        """A callback with a secret-named argument, as a user's notification hook might have."""
        def __init__(self, api_token):
            self.api_token = api_token

    class Fails(pl.Callback):
        """Fails as a driver might, with the URI (and its password) in the exception's message."""
        def __init__(self, uri):
            self.uri = uri
        def on_train_start(self, trainer, pl_module):
            raise ConnectionError(f"could not reach {self.uri}")
''')


def test_no_secret_anywhere_in_the_run(auth_server, workdir, tmp_path_factory, monkeypatch):
    """Password in the tracking URI, a token in a secret-named key: neither reaches params, tags,
    artifacts, the console, the sweep table or the files on disk."""
    url, _ = auth_server
    mod = tmp_path_factory.mktemp("secretmod")
    (mod / "secretcb.py").write_text(SECRET_CALLBACK)
    uri_with_password = url.replace("http://", f"http://alice:{ALICE_PASSWORD}@")
    proc = run_cli(["-m", *QUICK, "seed=0", f"logger.tracking_uri={uri_with_password}",
                    "logger.experiment_name=secrets",
                    f"+trainer.callbacks=[{{_target_:secretcb.Noop,api_token:{API_TOKEN}}}]"],
                   cwd=workdir, env_extra={"PYTHONPATH": str(mod)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "alice:***@" in proc.stdout  # the sweep table shows the URI, redacted
    secrets = [ALICE_PASSWORD, API_TOKEN]
    assert [l for l in (proc.stdout + proc.stderr).splitlines() if any(s in l for s in secrets)] == []
    client, runs = _server_runs(monkeypatch, url, "secrets")
    assert len(runs) == 2  # the sweep's parent and its job
    texts = []
    for run in runs:
        texts += [f"{k}={v}" for k, v in run.data.params.items()]
        texts += [f"{k}={v}" for k, v in run.data.tags.items()]
        texts.append(run.info.run_name or "")
        local = Path(client.download_artifacts(run.info.run_id, "", str(workdir / "dl" / run.info.run_id)))
        texts += [p.read_bytes().decode("latin-1") for p in local.rglob("*") if p.is_file()]
    job = next(r for r in runs if "mlflow.parentRunId" in r.data.tags)
    assert job.data.params["logger.tracking_uri"] == url.replace("http://", "http://alice:***@")
    assert "api_token" in job.data.params["trainer.callbacks"]  # logged, masked
    assert any("config.yaml" in str(p) for p in (workdir / "dl").rglob("*"))
    assert [t[:300] for t in texts if any(s in t for s in secrets)] == []
    on_disk = [p for p in workdir.rglob("*") if p.is_file() and "dl" not in p.relative_to(workdir).parts[:1]]
    assert any(p.name == "overrides.yaml" for p in on_disk)  # Hydra's copies were checked too
    leaked = [str(p) for p in on_disk if any(s.encode() in p.read_bytes() for s in secrets)]
    assert leaked == []


def test_sweep_killed_mid_job_leaves_no_secret_on_disk(workdir, tmp_path_factory):
    """The sweeper writes multirun.yaml before any job; each job redacts it at its start, so a
    sweep killed before its end (where the sweep callback would redact it) leaves no secret."""
    mod = tmp_path_factory.mktemp("secretmod")
    (mod / "secretcb.py").write_text(SECRET_CALLBACK)
    sweep_dir = workdir / "sweep"
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{mod}")
    env.pop("MLFLOW_TRACKING_URI", None)
    secret_callback = f"+trainer.callbacks=[{{_target_:secretcb.Noop,api_token:{API_TOKEN}}}]"
    proc = subprocess.Popen([sys.executable, str(REPO / "run.py"), "-m", *QUICK, "seed=0,1", "training.epochs=50",
                             f"hydra.sweep.dir={sweep_dir}", secret_callback],
                            cwd=workdir, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 300
        while not (sweep_dir / "0" / "tracking").exists():  # job 0 is past its start, into its run
            assert proc.poll() is None and time.time() < deadline, "the first job never started its run"
            time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    multirun_yaml = sweep_dir / "multirun.yaml"
    assert multirun_yaml.is_file() and "api_token" in multirun_yaml.read_text()
    leaked = [str(p) for p in sweep_dir.rglob("*") if p.is_file() and API_TOKEN.encode() in p.read_bytes()]
    assert leaked == []


def test_failing_job_prints_its_traceback_redacted(workdir, tmp_path_factory):
    mod = tmp_path_factory.mktemp("secretmod")
    (mod / "secretcb.py").write_text(SECRET_CALLBACK)
    uri = f"postgresql://alice:{ALICE_PASSWORD}@db/mlflow"
    proc = run_cli([*QUICK, f"+trainer.callbacks=[{{_target_:secretcb.Fails,uri:'{uri}'}}]"], cwd=workdir,
                   env_extra={"PYTHONPATH": str(mod)})
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and "ConnectionError: could not reach postgresql://alice:***@db/mlflow" in proc.stderr
    assert ALICE_PASSWORD not in proc.stdout + proc.stderr


def test_report_refuses_an_unreachable_store_with_one_line(tmp_path):
    port = _free_port()  # nothing listens there
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "report.py"), "--experiment", "x", "--out", str(tmp_path),
                           "--tracking-uri", f"http://bob:{ALICE_PASSWORD}@127.0.0.1:{port}"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and f"127.0.0.1:{port}" in lines[0], proc.stderr[-2000:]
    assert ALICE_PASSWORD not in proc.stdout + proc.stderr and "bob:***@" in lines[0]


# ---------------------------------------------------------------- a server that goes away mid-run
KILLER = textwrap.dedent('''
    import os, signal, socket, time
    import pytorch_lightning as pl

    class KillServerAtStep(pl.Callback):
        """Kill the tracking server's process group at global step `step`, and wait until its port is closed."""
        def __init__(self, step, pgid, port):
            self.step, self.pgid, self.port = step, pgid, port
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step != self.step:
                return
            os.killpg(self.pgid, signal.SIGKILL)
            for _ in range(100):
                with socket.socket() as s:
                    if s.connect_ex(("127.0.0.1", self.port)) != 0:
                        return
                time.sleep(0.1)
''')


def test_server_stopped_mid_run_loses_nothing(workdir, tmp_path_factory):
    from mlflow.tracking import MlflowClient

    tmp = tmp_path_factory.mktemp("dyingserver")
    (tmp / "killer.py").write_text(KILLER)
    port = _free_port()
    server = _start_server(tmp, port)
    run_dir = workdir / "job"
    try:
        proc = run_cli(["experiment=smoke", "dataset=digits", "training.epochs=2", "trainer.limit_train_batches=3",
                        "eval.n_chips=2", f"logger.tracking_uri=http://127.0.0.1:{port}", f"hydra.run.dir={run_dir}",
                        f"+trainer.callbacks=[{{_target_:killer.KillServerAtStep,step:4,pgid:{server.pid},port:{port}}}]"],
                       cwd=workdir, env_extra={"PYTHONPATH": str(tmp), "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
                                               "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"})
    finally:
        _stop(server)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "stopped answering" in proc.stderr and "scripts/upload_run.py" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert (run_dir / "checkpoints" / "last.ckpt").exists()
    (line,) = [l for l in proc.stdout.splitlines() if l.startswith("test/acc_software=")]
    printed = dict(kv.split("=") for kv in line.split())
    rows = [json.loads(l) for l in (run_dir / "tracking" / "metrics.jsonl").read_text().splitlines()]
    assert len([r for r in rows if r["key"] == "val/acc"]) == 2  # both epochs, the second after the server died

    # upload to a fresh store, read everything back
    store = f"sqlite:///{workdir / 'later.db'}"
    up = subprocess.run([sys.executable, str(REPO / "scripts" / "upload_run.py"), str(run_dir), "--tracking-uri", store],
                        capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert up.returncode == 0, up.stderr[-2000:]
    client = MlflowClient(store)
    (run,) = client.search_runs([client.get_experiment_by_name("xbarflow").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.tags["uploaded_from"] == json.loads((run_dir / "mlflow_run.json").read_text())["run_id"]
    for key in SECTION8:
        assert f"{run.data.metrics[key]:.2f}" == printed[key], key
    assert [m.step for m in client.get_metric_history(run.info.run_id, "test/acc_xbar_chip")] == [0, 1]
    assert len(client.get_metric_history(run.info.run_id, "val/acc")) == 2
    assert run.data.params["training.epochs"] == "2"
    assert {"config.yaml", "chip_accuracy.png", "weights.pt"} <= {a.path for a in client.list_artifacts(run.info.run_id)}


def test_upload_into_the_same_run_sends_the_params_it_lacks(tmp_path, capsys):
    """A server lost right after a job created its run (the PostgreSQL kill test found this): the
    store's run has no params; uploading into that run sends them, and the metrics, once."""
    from mlflow.tracking import MlflowClient

    from xbarflow.tracking import RunRecord, upload_record

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    record = RunRecord.start(client, uri, tmp_path / "job" / "tracking", "lost", "job", {"training": "standard"})
    record.offline = True  # the store went away here: everything below is kept on disk only
    record.log_params({"seed": "3", "training.epochs": "2"})
    record.log_metrics({"val/acc": 50.0}, step=0)
    record.terminate(None)
    assert client.get_run(record.run_id).data.params == {}
    for _ in range(2):  # uploading again changes nothing
        assert upload_record(tmp_path / "job", uri) == record.run_id
    run = client.get_run(record.run_id)
    assert run.info.status == "FINISHED" and run.data.params == {"seed": "3", "training.epochs": "2"}
    assert [m.value for m in client.get_metric_history(record.run_id, "val/acc")] == [50.0]
