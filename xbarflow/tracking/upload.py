"""Uploads after a lost tracking server: a job's on-disk record (:func:`upload_record`) and,
once every job is in, its sweep's summary (:func:`finish_uploaded_sweep`)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Optional

from .record import OFFLINE_DIR
from .redaction import redacted_stdout
from .store import client_for, experiment_id, log_params
from .sweep import PARENT_FILE, finish_sweep


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
    params and metric values it lacks are sent, so nothing is doubled), else into a new run of the
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
        # the params it lacks (a server lost right after the run was created had none of them);
        # a param once logged cannot change, so those it has are not sent again
        if (local / "params.json").exists():
            stored = client.get_run(run_id).data.params
            missing = {k: v for k, v in json.loads((local / "params.json").read_text()).items() if k not in stored}
            if missing:
                log_params(client, run_id, missing)
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
