"""The shared tracking server for real: PostgreSQL as the backend store, proxied artifacts and
basic auth, as the README's recipe sets it up (issue 27).

A PostgreSQL cluster (``initdb`` + ``pg_ctl`` from ``/usr/lib/postgresql/*/bin`` or PATH; run as
the ``postgres`` user when the tests run as root) lives in a temporary folder and listens on a
free loopback port; the MLflow server (``--app-name basic-auth``, run and auth stores both in
PostgreSQL, artifacts proxied with ``--serve-artifacts --artifacts-destination``) reads the
database password from a ``PGPASSFILE``, so no URI carries it. Skips with the reason where
PostgreSQL, psycopg2 or mlflow[auth] is missing.

- Permissions: a member with READ (the default) cannot create, log into or delete runs of the
  shared experiment; a member with EDIT cannot delete another's runs until the admin grants
  MANAGE; a job without an account stops with one line and exit status 2.
- Load: a parallel sweep into the shared experiment; every job FINISHED, and every metric value
  and param of every job's on-disk record is in the store, once (``XBARFLOW_PG_JOBS`` jobs, 4 by
  default, ``XBARFLOW_PG_TRIALS`` trials, 1 by default; the slow test runs 8 jobs
  ``XBARFLOW_PG_TRIALS_SLOW`` times, 30 by default).
- Faults (slow): the server killed (SIGKILL) once every job has its run, restarted a few seconds
  later, with jobs that go on on disk at the first failed request and with jobs that wait out the
  restart with MLflow's retries; after ``scripts/upload_run.py`` every job is FINISHED, none
  RUNNING, nothing lost or doubled (``XBARFLOW_PG_KILL_TRIALS`` trials of each, 3 by default).

``XBARFLOW_PG_REPORT=FILE`` appends each repeated test's summary (trials, failures, seconds) as a
JSON line, as ``XBARFLOW_RACE_REPORT`` does for the SQLite race; ``XBARFLOW_PG_BUDGET_S`` stops
starting trials after that many seconds.
"""
import glob
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import traceback
import urllib.request
from pathlib import Path

import pytest
from conftest import REPO, run_cli
from test_tracking_store import _free_port, _stop

pytest.importorskip("psycopg2", reason="psycopg2 is not installed (pip install -e '.[test]'): MLflow cannot "
                                       "talk to PostgreSQL")
pytest.importorskip("mlflow.server.auth", reason="mlflow[auth] is not installed")

QUICK = ["experiment=smoke", "dataset=digits", "trainer.limit_train_batches=2", "eval.n_chips=1"]
SECTION8 = ["test/acc_software", "test/acc_xbar_nominal", "test/acc_xbar_mean", "test/acc_xbar_std", "test/acc_xbar_min"]
ADMIN_PASSWORD = "admin-Pw-0c4e8a17d2"
DB_PASSWORD = "db-Pw-7e21b9c04f"
USERS = {"alice": "alice-Pw-5d2e8b1a9c", "bob": "bob-Pw-c81f0e7a33", "carol": "carol-Pw-2b9d6e0f71"}
SHARED = "team"  # the shared experiment: alice and bob may write into it (EDIT), carol only reads
N_JOBS = 8


# ---------------------------------------------------------------- PostgreSQL, in a temporary folder
def _pg_bin():
    """The folder of initdb and pg_ctl: $XBARFLOW_PG_BIN, Debian's newest /usr/lib/postgresql/*/bin, or PATH."""
    found = [os.environ.get("XBARFLOW_PG_BIN", "")]
    found += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name)
                    if Path(p).parent.name.isdigit() else 0, reverse=True)
    found += [str(Path(shutil.which("initdb")).parent)] if shutil.which("initdb") else []
    for d in found:
        if d and (Path(d) / "initdb").is_file() and (Path(d) / "pg_ctl").is_file():
            return Path(d)
    return None


