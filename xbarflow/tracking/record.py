"""The on-disk run record: a run that survives its tracking server (:class:`RunRecord`),
and the Lightning logger that writes through it."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional

from .redaction import REDACTED, is_secret_key, redact, redacted_stdout
from .store import _reason, experiment_id, log_metrics, log_params

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
