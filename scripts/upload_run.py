"""Upload a run that was kept on disk because its tracking server went away.

Usage::

    python scripts/upload_run.py OUTPUT_DIR [OUTPUT_DIR ...] [--tracking-uri URI]

OUTPUT_DIR is a job's output directory (``outputs/<date>/<time>`` or ``multirun/<date>/<time>/<job>``);
its ``tracking/`` folder holds the run's params, metrics (every value, with its step and time),
tags, status and artifacts, written by the job whether or not the server answered. The run goes
into the same MLflow run when the store still has it (the server came back), else into a new run
of the same experiment tagged ``uploaded_from``. The URI defaults to ``$MLFLOW_TRACKING_URI``,
else to the one the job used; credentials come from ``MLFLOW_TRACKING_USERNAME`` /
``MLFLOW_TRACKING_PASSWORD``, as for the jobs.
"""
import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from xbarflow import tracking  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="+", type=Path, help="job output directories")
    parser.add_argument("--tracking-uri", default=None, help="target store (default: $MLFLOW_TRACKING_URI, "
                                                             "else the job's own)")
    args = parser.parse_args(argv)
    status = 0
    for run_dir in args.run_dirs:
        info_file = run_dir / tracking.OFFLINE_DIR / "run.json"
        if not info_file.exists():
            print(f"error: {run_dir}: no {tracking.OFFLINE_DIR}/run.json (not a job output directory?)", file=sys.stderr)
            status = 2
            continue
        recorded = json.loads(info_file.read_text())["tracking_uri"]
        uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or recorded
        if tracking.REDACTED in uri:
            print(f"error: {run_dir}: the job's URI {uri} carried a password; pass --tracking-uri", file=sys.stderr)
            status = 2
            continue
        try:
            run_id = tracking.upload_record(run_dir, uri)
        except tracking.TrackingStoreError as e:
            print(f"error: {e}", file=sys.stderr)
            status = 2
            continue
        print(f"{run_dir}: uploaded to {tracking.redact(uri)} as run {run_id}")
    return status


if __name__ == "__main__":
    sys.exit(main())