class Postgres:
    """A throwaway PostgreSQL cluster on 127.0.0.1:``port``: superuser ``xbarflow``, password auth."""

    def __init__(self, bin_dir):
        self.bin = bin_dir
        self.root = Path(tempfile.mkdtemp(prefix="xbarflow-pg-"))  # not under pytest's 0700 tmp: postgres reads it
        self.port = _free_port()
        self.user = "xbarflow"
        self.as_owner = []
        if os.geteuid() == 0:  # initdb and postgres refuse to run as root
            try:
                owner = pwd.getpwnam("postgres")
            except KeyError:
                pytest.skip("running as root and there is no 'postgres' user to run the PostgreSQL cluster as")
            if not shutil.which("runuser"):
                pytest.skip("running as root without runuser to start PostgreSQL as the 'postgres' user")
            os.chown(self.root, owner.pw_uid, owner.pw_gid)
            self.as_owner = ["runuser", "-u", "postgres", "--"]
        pw = self.root / "pw"
        pw.write_text(DB_PASSWORD + "\n")
        pw.chmod(0o600)
        # libpq reads the password from here: no database URI carries it (the README's recipe)
        self.passfile = self.root / "pgpass"
        self.passfile.write_text(f"127.0.0.1:{self.port}:*:{self.user}:{DB_PASSWORD}\n")
        self.passfile.chmod(0o600)
        if self.as_owner:
            os.chown(pw, pwd.getpwnam("postgres").pw_uid, -1)

    def _run(self, *args):
        proc = subprocess.run([*self.as_owner, *map(str, args)], capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(f"{args[0]} failed: {(proc.stdout + proc.stderr)[-2000:]}")
        return proc

    def start(self):
        data = self.root / "data"
        if not data.exists():
            self._run(self.bin / "initdb", "-D", data, "-U", self.user, f"--pwfile={self.root / 'pw'}",
                      "--auth-local=peer", "--auth-host=scram-sha-256", "-E", "UTF8", "--no-locale", "-N")
        self._run(self.bin / "pg_ctl", "-D", data, "-l", self.root / "postgres.log", "-w", "-t", "120", "-o",
                  f"-c listen_addresses=127.0.0.1 -p {self.port} -c unix_socket_directories={self.root} "
                  "-c max_connections=300", "start")

    def stop(self):
        if (self.root / "data" / "postmaster.pid").exists():
            self._run(self.bin / "pg_ctl", "-D", self.root / "data", "-m", "fast", "-w", "stop")
        shutil.rmtree(self.root, ignore_errors=True)

    def uri(self, db):
        # the driver named: SQLAlchemy >= 2.1 takes plain postgresql:// to mean psycopg 3, not psycopg2
        return f"postgresql+psycopg2://{self.user}@127.0.0.1:{self.port}/{db}"

    def create_database(self, name):
        import psycopg2

        conn = psycopg2.connect(host="127.0.0.1", port=self.port, user=self.user, dbname="postgres",
                                passfile=str(self.passfile))
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
        conn.close()


@pytest.fixture(scope="module")
def postgres():
    bin_dir = _pg_bin()
    if bin_dir is None:
        pytest.skip("PostgreSQL not found (no initdb and pg_ctl in $XBARFLOW_PG_BIN, /usr/lib/postgresql/*/bin "
                    "or PATH): apt-get install postgresql")
    pg = Postgres(bin_dir)
    try:
        pg.start()
        yield pg
    finally:
        pg.stop()


# ---------------------------------------------------------------- the MLflow server on it
class Server:
    """``mlflow server --app-name basic-auth`` on PostgreSQL with proxied artifacts; restartable."""

    def __init__(self, pg, tmp, workers=2):
        self.tmp, self.workers = Path(tmp), workers
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.backend = pg.uri("mlflow")
        self.artifacts = self.tmp / "artifacts"
        self.proc = None
        pg.create_database("mlflow")
        pg.create_database("mlflow_auth")
        (self.tmp / "auth.ini").write_text(textwrap.dedent(f"""
            [mlflow]
            default_permission = READ
            database_uri = {pg.uri('mlflow_auth')}
            admin_username = admin
            authorization_function = mlflow.server.auth:authenticate_request_basic_auth
        """))
        (self.tmp / "auth.ini").chmod(0o600)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}
        self.env.update(PGPASSFILE=str(pg.passfile), MLFLOW_AUTH_CONFIG_PATH=str(self.tmp / "auth.ini"),
                        MLFLOW_AUTH_ADMIN_PASSWORD=ADMIN_PASSWORD, MLFLOW_FLASK_SERVER_SECRET_KEY="test-only-csrf-key")

    def start(self, timeout=300):
        cmd = [sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth", "--host", "127.0.0.1",
               "--port", str(self.port), "--workers", str(self.workers), "--backend-store-uri", self.backend,
               "--serve-artifacts", "--artifacts-destination", str(self.artifacts),
               # uvicorn kills a worker that misses its 5 s health check: on a busy machine, over and over
               "--uvicorn-opts", "--timeout-worker-healthcheck 120"]
        log = open(self.tmp / "server.log", "ab")
        self.proc = subprocess.Popen(cmd, cwd=self.tmp, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        log.close()
        deadline = time.time() + timeout  # MLflow 3's server starts its job consumers first: slow on a busy machine
        while True:
            try:
                urllib.request.urlopen(self.url + "/health", timeout=2)
                return self
            except OSError:
                if self.proc.poll() is not None or time.time() > deadline:
                    _stop(self.proc)
                    tail = (self.tmp / "server.log").read_text(errors="replace")[-3000:]
                    pytest.fail(f"mlflow server did not start: {tail}")
                time.sleep(1)

    def kill(self):
        """SIGKILL the server's whole process group; return once its port is closed."""
        _stop(self.proc)
        for _ in range(100):
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) != 0:
                    return
            time.sleep(0.1)


