"""Sweeps past one process: parallel writers into one SQLite store, submitit, a tracking server."""
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from conftest import run_cli

QUICK = ["experiment=smoke", "dataset=digits", "trainer.limit_train_batches=2", "eval.n_chips=1"]
SECTION8 = ["test/acc_software", "test/acc_xbar_nominal", "test/acc_xbar_mean", "test/acc_xbar_std", "test/acc_xbar_min"]


def _client(uri):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _sweep_runs(client, name="xbarflow"):
    exp = client.get_experiment_by_name(name)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("sweep") == "parent"]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return parents, children


def _check_parallel_sweep(workdir, n_jobs):
    proc = run_cli(["-m", *QUICK, "seed=0,1,2,3", "hydra/launcher=parallel", f"hydra.launcher.n_jobs={n_jobs}"], cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "locked" not in proc.stderr.lower()
    client = _client(f"sqlite:///{workdir / 'mlflow.db'}")
    assert len(client.search_experiments()) == 2  # Default + xbarflow: created once
    parents, children = _sweep_runs(client)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == 4
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parents[0].info.run_id}
    for r in children:
        assert r.info.status == "FINISHED"
        assert all(k in r.data.metrics for k in SECTION8 + ["train/loss", "val/acc"])
    assert sorted(r.data.params["seed"] for r in children) == ["0", "1", "2", "3"]


def test_parallel_sweep_into_one_sqlite_store(tmp_path):
    """4 jobs in 4 processes write to one SQLite file: all runs complete, no lock error."""
    trials = int(os.environ.get("XBARFLOW_RACE_TRIALS", "1"))  # many more: the slow test below
    for t in range(trials):
        workdir = tmp_path / f"trial{t}"
        workdir.mkdir()
        _check_parallel_sweep(workdir, n_jobs=4)


@pytest.mark.slow
def test_parallel_sweep_race_repeated(tmp_path):
    """The same, many times (MLflow's own fix for this class of race saw 6 failures in 1,800 runs).

    Every trial runs even after a failure, so the count of failures is the result; it is
    printed (``pytest -s``) and, with ``XBARFLOW_RACE_REPORT=FILE``, appended to FILE as
    one JSON line. The test fails if any trial failed.
    """
    import json
    import traceback

    trials = int(os.environ.get("XBARFLOW_RACE_TRIALS_SLOW", "20"))
    failures, t_start = [], time.time()
    for t in range(trials):
        workdir = tmp_path / f"trial{t}"
        workdir.mkdir()
        try:
            _check_parallel_sweep(workdir, n_jobs=4)
        except Exception as err:  # count it and go on: the rate is what is measured
            failures.append({"trial": t, "error": "".join(traceback.format_exception_only(err)).strip()[-2000:]})
    summary = {"trials": trials, "failed": len(failures), "wall_s": round(time.time() - t_start, 1),
               "failures": failures}
    print(json.dumps(summary))
    if os.environ.get("XBARFLOW_RACE_REPORT"):
        with open(os.environ["XBARFLOW_RACE_REPORT"], "a") as f:
            f.write(json.dumps(summary) + "\n")
    assert not failures, f"{len(failures)} of {trials} trials failed: {failures[:3]}"


STRESS = r'''
import sys, time
from omegaconf import OmegaConf
from xbarflow import tracking
uri, n, tag = sys.argv[1], int(sys.argv[2]), sys.argv[3]
client = tracking.client_for(uri)
for i in range(n):
    exp = tracking.experiment_id(client, "stress")
    run_id = client.create_run(exp, tags={"writer": tag}).info.run_id
    tracking.log_params(client, run_id, {f"p{k}": str(k) for k in range(150)})
    for step in range(5):
        tracking.log_metrics(client, run_id, {"m": float(step)}, step=step)
    tracking.mark_terminated(client, run_id, None)
'''


@pytest.mark.parametrize("writers,runs_each", [(4, 10)])
def test_tracking_layer_concurrent_writers(tmp_path, writers, runs_each):
    """Writers race to create the experiment and runs in a fresh SQLite store: none fails or is lost."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    script = tmp_path / "stress.py"
    script.write_text(STRESS)
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    procs = [subprocess.Popen([sys.executable, str(script), uri, str(runs_each), str(w)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for w in range(writers)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    client = _client(uri)
    (exp,) = [e for e in client.search_experiments() if e.name == "stress"]
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    assert len(runs) == writers * runs_each and all(r.info.status == "FINISHED" for r in runs)
    assert all(len(r.data.params) == 150 for r in runs)


def test_submitit_local_sweep(workdir):
    proc = run_cli(["-m", *QUICK, "training=standard,tech_aware", "hydra/launcher=local"], cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    parents, children = _sweep_runs(_client(f"sqlite:///{workdir / 'mlflow.db'}"))
    assert len(parents) == 1 and sorted(r.data.tags["training"] for r in children) == ["standard", "tech_aware"]
    assert all(r.info.status == "FINISHED" for r in parents + children)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_jobs_log_to_a_tracking_server(workdir, tmp_path):
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}", "--artifacts-destination", str(tmp_path / "art")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(url + "/health", timeout=2)
                break
            except OSError:
                assert server.poll() is None, "mlflow server exited"
                assert time.time() < deadline, "mlflow server did not start"
                time.sleep(1)
        proc = run_cli([*QUICK, f"logger.tracking_uri={url}", "logger.experiment_name=central"], cwd=workdir)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert not (workdir / "mlflow.db").exists()  # nothing went to the local default store
        client = _client(url)
        exp = client.get_experiment_by_name("central")
        (run,) = client.search_runs([exp.experiment_id])
        assert run.info.status == "FINISHED"
        assert all(k in run.data.metrics for k in SECTION8)
        arts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"config.yaml", "weights.pt", "chip_accuracy.png"} <= arts
        assert any((tmp_path / "art").rglob("weights.pt"))  # stored by the server, not the job
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:  # MLflow 3's job consumers can outlive a busy machine's grace
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)
