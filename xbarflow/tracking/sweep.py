"""Sweeps: a parent MLflow run around every ``-m`` sweep (:class:`MlflowSweepCallback`), the
jobs' failure list, and the sweep's summary (:func:`finish_sweep`)."""
from __future__ import annotations

import io
import json
import math
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from .redaction import redact, redact_console_logs, redact_files, redacted_stdout
from .store import TrackingStoreError, _reason, client_for, experiment_id, tracking_uri, where_to_look

PARENT_FILE = "mlflow_parent.json"
FAILURES_FILE = "failed_jobs.jsonl"
SECTION8 = ("test/acc_software", "test/acc_xbar_nominal", "test/acc_xbar_mean", "test/acc_xbar_std", "test/acc_xbar_min")
# further columns of the summary: the energy per image of the crossbar layers (model note, section 10)
SUMMARY_EXTRA = ("energy/total_pj_per_image",)


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
    """One row per job: its number, status, swept values, section-8 accuracies and energy per image.

    Jobs rejected before they created a run (bad values) come from the sweep's failure list.
    """
    parent = client.get_run(parent_id)
    runs = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'",
                              max_results=10000)
    rows = []
    for r in runs:
        row: Dict[str, Any] = {"job": int(r.data.tags.get("job_num", -1)), "status": r.info.status}
        row.update(_parse_overrides(r.data.tags.get("overrides", "")))
        for m in SECTION8 + SUMMARY_EXTRA:
            row[m] = r.data.metrics.get(m, float("nan"))
        if r.info.status == "FAILED":
            row["error"] = r.data.tags.get("error", "")[:80]
        rows.append(row)
    seen = {r["job"] for r in rows}
    for f in recorded_failures(sweep_dir) if sweep_dir else []:
        if f["job"] not in seen:
            row = {"job": f["job"], "status": "REJECTED", **_parse_overrides(f["overrides"])}
            row.update({m: float("nan") for m in SECTION8 + SUMMARY_EXTRA})
            row["error"] = f["error"][:80]
            rows.append(row)
    rows.sort(key=lambda r: r["job"])
    # keep only the overrides that differ between jobs: those are the swept parameters
    fixed = [k for k in {k for r in rows for k in r} if k not in ("job", "status", "error")
             and not k.startswith("test/") and k not in SUMMARY_EXTRA and len({str(r.get(k)) for r in rows}) == 1]
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

    swept = [k for k in rows[0] if k not in ("job", "status", "error", *SUMMARY_EXTRA)
             and not k.startswith("test/")] if rows else []
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
        self._client, self._run_id, self._experiment, self._uri = client, run.info.run_id, exp_id, uri

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
        print("\nSweep summary (accuracy in %, energy in pJ per image):\n" + format_table(rows), flush=True)
        print(where_to_look(self._uri, config.logger.experiment_name, self._run_id, kind="sweep",
                            experiment=self._experiment), flush=True)
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
                   "Sweep summary (accuracy in %, energy in pJ per image), one child run per row; "
                   "figure: sweep_accuracy.png\n\n" + table)
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
