"""MLflow tracking: one run per job, a parent run per ``-m`` sweep, and the sweep's summary.

The parent run and the experiment are created once, by a Hydra callback in the
launching process, before any job starts; the jobs find the parent's id in a file
in the sweep directory, so jobs in other processes or on other machines (joblib,
submitit) attach to it as well.

One job a module, each importing only those listed above it:

- :mod:`.redaction`: credentials never logged (:func:`redact`, config and file redaction).
- :mod:`.store`: which store (:func:`tracking_uri`), checked before any run (:func:`check_store`,
  :func:`client_for`, :class:`TrackingStoreError`), and batched writes to it.
- :mod:`.record`: the on-disk run record that survives a lost server (:class:`RunRecord`).
- :mod:`.run`: the run context of one job (:func:`open_run`, :class:`TrackedRun`).
- :mod:`.sweep`: the parent run and summary of a sweep (:class:`MlflowSweepCallback`, :func:`finish_sweep`).
- :mod:`.upload`: sending kept records after a lost server (:func:`upload_record`, :func:`finish_uploaded_sweep`).

Every public name is re-exported here (``xbarflow.tracking.redact``, the Hydra callback's
``_target_: xbarflow.tracking.MlflowSweepCallback``). A test that monkeypatches a function
patches it in the module that calls it, not here.
"""
from .record import OFFLINE_DIR, RunRecord, record_logger
from .redaction import (
    REDACTED,
    config_yaml,
    is_secret_key,
    redact,
    redact_config,
    redact_console_logs,
    redact_files,
    redacted_stdout,
)
from .run import TrackedRun, flatten, git_commit, log_figure, log_layer_table, open_run
from .store import (
    TrackingStoreError,
    check_store,
    client_for,
    experiment_id,
    log_metrics,
    log_params,
    mark_terminated,
    supported_schemes,
    tracking_uri,
    where_to_look,
)
from .sweep import (
    FAILURES_FILE,
    PARENT_FILE,
    SECTION8,
    MlflowSweepCallback,
    finish_sweep,
    format_table,
    parent_run_id,
    record_failure,
    recorded_failures,
    sweep_figure,
    sweep_table,
)
from .upload import finish_uploaded_sweep, upload_record

__all__ = [
    # redaction
    "REDACTED", "config_yaml", "is_secret_key", "redact", "redact_config", "redact_console_logs", "redact_files",
    "redacted_stdout",
    # store
    "TrackingStoreError", "check_store", "client_for", "experiment_id", "log_metrics", "log_params",
    "mark_terminated", "supported_schemes", "tracking_uri", "where_to_look",
    # record
    "OFFLINE_DIR", "RunRecord", "record_logger",
    # run
    "TrackedRun", "flatten", "git_commit", "log_figure", "log_layer_table", "open_run",
    # sweep
    "FAILURES_FILE", "PARENT_FILE", "SECTION8", "MlflowSweepCallback", "finish_sweep", "format_table",
    "parent_run_id", "record_failure", "recorded_failures", "sweep_figure", "sweep_table",
    # upload
    "finish_uploaded_sweep", "upload_record",
]
