"""MLflow tracking: one run per job, a parent run per ``-m`` sweep, and the sweep's summary.

The parent run and the experiment are created once, by a Hydra callback in the
launching process, before any job starts; the jobs find the parent's id in a file
in the sweep directory, so jobs in other processes or on other machines (joblib,
submitit) attach to it as well.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import re
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional
from urllib.parse import urlsplit

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from ..config import ConfigError

PARENT_FILE = "mlflow_parent.json"
FAILURES_FILE = "failed_jobs.jsonl"
SECTION8 = ("test/acc_software", "test/acc_xbar_nominal", "test/acc_xbar_mean", "test/acc_xbar_std", "test/acc_xbar_min")


def tracking_uri(logger_cfg, start_dir: Optional[str] = None) -> str:
    """``logger.tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<start dir>/mlflow.db``."""
    if logger_cfg.tracking_uri:
        return logger_cfg.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{os.path.abspath(os.path.join(start_dir or os.getcwd(), 'mlflow.db'))}"


# ---------------------------------------------------------------- credentials never logged
_SECRET_NAME = re.compile(r"password|passwd|token|secret|credential|api_?key", re.IGNORECASE)
# scheme://user:password@host -> scheme://user:***@host (also as Hydra escapes it in a sweep's
# overrides: scheme\://user\:password@host)
_URI_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*\\?://[^:/@\s\\]*)(?P<colon>\\?:)[^@/\s]+@")
# name=value where the name says it is secret: query strings (?token=...) and overrides (a.my_password=...)
# (also inside a printed dict or YAML: 'api_token': 'abc', api_token: abc)
_SECRET_ASSIGNMENT = re.compile(r"(?P<name>[\w.\-+~]*(?:password|passwd|token|secret|credential|api_?key)[\w.\-]*)"
                                r"(?P<sep>['\"]?[ \t]*[=:][ \t]*['\"]?)(?P<value>[^\s&#,;'\"\]}]+)", re.IGNORECASE)
REDACTED = "***"


def redact(text: Any) -> str:
    """``text`` with every credential it carries replaced by ``***``.

    Passwords in URIs (``postgresql://user:***@db/mlflow``), secret query-string
    parameters (``?token=***``) and ``name=value`` pairs whose name says it is secret
    (``logger.api_token=***``). The one function every logged string goes through:
    params, tags, ``config.yaml``, console lines, the sweep table, failure records.
    """
    text = _URI_PASSWORD.sub(lambda m: f"{m['head']}{m['colon']}{REDACTED}@", str(text))
    return _SECRET_ASSIGNMENT.sub(lambda m: f"{m['name']}{m['sep']}{REDACTED}", text)


def is_secret_key(key: str) -> bool:
    """A config key whose last component says it holds a secret (``*password*``, ``*token*``, ``*secret*``)."""
    return bool(_SECRET_NAME.search(str(key).split(".")[-1]))


def redact_config(node: Any) -> Any:
    """A plain nested config (dicts, lists, scalars) with secret keys masked and every string redacted."""
    if isinstance(node, dict):
        return {k: (REDACTED if is_secret_key(k) and v is not None else redact_config(v)) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return [redact_config(v) for v in node]
    return redact(node) if isinstance(node, str) else node


def config_yaml(cfg: DictConfig) -> str:
    """The resolved config as YAML, credentials redacted (the run's ``config.yaml`` artifact)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.create(redact_config(OmegaConf.to_container(cfg, resolve=True))))


def redact_files(folder: Path, pattern: str = "*.yaml") -> None:
    """Rewrite files (Hydra's ``.hydra/*.yaml``, ``multirun.yaml``) with their credentials redacted."""
    for path in Path(folder).glob(pattern):
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError):
            continue
        clean = redact(text)
        if clean != text:
            # parallel jobs of one sweep may redact the same multirun.yaml at once: write a
            # private copy and rename it over, so no reader ever sees a half-written file
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmp.write_text(clean)
            os.replace(tmp, path)


@contextlib.contextmanager
def redacted_stdout():
    """Redact what MLflow prints meanwhile (its "View run at: URL" line carries the URI as given)."""
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):
            yield
    finally:
        sys.stdout.write(redact(buffer.getvalue()))
        sys.stdout.flush()