def _as(user):
    password = ADMIN_PASSWORD if user == "admin" else USERS[user]
    return {"MLFLOW_TRACKING_USERNAME": user, "MLFLOW_TRACKING_PASSWORD": password}


def _client(monkeypatch, url, user):
    """An MlflowClient of ``user`` (credentials set in this process's environment, where MLflow reads them)."""
    from mlflow.tracking import MlflowClient

    for k, v in _as(user).items():
        monkeypatch.setenv(k, v)
    return MlflowClient(url)


@pytest.fixture(scope="module")
def server(postgres, tmp_path_factory):
    """The running server with the README's set-up: users alice, bob, carol; the shared experiment,
    created by the admin, where alice and bob have EDIT (carol has the default, READ)."""
    srv = Server(postgres, tmp_path_factory.mktemp("pgserver")).start()
    try:
        script = textwrap.dedent(f"""
            from mlflow.server.auth.client import AuthServiceClient
            from mlflow.tracking import MlflowClient
            auth = AuthServiceClient({srv.url!r})
            for user, password in {USERS!r}.items():
                auth.create_user(user, password)
            exp = MlflowClient({srv.url!r}).create_experiment({SHARED!r})
            for user in ("alice", "bob"):
                auth.grant_user_permission(user, "experiment", exp, "EDIT")
        """)
        proc = subprocess.run([sys.executable, "-c", script], env=dict(srv.env, **_as("admin")), capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        yield srv
    finally:
        _stop(srv.proc)


def _denied(call):
    """Whether the server refuses ``call`` with HTTP 403 (Permission denied)."""
    from mlflow.exceptions import MlflowException

    try:
        call()
    except MlflowException as e:
        return "403" in str(e) and "ermission denied" in str(e)
    return False


# ---------------------------------------------------------------- permissions
def test_read_member_cannot_log_into_or_delete_runs_of_the_shared_experiment(server, monkeypatch):
    bob = _client(monkeypatch, server.url, "bob")
    exp = bob.get_experiment_by_name(SHARED).experiment_id
    run = bob.create_run(exp).info.run_id
    bob.log_metric(run, "m", 1.0)
    carol = _client(monkeypatch, server.url, "carol")
    assert carol.get_run(run).data.metrics == {"m": 1.0}  # she reads it (default_permission = READ)
    assert _denied(lambda: carol.create_run(exp))
    assert _denied(lambda: carol.log_metric(run, "m", 2.0))
    assert _denied(lambda: carol.set_tag(run, "t", "x"))
    assert _denied(lambda: carol.set_terminated(run, "FAILED"))
    assert _denied(lambda: carol.delete_run(run))
    admin = _client(monkeypatch, server.url, "admin")
    stored = admin.get_run(run)
    assert stored.info.lifecycle_stage == "active" and stored.data.metrics == {"m": 1.0} and "t" not in stored.data.tags


def test_member_cannot_delete_anothers_run_unless_granted(server, monkeypatch):
    from mlflow.server.auth.client import AuthServiceClient

    bob = _client(monkeypatch, server.url, "bob")
    exp = bob.get_experiment_by_name(SHARED).experiment_id
    run = bob.create_run(exp).info.run_id
    alice = _client(monkeypatch, server.url, "alice")
    mine = alice.create_run(exp).info.run_id  # EDIT: she logs her own runs into the shared experiment
    alice.log_metric(mine, "m", 1.0)
    assert _denied(lambda: alice.delete_run(run))
    bob = _client(monkeypatch, server.url, "bob")
    assert _denied(lambda: bob.delete_run(run))  # EDIT deletes no run, not even one's own
    assert _client(monkeypatch, server.url, "admin").get_run(run).info.lifecycle_stage == "active"

    def grant(permission):  # the admin changes alice's grant on the shared experiment
        for k, v in _as("admin").items():
            monkeypatch.setenv(k, v)
        auth = AuthServiceClient(server.url)
        auth.revoke_user_permission("alice", "experiment", exp)
        auth.grant_user_permission("alice", "experiment", exp, permission)

    grant("MANAGE")
    try:
        alice = _client(monkeypatch, server.url, "alice")
        alice.delete_run(run)  # granted by the admin
        assert _client(monkeypatch, server.url, "admin").get_run(run).info.lifecycle_stage == "deleted"
    finally:
        grant("EDIT")


@pytest.mark.parametrize("who", ["no-credentials", "no-account"])
def test_job_without_an_account_is_one_line_and_exit_2(server, workdir, who):
    env = {} if who == "no-credentials" else {"MLFLOW_TRACKING_USERNAME": "mallory",
                                               "MLFLOW_TRACKING_PASSWORD": "not-an-account-Pw"}
    proc = run_cli([*QUICK, f"logger.tracking_uri={server.url}", f"logger.experiment_name={SHARED}"], cwd=workdir,
                   env_extra=env)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: tracking server {server.url} "), proc.stderr[-3000:]
    assert ("requires a login (HTTP 401)" if who == "no-credentials" else "refused user 'mallory' (HTTP 401)") in lines[0]
    assert "not-an-account-Pw" not in proc.stdout + proc.stderr
    assert not (workdir / "mlflow.db").exists()


# ---------------------------------------------------------------- 8 writers, and a server that dies mid-sweep
def _record_rows(job_dir):
    path = job_dir / "tracking" / "metrics.jsonl"
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.exists() else []


def _check_job_against_store(client, job_dir):
    """The job's run is FINISHED in the store, and every metric value of its on-disk record is there, once."""
    from collections import Counter

    info = json.loads((job_dir / "tracking" / "run.json").read_text())
    run = client.get_run(info["run_id"])  # the store kept the run: an upload goes into it
    assert run.info.status == "FINISHED", (job_dir.name, run.info.status)

    def value(v):
        return "nan" if v != v else v  # NaN (the std of one chip) equals itself here

    record = Counter((r["key"], r["step"], r["timestamp"], value(r["value"])) for r in _record_rows(job_dir))
    stored = Counter((m.key, m.step, m.timestamp, value(m.value)) for key in {k for k, *_ in record}
                     for m in client.get_metric_history(run.info.run_id, key))
    assert record and stored == record, (job_dir.name, sorted((record - stored).items())[:5],
                                         sorted((stored - record).items())[:5])
    params = json.loads((job_dir / "tracking" / "params.json").read_text())
    assert {k: run.data.params.get(k) for k in params} == params, job_dir.name
    assert all(k in run.data.metrics for k in SECTION8 + ["train/loss", "val/acc"])
    return run


def _sweep_args(url, sweep_dir, n_jobs=N_JOBS):
    return ["-m", *QUICK, f"seed={','.join(str(s) for s in range(n_jobs))}", "hydra/launcher=parallel",
            f"hydra.launcher.n_jobs={n_jobs}", f"logger.tracking_uri={url}", f"logger.experiment_name={SHARED}",
            f"hydra.sweep.dir={sweep_dir}"]


def _check_sweep(client, sweep_dir, n_jobs=N_JOBS):
    """Every job of the sweep FINISHED and complete in the store, its parent FINISHED, nothing RUNNING."""
    parent_id = json.loads((sweep_dir / "mlflow_parent.json").read_text())["run_id"]
    exp = client.get_experiment_by_name(SHARED).experiment_id
    children = client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent_id}'", max_results=100)
    assert len(children) == n_jobs and all(r.info.status == "FINISHED" for r in children), \
        [(r.data.tags.get("job_num"), r.info.status) for r in children]
    assert sorted(int(r.data.params["seed"]) for r in children) == list(range(n_jobs))
    assert client.get_run(parent_id).info.status == "FINISHED"
    jobs = sorted(p for p in sweep_dir.iterdir() if (p / "tracking" / "run.json").is_file())
    assert len(jobs) == n_jobs
    for job in jobs:
        _check_job_against_store(client, job)


