"""The run context: one MLflow run per job (:func:`open_run`, :class:`TrackedRun`) and what
the pipeline logs into it besides metrics (figures, the layer table)."""
from __future__ import annotations

import json
import os
import subprocess
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, Optional

from omegaconf import DictConfig

from .record import OFFLINE_DIR, RunRecord
from .redaction import config_yaml, redact
from .store import client_for, tracking_uri, where_to_look


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
    or KILLED (interrupt, SIGTERM), and one line says where to see it (:func:`where_to_look`).
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
        if not record.offline:  # else terminate has said where the run is kept and how to upload it
            print(where_to_look(uri, typed.logger.experiment_name, record.run_id,
                                experiment=_experiment_of(record)), flush=True)


def _experiment_of(record: RunRecord) -> Optional[str]:
    """The run's experiment id, for a link to a tracking server's page (None for other stores, or
    when the server does not answer)."""
    if not record.uri.startswith(("http://", "https://")):
        return None
    try:
        return record.client.get_run(record.run_id).info.experiment_id
    except Exception:
        return None


def log_figure(record: "RunRecord", fig, path: str) -> None:
    """Log a matplotlib figure as an artifact (through the run's record) and free it."""
    import matplotlib.pyplot as plt

    try:
        record.log_figure(fig, path)
    finally:
        plt.close(fig)


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