def redact_console_logs() -> None:
    """Redact every log record from now on, in this process (idempotent).

    Hydra's launchers log each job's overrides, and reconfigure the logging handlers
    as they start, so the redaction sits in the record factory, which they keep.
    """
    make_record = logging.getLogRecordFactory()
    if getattr(make_record, "redacts", False):
        return

    def redacted_record(*args, **kwargs):
        record = make_record(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # a malformed record: leave it to the handler to report
            return record
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        return record

    redacted_record.redacts = True
    logging.setLogRecordFactory(redacted_record)


# ---------------------------------------------------------------- the store, checked before any run
class TrackingStoreError(ConfigError):
    """The tracking store cannot be used: unsupported scheme, not a database, unreachable or refused.

    A :class:`ConfigError`, so ``run.py`` ends with its one line and exit status 2.
    """


def supported_schemes() -> List[str]:
    """The URI schemes this MLflow installation has a tracking store for."""
    from mlflow.tracking._tracking_service.utils import _tracking_store_registry

    return sorted(s for s in _tracking_store_registry._registry if s)


def _reason(exc: BaseException) -> str:
    """The root cause of a store error in a few words (``[Errno 111] Connection refused``)."""
    text = str(exc)
    errno = re.search(r"\[Errno -?\d+\] [^'\")\]]+", text)
    if errno:
        return redact(errno.group(0).strip())
    lines = [l.strip() for l in text.splitlines() if l.strip()]
    first = lines[0] if lines else type(exc).__name__
    return redact(first if len(first) <= 240 else first[:237] + "...")


def _probe_server(uri: str, shown: str) -> None:
    """One request, no retries: does the server answer, and does it let these credentials in?"""
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    try:
        resp = http_request(get_default_host_creds(uri), "/api/2.0/mlflow/experiments/search", "GET",
                            max_retries=0, timeout=15, params={"max_results": 1})
    except Exception as e:
        raise TrackingStoreError(f"tracking server {shown} is unreachable: {_reason(e)}") from None
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    if resp.status_code == 401:
        if user:
            raise TrackingStoreError(f"tracking server {shown} refused user '{user}' (HTTP 401): "
                                     "check MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD")
        raise TrackingStoreError(f"tracking server {shown} requires a login (HTTP 401): set "
                                 "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD in the environment")
    if resp.status_code == 403:
        raise TrackingStoreError(f"tracking server {shown} denied user '{user}' (HTTP 403): ask its admin for access")
    if resp.status_code != 200:
        raise TrackingStoreError(f"tracking server {shown} answered HTTP {resp.status_code}, not an MLflow server?")


def check_store(uri: str) -> None:
    """Refuse, with one line, a tracking URI no run can be logged to; touch nothing on success.

    Raises:
        TrackingStoreError: an unsupported scheme (the supported ones listed), a SQLite
            path that is not a database, a server that cannot be reached or refuses the
            credentials. The URI in the message is redacted.
    """
    from mlflow.utils.uri import get_uri_scheme

    shown = redact(uri)
    scheme = get_uri_scheme(uri)
    if scheme not in supported_schemes() and scheme != "":
        raise TrackingStoreError(f"logger.tracking_uri={shown}: unsupported scheme '{urlsplit(uri).scheme}' "
                                 f"(supported: {', '.join(supported_schemes())})")
    if scheme == "sqlite":
        db = Path(uri[len("sqlite:///"):].split("?")[0]) if uri.startswith("sqlite:///") else None
        if db is not None and db.is_dir():
            raise TrackingStoreError(f"logger.tracking_uri={shown}: {db} is a directory, not an SQLite database")
        if db is not None and db.is_file() and db.stat().st_size > 0:
            with open(db, "rb") as f:
                if f.read(16) != b"SQLite format 3\x00":
                    raise TrackingStoreError(f"logger.tracking_uri={shown}: {db} is not an SQLite database")
    elif scheme in ("http", "https"):
        _probe_server(uri, shown)


def client_for(uri: str):
    """An MlflowClient whose store is ready to use (:func:`check_store` first).

    For a SQLite store the first touch runs MLflow's schema migrations; processes
    that start together on a new file would race on them ("table already exists"),
    so the first touch is serialised with a lock file next to the database.

    Raises:
        TrackingStoreError: the store cannot be used (one line, URI redacted).
    """
    from mlflow.tracking import MlflowClient

    check_store(uri)
    if not uri.startswith("sqlite:///"):
        try:
            client = MlflowClient(tracking_uri=uri)
            client.search_experiments(max_results=1)
        except Exception as e:
            raise TrackingStoreError(f"tracking store {redact(uri)}: {_reason(e)}") from None
        return client
    import fcntl

    db = Path(uri[len("sqlite:///"):].split("?")[0])
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(str(db) + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            client = MlflowClient(tracking_uri=uri)
            client.search_experiments(max_results=1)
        except Exception as e:
            raise TrackingStoreError(f"tracking store {redact(uri)}: {_reason(e)}") from None
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return client


def experiment_id(client, name: str) -> str:
    """Id of the experiment ``name``, created if missing (safe when two processes race)."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name)
    except Exception:
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def flatten(d: Any, prefix: str = "") -> Dict[str, str]:
    """Nested config -> ``{"xbar.r_source": "1000.0", ...}`` (lists kept as their string)."""
    if isinstance(d, dict):
        out: Dict[str, str] = {}
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: str(d)}


def git_commit(cwd: str) -> Optional[str]:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip() or None
    except Exception:
        return None


@dataclass
class TrackedRun:
    """The MLflow run of one job, and where its files go.

    Attributes:
        record: the run's :class:`RunRecord` (every logging call goes through it: kept on
            disk, sent to the store while the store answers).
        uri: the tracking URI.
        output_dir: the job's folder (checkpoints, ``mlflow_run.json``, ``weights.pt``, ``tracking/``).
        resume_ckpt: the checkpoint to resume training from, or None.
    """

    record: "RunRecord"
    uri: str
    output_dir: Path
    resume_ckpt: Optional[str] = None

    @property
    def run_id(self) -> str:
        return self.record.run_id

    @property
    def client(self):
        """The store's client, for calls that need no offline copy (tags, model logging)."""
        return self.record.client

    @property
    def ckpt_dir(self) -> Path:
        return self.output_dir / "checkpoints"


@contextmanager
def open_run(typed, cfg: DictConfig, *, output_dir: str, start_dir: Optional[str] = None,
             parent_run_id: Optional[str] = None, job_num: Optional[int] = None, overrides: str = "",
             extra_params: Optional[Dict[str, str]] = None) -> Iterator[TrackedRun]:
    """Create the job's MLflow run (or reopen it with ``resume=true``); mark it terminated on exit.

    The store is checked first (:func:`client_for`: one line and exit 2 when it cannot be used).
    A new run gets its tags (training, hardware, ..., git commit, parent), every resolved config
    value as a parameter plus ``extra_params`` (secrets redacted), and ``config.yaml``. With
    ``resume=true`` the run recorded in ``<output_dir>/mlflow_run.json`` continues from
    ``checkpoints/last.ckpt`` (the last epoch boundary: mid-epoch state cannot be restored
    exactly with plain dataloaders). On exit the run is FINISHED, FAILED (error kept as a tag)
    or KILLED (interrupt, SIGTERM).
    """
    out = Path(output_dir)
    run_file = out / "mlflow_run.json"
    uri = tracking_uri(typed.logger, start_dir)
    client = client_for(uri)
    run_id, resume_ckpt = None, None
    if typed.resume:
        if run_file.exists():
            run_id = json.loads(run_file.read_text())["run_id"]
        if (out / "checkpoints" / "last.ckpt").exists():
            resume_ckpt = str(out / "checkpoints" / "last.ckpt")
        print(f"resume: run {run_id or '(new)'} from {resume_ckpt or 'the start'}", flush=True)
    fresh = run_id is None
    if fresh:
        tags = {
            "training": typed.training.mode, "hardware": typed.hardware.name, "nonideality": typed.nonideality.name,
            "dataset": typed.dataset.name, "model": str(typed.model["_target_"]).rsplit(".", 1)[-1],
            "overrides": overrides,
            "output_dir": str(output_dir),
        }
        commit = git_commit(start_dir or os.getcwd())
        if commit:
            tags["git_commit"] = commit
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        if job_num is not None:
            tags["job_num"] = str(job_num)
        run_name = typed.run_name or (overrides or f"{typed.training.mode}-{typed.hardware.name}")
        out.mkdir(parents=True, exist_ok=True)
        # kept on disk as well, so a tracking server that goes away mid-run loses nothing
        record = RunRecord.start(client, uri, out / OFFLINE_DIR, typed.logger.experiment_name, run_name, tags)
        run_file.write_text(json.dumps({"run_id": record.run_id, "tracking_uri": redact(uri)}))
    else:
        record = RunRecord.resume(client, run_id, uri, out / OFFLINE_DIR)
    run = TrackedRun(record, uri, out, resume_ckpt)
    exc: Optional[BaseException] = None
    try:
        if fresh:
            from omegaconf import OmegaConf

            params = flatten(OmegaConf.to_container(cfg, resolve=True))
            params.update(extra_params or {})
            record.log_params(params)
            record.log_text(config_yaml(cfg), "config.yaml")
        yield run
    except BaseException as e:
        exc = e
        raise
    finally:
        record.terminate(exc)


def log_figure(record: "RunRecord", fig, path: str) -> None:
    """Log a matplotlib figure as an artifact (through the run's record) and free it."""
    import matplotlib.pyplot as plt

    try:
        record.log_figure(fig, path)
    finally:
        plt.close(fig)


def log_params(client, run_id: str, params: Dict[str, str]) -> None:
    from mlflow.entities import Param

    items = [Param(k, (REDACTED if is_secret_key(k) else redact(v))[:6000]) for k, v in sorted(params.items())]
    for i in range(0, len(items), 100):  # MLflow's batch limit
        client.log_batch(run_id, params=items[i:i + 100])


def log_metrics(client, run_id: str, metrics: Dict[str, float], step: int = 0,
                timestamp: Optional[int] = None) -> None:
    """Metrics at one step; ``timestamp`` in ms since the epoch (now if None)."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000) if timestamp is None else timestamp
    items = [Metric(k, float(v), now, step) for k, v in metrics.items()]
    for i in range(0, len(items), 1000):
        client.log_batch(run_id, metrics=items[i:i + 1000])


def mark_terminated(client, run_id: str, exc: Optional[BaseException]) -> None:
    """FINISHED, FAILED (error kept as a tag) or KILLED (interrupt / SIGTERM)."""
    if exc is None:
        client.set_terminated(run_id, "FINISHED")
        return
    if isinstance(exc, (KeyboardInterrupt, SystemExit)):
        status = "KILLED"
    else:
        status = "FAILED"
    try:
        client.set_tag(run_id, "error", redact(f"{type(exc).__name__}: {exc}")[:5000])
    finally:
        client.set_terminated(run_id, status)


# ---------------------------------------------------------------- sweeps
def parent_run_id(sweep_dir: str) -> Optional[str]:
    path = Path(sweep_dir) / PARENT_FILE
    if not path.exists():
        return None
    return json.loads(path.read_text())["run_id"]


def record_failure(sweep_dir: str, job_num: int, overrides: str, error: str) -> None:
    """Append a failed job to the sweep's failure list (one JSON line; appends are atomic)."""
    line = json.dumps({"job": job_num, "overrides": redact(overrides), "error": redact(error)[:500]}) + "\n"
    with open(Path(sweep_dir) / FAILURES_FILE, "a") as f:
        f.write(line)


def recorded_failures(sweep_dir: str) -> List[Dict[str, Any]]:
    path = Path(sweep_dir) / FAILURES_FILE
    if not path.exists():
        return []
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()]