def _sweep_trial(server, workdir, monkeypatch, n_jobs=N_JOBS):
    sweep_dir = workdir / "sweep"
    proc = run_cli(_sweep_args(server.url, sweep_dir, n_jobs), cwd=workdir, env_extra=_as("alice"), timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "stopped answering" not in proc.stderr, proc.stderr[-3000:]
    _check_sweep(_client(monkeypatch, server.url, "admin"), sweep_dir, n_jobs)


def _upload(server, dirs):
    env = dict(os.environ, PYTHONPATH=str(REPO), **_as("alice"))
    up = subprocess.run([sys.executable, str(REPO / "scripts" / "upload_run.py"), *map(str, dirs), "--tracking-uri",
                         server.url], capture_output=True, text=True, timeout=1200, env=env)
    assert up.returncode == 0, (up.stdout + up.stderr)[-3000:]
    return up


def _kill_trial(server, workdir, monkeypatch, retries, down_s=5.0):
    """The server SIGKILLed once every job has its run, started again ``down_s`` seconds later;
    then the documented upload of every job.

    ``retries="none"``: a job's first request to the dead server fails and the job goes on, on
    disk only (``MLFLOW_HTTP_REQUEST_MAX_RETRIES=0``; the timeout stays MLflow's 120 s, since 8 jobs
    starting at once on a busy machine wait seconds for the live server), so the upload sends its
    results. ``retries="mlflow-default"``: MLflow's own retries (7, backing off for minutes), so the
    jobs wait out the restart and log into the restarted server; a retried write that had reached
    the database before the kill must not be doubled.
    """
    sweep_dir = workdir / "sweep"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI" and not k.startswith("MLFLOW_HTTP_")}
    env.update(_as("alice"), PYTHONPATH=str(REPO))
    if retries == "none":
        env.update(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="120")
    with open(workdir / "sweep.log", "w") as log:
        proc = subprocess.Popen([sys.executable, str(REPO / "run.py"), *_sweep_args(server.url, sweep_dir)], cwd=workdir,
                                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 1200
        while len(list(sweep_dir.glob("*/mlflow_run.json"))) < N_JOBS:
            assert proc.poll() is None, (workdir / "sweep.log").read_text()[-3000:]
            assert time.time() < deadline, "the jobs never all started their runs"
            time.sleep(0.2)
        server.kill()
        killed_at = time.time()
        time.sleep(down_s)
        server.start()
        back_at = time.time()
        proc.wait(timeout=1800)
        ended_at = time.time()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    out = (workdir / "sweep.log").read_text()
    assert "Traceback" not in out, out[-3000:]
    jobs = sorted(p for p in sweep_dir.iterdir() if (p / "tracking" / "run.json").is_file())
    _upload(server, jobs)
    _check_sweep(_client(monkeypatch, server.url, "admin"), sweep_dir)
    return {"jobs_that_went_on_disk_only": out.count("stopped answering"), "down_s": round(back_at - killed_at, 1),
            "sweep_ended_after_kill_s": round(ended_at - killed_at, 1), "back_before_the_sweep_ended": back_at < ended_at}


def test_parallel_sweep_into_the_shared_experiment(server, tmp_path, monkeypatch):
    """4 parallel jobs here (about a minute on 2 cores); the slow tests below run 8, many times."""
    trials = int(os.environ.get("XBARFLOW_PG_TRIALS", "1"))
    n_jobs = int(os.environ.get("XBARFLOW_PG_JOBS", "4"))
    for t in range(trials):
        workdir = tmp_path / f"trial{t}"
        workdir.mkdir()
        _sweep_trial(server, workdir, monkeypatch, n_jobs)


def _repeat(name, trials, trial, tmp_path):
    """Run every trial, even after a failure: the count of failures is the result. With
    ``XBARFLOW_PG_BUDGET_S`` no trial starts after that many seconds (a slow machine runs fewer;
    the summary says how many ran)."""
    budget = float(os.environ.get("XBARFLOW_PG_BUDGET_S", "inf"))
    failures, details, t_start, ran = [], [], time.time(), 0
    for t in range(trials):
        if t and time.time() - t_start > budget:
            break
        ran += 1
        workdir = tmp_path / f"{name}{t}"
        workdir.mkdir()
        t0 = time.time()
        try:
            details.append({"trial": t, **(trial(workdir) or {}), "s": round(time.time() - t0, 1)})
        except Exception as err:
            failures.append({"trial": t, "error": "".join(traceback.format_exception_only(err)).strip()[-2000:]})
    summary = {"test": name, "trials": ran, "asked": trials, "failed": len(failures),
               "wall_s": round(time.time() - t_start, 1),
               "trials_s": details, "failures": failures}
    print(json.dumps(summary))
    if os.environ.get("XBARFLOW_PG_REPORT"):
        with open(os.environ["XBARFLOW_PG_REPORT"], "a") as f:
            f.write(json.dumps(summary) + "\n")
    assert not failures, f"{len(failures)} of {ran} trials failed: {failures[:3]}"


@pytest.mark.slow
def test_parallel_sweep_repeated_on_postgres(server, tmp_path, monkeypatch):
    trials = int(os.environ.get("XBARFLOW_PG_TRIALS_SLOW", "30"))
    _repeat("sweep", trials, lambda d: _sweep_trial(server, d, monkeypatch), tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("retries", ["none", "mlflow-default"])
def test_server_killed_and_restarted_mid_sweep_loses_nothing(server, tmp_path, monkeypatch, retries):
    trials = int(os.environ.get("XBARFLOW_PG_KILL_TRIALS", "3"))
    _repeat(f"kill-retries-{retries}", trials, lambda d: _kill_trial(server, d, monkeypatch, retries), tmp_path)
