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

Jobs of a ``-m`` sweep (``python scripts/upload_run.py multirun/<date>/<time>/*/``): once every
job of the sweep is uploaded, the sweep's parent run gets its summary table and figure and
ends, as at the end of a sweep whose store stayed up.
"""
import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from xbarflow import tracking  # noqa: E402


def _rejected(run_dir: Path) -> bool:
    """Whether ``run_dir`` is a sweep job that was rejected before it created its run."""
    if not (run_dir.parent / tracking.PARENT_FILE).is_file() or not run_dir.name.isdigit():
        return False
    return any(f["job"] == int(run_dir.name) for f in tracking.recorded_failures(str(run_dir.parent)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="+", type=Path, help="job output directories")
    parser.add_argument("--tracking-uri", default=None, help="target store (default: $MLFLOW_TRACKING_URI, "
                                                             "else the job's own)")
    args = parser.parse_args(argv)
    status = 0
    sweeps = {}  # sweep folder -> the store its jobs went to
    for run_dir in args.run_dirs:
        info_file = run_dir / tracking.OFFLINE_DIR / "run.json"
        if not info_file.exists():
            if _rejected(run_dir):  # shown as REJECTED in the sweep's summary
                print(f"{run_dir}: rejected before its run started (see the sweep's failed jobs); nothing to upload")
                sweeps.setdefault(run_dir.parent, None)
                continue
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
        if (run_dir.parent / tracking.PARENT_FILE).is_file():
            sweeps[run_dir.parent] = uri
    for sweep_dir, uri in sweeps.items():
        if uri is None:  # only rejected jobs of it were given
            continue
        try:
            print(tracking.finish_uploaded_sweep(sweep_dir, uri))
        except tracking.TrackingStoreError as e:
            print(f"error: {e}", file=sys.stderr)
            status = 2
    return status


if __name__ == "__main__":
    sys.exit(main())