def _parse_overrides(text: str) -> Dict[str, str]:
    out = {}
    for item in filter(None, text.split(" ")):
        if "=" in item:
            k, v = item.split("=", 1)
            out[k.lstrip("+~")] = v
    return out


def sweep_table(client, parent_id: str, sweep_dir: Optional[str] = None) -> List[Dict[str, Any]]:
    """One row per job: its number, status, swept values and section-8 accuracies.

    Jobs rejected before they created a run (bad values) come from the sweep's failure list.
    """
    parent = client.get_run(parent_id)
    runs = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'",
                              max_results=10000)
    rows = []
    for r in runs:
        row: Dict[str, Any] = {"job": int(r.data.tags.get("job_num", -1)), "status": r.info.status}
        row.update(_parse_overrides(r.data.tags.get("overrides", "")))
        for m in SECTION8:
            row[m] = r.data.metrics.get(m, float("nan"))
        if r.info.status == "FAILED":
            row["error"] = r.data.tags.get("error", "")[:80]
        rows.append(row)
    seen = {r["job"] for r in rows}
    for f in recorded_failures(sweep_dir) if sweep_dir else []:
        if f["job"] not in seen:
            row = {"job": f["job"], "status": "REJECTED", **_parse_overrides(f["overrides"])}
            row.update({m: float("nan") for m in SECTION8})
            row["error"] = f["error"][:80]
            rows.append(row)
    rows.sort(key=lambda r: r["job"])
    # keep only the overrides that differ between jobs: those are the swept parameters
    fixed = [k for k in {k for r in rows for k in r} if k not in ("job", "status", "error")
             and not k.startswith("test/") and len({str(r.get(k)) for r in rows}) == 1]
    if len(rows) > 1:
        for r in rows:
            for k in fixed:
                r.pop(k, None)
    return rows


