"""MLflow tracking: one run per job, a parent run per ``-m`` sweep, and the sweep's summary.

The parent run and the experiment are created once, by a Hydra callback in the
launching process, before any job starts; the jobs find the parent's id in a file
in the sweep directory, so jobs in other processes or on other machines (joblib,
submitit) attach to it as well.
"""
from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

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


def client_for(uri: str):
    """An MlflowClient whose store is ready to use.

    For a SQLite store the first touch runs MLflow's schema migrations; processes
    that start together on a new file would race on them ("table already exists"),
    so the first touch is serialised with a lock file next to the database.
    """
    from mlflow.tracking import MlflowClient

    if not uri.startswith("sqlite:///"):
        return MlflowClient(tracking_uri=uri)
    import fcntl

    db = Path(uri[len("sqlite:///"):].split("?")[0])
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(str(db) + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            client = MlflowClient(tracking_uri=uri)
            client.search_experiments(max_results=1)
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
        client: the MlflowClient of the run's store.
        run_id: the run's id.
        uri: the tracking URI.
        output_dir: the job's folder (checkpoints, ``mlflow_run.json``, ``weights.pt``).
        resume_ckpt: the checkpoint to resume training from, or None.
    """

    client: Any
    run_id: str
    uri: str
    output_dir: Path
    resume_ckpt: Optional[str] = None

    @property
    def ckpt_dir(self) -> Path:
        return self.output_dir / "checkpoints"


@contextmanager
def open_run(typed, cfg: DictConfig, *, output_dir: str, start_dir: Optional[str] = None,
             parent_run_id: Optional[str] = None, job_num: Optional[int] = None, overrides: str = "",
             extra_params: Optional[Dict[str, str]] = None) -> Iterator[TrackedRun]:
    """Create the job's MLflow run (or reopen it with ``resume=true``); mark it terminated on exit.

    A new run gets its tags (training, hardware, ..., git commit, parent), every resolved config
    value as a parameter plus ``extra_params``, and ``config.yaml``. With ``resume=true`` the run
    recorded in ``<output_dir>/mlflow_run.json`` continues from ``checkpoints/last.ckpt`` (the
    last epoch boundary: mid-epoch state cannot be restored exactly with plain dataloaders).
    On exit the run is FINISHED, FAILED (error kept as a tag) or KILLED (interrupt, SIGTERM).
    """
    out = Path(output_dir)
    run_file = out / "mlflow_run.json"
    uri = tracking_uri(typed.logger, start_dir)
    client = client_for(uri)
    run = TrackedRun(client, "", uri, out)
    if typed.resume:
        if run_file.exists():
            run.run_id = json.loads(run_file.read_text())["run_id"]
        if (run.ckpt_dir / "last.ckpt").exists():
            run.resume_ckpt = str(run.ckpt_dir / "last.ckpt")
        print(f"resume: run {run.run_id or '(new)'} from {run.resume_ckpt or 'the start'}", flush=True)
    fresh = not run.run_id
    if fresh:
        tags = {
            "training": typed.training.mode, "hardware": typed.hardware.name, "nonideality": typed.nonideality.name,
            "dataset": typed.dataset.name, "model": typed.model.arch, "overrides": overrides,
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
        exp_id = experiment_id(client, typed.logger.experiment_name)
        run.run_id = client.create_run(exp_id, run_name=run_name, tags=tags).info.run_id
        out.mkdir(parents=True, exist_ok=True)
        run_file.write_text(json.dumps({"run_id": run.run_id, "tracking_uri": uri}))
    else:
        client.update_run(run.run_id, "RUNNING")
    exc: Optional[BaseException] = None
    try:
        if fresh:
            from omegaconf import OmegaConf

            params = flatten(OmegaConf.to_container(cfg, resolve=True))
            params.update(extra_params or {})
            log_params(client, run.run_id, params)
            client.log_text(run.run_id, OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
        yield run
    except BaseException as e:
        exc = e
        raise
    finally:
        mark_terminated(client, run.run_id, exc)


def log_figure(client, run_id: str, fig, path: str) -> None:
    """Log a matplotlib figure as an artifact and free it."""
    import matplotlib.pyplot as plt

    try:
        client.log_figure(run_id, fig, path)
    finally:
        plt.close(fig)


def log_params(client, run_id: str, params: Dict[str, str]) -> None:
    from mlflow.entities import Param

    items = [Param(k, v[:6000]) for k, v in sorted(params.items())]
    for i in range(0, len(items), 100):  # MLflow's batch limit
        client.log_batch(run_id, params=items[i:i + 100])


def log_metrics(client, run_id: str, metrics: Dict[str, float], step: int = 0) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
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
        client.set_tag(run_id, "error", f"{type(exc).__name__}: {exc}"[:5000])
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
    line = json.dumps({"job": job_num, "overrides": overrides, "error": error[:500]}) + "\n"
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
        rs = sorted(rs, key=lambda r: (isinstance(num(r[x_key]), str), num(r[x_key])))
        xs = [str(r[x_key]) if isinstance(num(r[x_key]), str) else num(r[x_key]) for r in rs]
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


class MlflowSweepCallback(Callback):
    """Hydra callback: a parent MLflow run around every ``-m`` sweep, and its summary at the end."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        uri = tracking_uri(config.logger, config.hydra.runtime.cwd)
        client = client_for(uri)
        exp_id = experiment_id(client, config.logger.experiment_name)
        overrides = " ".join(config.hydra.overrides.task)
        from .sweep_view import SWEPT_TAG, parent_name, set_model_training_kind, swept_keys

        set_model_training_kind(client, exp_id)
        keys = swept_keys(config)
        run = client.create_run(exp_id, run_name=parent_name(config, keys),
                                tags={"sweep": "parent", "overrides": overrides, "sweep_dir": str(sweep_dir),
                                      SWEPT_TAG: json.dumps(keys)})
        (sweep_dir / PARENT_FILE).write_text(json.dumps({"run_id": run.info.run_id, "tracking_uri": uri,
                                                         "experiment_id": exp_id}))
        self._client, self._run_id = client, run.info.run_id

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        client = getattr(self, "_client", None)
        if client is None:
            return
        rows = sweep_table(client, self._run_id, str(config.hydra.sweep.dir))
        table = format_table(rows)
        print("\nSweep summary (accuracy in %):\n" + table, flush=True)
        client.log_text(self._run_id, table + "\n", "sweep_summary.md")
        from .sweep_view import html_table

        if rows:
            client.log_text(self._run_id, html_table(rows), "sweep_summary.html")
        # the run page's description: the comparison is the first thing a user sees
        client.set_tag(self._run_id, "mlflow.note.content",
                       "Sweep summary (accuracy in %), one child run per row; figure: sweep_accuracy.png\n\n" + table)
        csv = io.StringIO()
        cols: List[str] = []
        for r in rows:
            cols += [k for k in r if k not in cols]
        csv.write(",".join(cols) + "\n")
        for r in rows:
            csv.write(",".join(str(r.get(c, "")) for c in cols) + "\n")
        client.log_text(self._run_id, csv.getvalue(), "sweep_summary.csv")
        if rows:
            fig = sweep_figure(rows)
            client.log_figure(self._run_id, fig, "sweep_accuracy.png")
            import matplotlib.pyplot as plt

            plt.close(fig)
        failed = sum(r["status"] in ("FAILED", "REJECTED") for r in rows)
        client.set_tag(self._run_id, "n_jobs", str(len(rows)))
        client.set_tag(self._run_id, "n_failed", str(failed))
        client.set_terminated(self._run_id, "FINISHED" if not failed else "FAILED")
        if failed:
            print(f"error: {failed} of {len(rows)} jobs failed (see the table above)", file=sys.stderr, flush=True)
            sys.exit(1)
