"""The tracking store: which one (:func:`tracking_uri`), checked before any run
(:func:`check_store`, :func:`client_for`), and the batched writes to it."""
from __future__ import annotations

import os
import re
import shlex
import time
from pathlib import Path
from typing import Dict, List, Optional
from urllib.parse import urlsplit

from ..config import ConfigError
from .redaction import REDACTED, is_secret_key, redact


def tracking_uri(logger_cfg, start_dir: Optional[str] = None) -> str:
    """``logger.tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<start dir>/mlflow.db``."""
    if logger_cfg.tracking_uri:
        return logger_cfg.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{os.path.abspath(os.path.join(start_dir or os.getcwd(), 'mlflow.db'))}"



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


def where_to_look(uri: str, experiment_name: str, run_id: str, kind: str = "run",
                  experiment: Optional[str] = None) -> str:
    """One line saying where to see a run (or a sweep's parent run), its URI redacted.

    A tracking server: the run's page there (``experiment``: the experiment's id, for a direct
    link). Any other store (SQLite, a folder, a database): the ``mlflow ui`` command that shows it.
    """
    shown = redact(uri)
    if urlsplit(uri).scheme in ("http", "https"):
        page = f"{shown.rstrip('/')}/#/experiments/{experiment}/runs/{run_id}" if experiment else shown
        return f"{kind} {run_id} in experiment '{experiment_name}': {page}"
    return (f"{kind} {run_id} in experiment '{experiment_name}': mlflow ui --backend-store-uri {shlex.quote(shown)}"
            "  (then open http://127.0.0.1:5000)")


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