def format_table(rows: List[Dict[str, Any]]) -> str:
    """A markdown table (readable in a terminal and in the MLflow artifact view)."""
    if not rows:
        return "(no jobs)"
    cols: List[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]

    def fmt(v):
        if isinstance(v, float):
            return "" if math.isnan(v) else f"{v:.2f}"
        return str(v)

    lines = ["| " + " | ".join(c.replace("test/", "") for c in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def sweep_figure(rows: List[Dict[str, Any]]):
    """Crossbar accuracy against the first swept parameter, one line per combination of the others."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    swept = [k for k in rows[0] if k not in ("job", "status", "error") and not k.startswith("test/")] if rows else []
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    if not swept:
        ax.text(0.5, 0.5, "no swept parameter", ha="center")
        return fig
    x_key, others = swept[0], swept[1:]

    def num(v):
        try:
            return float(v)
        except (TypeError, ValueError):
            return v

    groups: Dict[str, List[Dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(", ".join(f"{k}={r.get(k)}" for k in others) or "crossbar", []).append(r)
    for label, rs in groups.items():
        # numbers in order, then other values as text (a row may lack the key: a rejected job)
        rs = sorted(rs, key=lambda r: (0, num(r.get(x_key)), "") if isinstance(num(r.get(x_key)), float)
                    else (1, 0.0, str(r.get(x_key))))
        xs = [num(r.get(x_key)) if isinstance(num(r.get(x_key)), float) else str(r.get(x_key)) for r in rs]
        mean = [r["test/acc_xbar_mean"] for r in rs]
        lo = [r["test/acc_xbar_min"] for r in rs]
        line, = ax.plot(xs, mean, "o-", label=f"{label} (mean over chips)")
        ax.plot(xs, lo, "v:", color=line.get_color(), alpha=0.7, label=f"{label} (min)")
        ax.plot(xs, [r["test/acc_software"] for r in rs], "--", color=line.get_color(), alpha=0.4,
                label=f"{label} (software)")
    ax.set_xlabel(x_key)
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


# Errors of the summary's own code, which must not be reported as a lost tracking store.
_PROGRAMMING_ERRORS = (KeyError, TypeError, AttributeError, IndexError, NameError, AssertionError)


class MlflowSweepCallback(Callback):
    """Hydra callback: a parent MLflow run around every ``-m`` sweep, and its summary at the end."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        redact_console_logs()  # before the launcher logs each job's overrides
        uri = tracking_uri(config.logger, config.hydra.runtime.cwd)
        try:
            client = client_for(uri)  # before the sweep dir or any run exists
        except TrackingStoreError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            sys.exit(2)
        sweep_dir = Path(config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        exp_id = experiment_id(client, config.logger.experiment_name)
        overrides = redact(" ".join(config.hydra.overrides.task))
        from ..sweep_view import SWEPT_TAG, parent_name, set_model_training_kind, swept_keys

        set_model_training_kind(client, exp_id)
        keys = swept_keys(config)
        run_name = parent_name(config, keys)
        tags = {"sweep": "parent", "overrides": overrides, "sweep_dir": str(sweep_dir), SWEPT_TAG: json.dumps(keys)}
        run = client.create_run(exp_id, run_name=run_name, tags=tags)
        # name and tags too: an upload to another store recreates the parent from them
        (sweep_dir / PARENT_FILE).write_text(json.dumps({
            "run_id": run.info.run_id, "tracking_uri": redact(uri), "experiment_id": exp_id,
            "experiment_name": config.logger.experiment_name, "run_name": run_name, "tags": tags}))
        self._client, self._run_id = client, run.info.run_id

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        client = getattr(self, "_client", None)
        if client is None:
            return
        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            rows, failed = finish_sweep(client, self._run_id, sweep_dir)
        except _PROGRAMMING_ERRORS:  # a bug in the summary, not a lost store: show it as it is
            raise
        except Exception as e:  # the store went away during the sweep: the jobs kept their results
            redact_files(sweep_dir, "multirun.yaml")
            print(f"error: tracking store {redact(tracking_uri(config.logger, config.hydra.runtime.cwd))} lost at "
                  f"the end of the sweep ({_reason(e)}); each job's results are in its tracking/ folder, and "
                  f"python scripts/upload_run.py {sweep_dir}/*/ sends them and the sweep's summary",
                  file=sys.stderr, flush=True)
            sys.exit(1)
        print("\nSweep summary (accuracy in %):\n" + format_table(rows), flush=True)
        redact_files(sweep_dir, "multirun.yaml")
        if failed:
            print(f"error: {failed} of {len(rows)} jobs failed (see the table above)", file=sys.stderr, flush=True)
            sys.exit(1)


def finish_sweep(client, parent_id: str, sweep_dir: Path):
    """Write a sweep's summary into its parent run and end that run.

    The summary (``sweep_summary.md/.html/.csv``, the run's description and
    ``sweep_accuracy.png``) is read from the child runs in the store; the parent ends
    FINISHED, or FAILED when a job failed or was rejected. Called at the end of every
    ``-m`` sweep and, after a lost tracking store, by ``scripts/upload_run.py`` once every
    job of the sweep is uploaded. Returns ``(rows, number of failed jobs)``.
    """
    rows = sweep_table(client, parent_id, str(sweep_dir))
    table = format_table(rows)
    client.log_text(parent_id, table + "\n", "sweep_summary.md")
    from ..sweep_view import html_table

    if rows:
        client.log_text(parent_id, html_table(rows), "sweep_summary.html")
    # the run page's description: the comparison is the first thing a user sees
    client.set_tag(parent_id, "mlflow.note.content",
                   "Sweep summary (accuracy in %), one child run per row; figure: sweep_accuracy.png\n\n" + table)
    csv = io.StringIO()
    cols: List[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    csv.write(",".join(cols) + "\n")
    for r in rows:
        csv.write(",".join(str(r.get(c, "")) for c in cols) + "\n")
    client.log_text(parent_id, csv.getvalue(), "sweep_summary.csv")
    if rows:
        fig = sweep_figure(rows)
        client.log_figure(parent_id, fig, "sweep_accuracy.png")
        import matplotlib.pyplot as plt

        plt.close(fig)
    failed = sum(r["status"] in ("FAILED", "REJECTED") for r in rows)
    client.set_tag(parent_id, "n_jobs", str(len(rows)))
    client.set_tag(parent_id, "n_failed", str(failed))
    with redacted_stdout():
        client.set_terminated(parent_id, "FINISHED" if not failed else "FAILED")
    return rows, failed


# ---------------------------------------------------------------- a run that survives its server
OFFLINE_DIR = "tracking"


class RunRecord:
    """One MLflow run's logging, kept on disk first and sent to the store while the store answers.

    Every call writes to ``<output dir>/tracking/`` (``run.json``: ids, tags, status;
    ``params.json``; ``metrics.jsonl``: one metric value a line; ``artifacts/``) and then
    to the store. When the store stops answering (a tracking server that went away), the
    first failure is reported in one line and the rest of the job logs to disk only; the
    job itself goes on. ``scripts/upload_run.py <output dir>`` sends such a run later.
    """

    def __init__(self, client, run_id: str, uri: str, local_dir: Path):
        self.client, self.run_id, self.uri = client, run_id, uri
        self.dir = Path(local_dir)
        (self.dir / "artifacts").mkdir(parents=True, exist_ok=True)
        self.offline = False

    # -- creation
    @classmethod
    def start(cls, client, uri: str, local_dir: Path, experiment_name: str, run_name: str,
              tags: Dict[str, str]) -> "RunRecord":
        """Create the run in the store (the store must answer here) and its record on disk."""
        tags = {k: redact(v) for k, v in tags.items()}
        run_name = redact(run_name)
        run_id = client.create_run(experiment_id(client, experiment_name), run_name=run_name,
                                   tags=tags).info.run_id
        record = cls(client, run_id, uri, local_dir)
        record._write_run({"run_id": run_id, "tracking_uri": redact(uri), "experiment_name": experiment_name,
                           "run_name": run_name, "tags": tags, "status": "RUNNING", "uploaded": False})
        return record

    @classmethod
    def resume(cls, client, run_id: str, uri: str, local_dir: Path) -> "RunRecord":
        """Continue a run created earlier (``resume=true``)."""
        record = cls(client, run_id, uri, local_dir)
        record._send(lambda: client.update_run(run_id, "RUNNING"))
        record._update_run(status="RUNNING")
        return record

    # -- disk
    def _read_run(self) -> Dict[str, Any]:
        path = self.dir / "run.json"
        return json.loads(path.read_text()) if path.exists() else {"run_id": self.run_id, "tags": {}}

    def _write_run(self, info: Dict[str, Any]) -> None:
        tmp = self.dir / "run.json.tmp"
        tmp.write_text(json.dumps(info, indent=1))
        tmp.replace(self.dir / "run.json")

    def _update_run(self, **fields) -> None:
        info = self._read_run()
        info.update(fields)
        self._write_run(info)

    def _send(self, call) -> None:
        if self.offline:
            return
        try:
            call()
        except Exception as e:
            self.offline = True
            print(f"warning: tracking store {redact(self.uri)} stopped answering ({_reason(e)}); "
                  f"the run goes on and logs to {self.dir} only", file=sys.stderr, flush=True)

    # -- the logging calls
    def log_params(self, params: Dict[str, str]) -> None:
        clean = {k: (REDACTED if is_secret_key(k) else redact(v)) for k, v in params.items()}
        path = self.dir / "params.json"
        old = json.loads(path.read_text()) if path.exists() else {}
        path.write_text(json.dumps({**old, **clean}, indent=0, sort_keys=True))
        self._send(lambda: log_params(self.client, self.run_id, clean))

    def log_metrics(self, metrics: Dict[str, float], step: int = 0) -> None:
        now = int(time.time() * 1000)
        with open(self.dir / "metrics.jsonl", "a") as f:
            for k, v in metrics.items():
                f.write(json.dumps({"key": k, "value": float(v), "timestamp": now, "step": int(step)}) + "\n")
        self._send(lambda: log_metrics(self.client, self.run_id, metrics, step=step, timestamp=now))

    def set_tag(self, key: str, value: str) -> None:
        value = redact(value)
        info = self._read_run()
        info.setdefault("tags", {})[key] = value
        self._write_run(info)
        self._send(lambda: self.client.set_tag(self.run_id, key, value))

    def log_text(self, text: str, name: str) -> None:
        (self.dir / "artifacts" / name).write_text(text)
        self._send(lambda: self.client.log_text(self.run_id, text, name))

    def log_figure(self, fig, name: str) -> None:
        fig.savefig(self.dir / "artifacts" / name)
        self._send(lambda: self.client.log_artifact(self.run_id, str(self.dir / "artifacts" / name)))

    def log_artifact(self, path: str) -> None:
        """A file already on disk in the run's output dir: recorded by its path, not copied."""
        info = self._read_run()
        info["artifact_files"] = sorted(set(info.get("artifact_files", [])) | {str(Path(path).resolve())})
        self._write_run(info)
        self._send(lambda: self.client.log_artifact(self.run_id, path))

    def terminate(self, exc: Optional[BaseException]) -> None:
        """FINISHED, FAILED or KILLED, on disk and in the store; if the store was lost, say how to upload."""
        status = "FINISHED" if exc is None else "KILLED" if isinstance(exc, (KeyboardInterrupt, SystemExit)) else "FAILED"
        if exc is not None:
            self.set_tag("error", f"{type(exc).__name__}: {exc}"[:5000])
        self._update_run(status=status, uploaded=not self.offline)
        with redacted_stdout():
            self._send(lambda: self.client.set_terminated(self.run_id, status))
        if self.offline:
            print(f"tracking store {redact(self.uri)} was lost: metrics, params and artifacts are kept in {self.dir} "
                  f"(checkpoints beside it); upload them with: python scripts/upload_run.py {self.dir.parent} "
                  f"--tracking-uri URI", file=sys.stderr, flush=True)


def record_logger(record: RunRecord):
    """A Lightning logger that sends training metrics through ``record`` (so they survive the server)."""
    from pytorch_lightning.loggers.logger import Logger
    from pytorch_lightning.utilities.rank_zero import rank_zero_only

    class RecordLogger(Logger):
        @property
        def name(self):
            return "mlflow"

        @property
        def version(self):
            return record.run_id

        @rank_zero_only
        def log_hyperparams(self, params, *args, **kwargs):
            pass  # the whole resolved config is logged as params by the pipeline

        @rank_zero_only
        def log_metrics(self, metrics, step=None):
            record.log_metrics({k: float(v) for k, v in metrics.items()}, step=step or 0)

    return RecordLogger()


def _stored_run(client, info: Dict[str, Any]) -> Optional[str]:
    """The store's run for a job's record: its own id, else an earlier upload of it (``uploaded_from``)."""
    try:
        if client.get_run(info["run_id"]).info.run_id == info["run_id"]:
            return info["run_id"]
    except Exception:
        pass
    experiment = client.get_experiment_by_name(info.get("experiment_name", ""))
    if experiment is None:
        return None
    runs = client.search_runs([experiment.experiment_id], f"tags.uploaded_from = '{info['run_id']}'", max_results=1)
    return runs[0].info.run_id if runs else None


def upload_record(run_dir: Path, uri: str) -> str:
    """Send a run kept on disk (``<run_dir>/tracking/``) to the store at ``uri``; returns the run id there.

    Into the same run when the store still has it (a server that came back: only the
    metric values it lacks are sent, so nothing is doubled), else into a new run of the
    same experiment, tagged ``uploaded_from`` with the original id (uploading again finds
    that run). A record still marked RUNNING (the process died without ending its run) is
    uploaded as KILLED.
    """
    local = Path(run_dir) / OFFLINE_DIR
    info = json.loads((local / "run.json").read_text())
    client = client_for(uri)
    run_id = _stored_run(client, info)
    if run_id is None:
        tags = dict(info.get("tags", {}), uploaded_from=info["run_id"])
        run_id = client.create_run(experiment_id(client, info["experiment_name"]), run_name=info.get("run_name"),
                                   tags=tags).info.run_id
        if (local / "params.json").exists():
            log_params(client, run_id, json.loads((local / "params.json").read_text()))
    else:
        for k, v in info.get("tags", {}).items():
            client.set_tag(run_id, k, v)
    from mlflow.entities import Metric

    have = {(m.key, m.step, m.timestamp) for k in client.get_run(run_id).data.metrics
            for m in client.get_metric_history(run_id, k)}
    rows = [json.loads(l) for l in (local / "metrics.jsonl").read_text().splitlines() if l.strip()] \
        if (local / "metrics.jsonl").exists() else []
    todo = [Metric(r["key"], r["value"], r["timestamp"], r["step"]) for r in rows
            if (r["key"], r["step"], r["timestamp"]) not in have]
    for i in range(0, len(todo), 1000):
        client.log_batch(run_id, metrics=todo[i:i + 1000])
    for path in sorted((local / "artifacts").iterdir()):
        client.log_artifact(run_id, str(path))
    for path in info.get("artifact_files", []):
        if Path(path).exists():
            client.log_artifact(run_id, path)
    status = info.get("status", "FINISHED")
    with redacted_stdout():
        client.set_terminated(run_id, "KILLED" if status == "RUNNING" else status)
    info["uploaded"] = True
    (local / "run.json").write_text(json.dumps(info, indent=1))
    return run_id
def finish_uploaded_sweep(sweep_dir: Path, uri: str) -> str:
    """After a lost tracking store: the sweep's parent run gets its summary once every job is uploaded.

    ``sweep_dir`` holds the parent's id (:data:`PARENT_FILE`) and one folder per job. When
    every job's record is complete in the store at ``uri`` (logged there while the store
    answered, or sent by :func:`upload_record`), the parent there gets the
    sweep's summary and ends (:func:`finish_sweep`). A store that lacks the parent (another
    store) gets a new parent run, from the name and tags kept in the file, tagged
    ``uploaded_from``, and the jobs' runs are attached to it. Returns one line saying what
    was done; a parent with jobs still to upload is left as it is.
    """
    sweep_dir = Path(sweep_dir)
    parent = json.loads((sweep_dir / PARENT_FILE).read_text())
    jobs = sorted((p for p in sweep_dir.iterdir() if (p / OFFLINE_DIR / "run.json").is_file()), key=lambda p: p.name)
    infos = [json.loads((p / OFFLINE_DIR / "run.json").read_text()) for p in jobs]
    client = client_for(uri)
    # a job is in: its record is complete in some store ("uploaded") and this store has its run
    pending = [p.name for p, info in zip(jobs, infos, strict=True)
               if not info.get("uploaded") or _stored_run(client, info) is None]
    if pending:
        return (f"{sweep_dir}: sweep summary not written, {len(pending)} of {len(jobs)} jobs not uploaded yet "
                f"({', '.join(pending[:5])}{', ...' if len(pending) > 5 else ''})")
    name = parent.get("experiment_name") or (infos[0]["experiment_name"] if infos else "xbarflow")
    parent_id = _stored_run(client, {"run_id": parent["run_id"], "experiment_name": name})
    if parent_id is None:  # not in this store: a new parent
        tags = dict(parent.get("tags") or {"sweep": "parent", "sweep_dir": str(sweep_dir)},
                    uploaded_from=parent["run_id"])
        parent_id = client.create_run(experiment_id(client, name), run_name=parent.get("run_name"),
                                      tags=tags).info.run_id
    if parent_id != parent["run_id"]:  # the jobs' runs under it (an upload sets their recorded parent)
        for info in infos:
            child = _stored_run(client, info)
            if child is not None:
                client.set_tag(child, "mlflow.parentRunId", parent_id)
    rows, failed = finish_sweep(client, parent_id, sweep_dir)
    return f"{sweep_dir}: sweep summary of {len(rows)} jobs ({failed} failed) in parent run {parent_id}"


def log_layer_table(record: "RunRecord", model) -> int:
    """Print the layer table of a converted model, log it as ``layers.md`` and ``layers.json``
    and the number of crossbar arrays as the param ``n_crossbar_arrays``; returns that number."""
    from ..nn.table import format_layer_table, layer_table

    rows = layer_table(model)
    text = format_layer_table(rows)
    print(text, flush=True)
    record.log_text(text + "\n", "layers.md")
    record.log_text(json.dumps([r.as_dict() for r in rows], indent=1), "layers.json")
    n_arrays = sum(r.arrays for r in rows)
    record.log_params({"n_crossbar_arrays": str(n_arrays)})
    return n_arrays


