"""What a sweep looks like in the MLflow UI: run names that say what varies, a rendered table.

The parent run is named after the experiment and the swept keys (``paper_fcn: xbar x training``)
and tagged ``swept`` with those keys; each child is named by its values of them
(``xbar={size:16}, training=standard``).
"""
from __future__ import annotations

import json
import math
from typing import Any, Dict, List

from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig

SWEPT_TAG = "swept"


def set_model_training_kind(client, experiment_id: str) -> None:
    """Tag the experiment as model training, so that MLflow's UI opens it on its runs table (an
    untagged experiment opens in the GenAI view, which files a sweep's parent under "Evaluations")."""
    client.set_experiment_tag(experiment_id, "mlflow.experimentKind", "custom_model_development")


def swept_keys(config: DictConfig) -> List[str]:
    """The keys a ``-m`` sweep varies: the sweeper's ``params`` (an experiment's grid, Optuna's
    search space) less those the command line pins to one value, then every sweep override of the
    command line (``a=1,2``, ``interval(...)``)."""
    keys: List[str] = list((config.hydra.sweeper.get("params") or {}).keys())
    try:
        overrides = OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
    except Exception:  # Hydra has parsed them once already; never fail a sweep over its name
        overrides = []
    for o in overrides:
        if o.is_sweep_override() and o.key_or_group not in keys:
            keys.append(o.key_or_group)
        elif not o.is_sweep_override() and o.key_or_group in keys:
            keys.remove(o.key_or_group)  # a search-space key pinned on the command line does not vary
    return keys


def parent_name(config: DictConfig, keys: List[str]) -> str:
    """``<experiment>: <key> x <key>``; the experiment is the ``experiment=`` option, else the MLflow
    experiment's name."""
    choices = config.hydra.runtime.get("choices") or {}
    label = choices.get("experiment") or config.logger.experiment_name
    return f"{label}: {' x '.join(keys) if keys else 'sweep'}"


def child_name(overrides: str, keys: List[str]) -> str:
    """A job's values of the swept keys, e.g. ``xbar={size:16}, training=standard``."""
    mine = {}
    for item in filter(None, overrides.split(" ")):
        k, sep, v = item.partition("=")
        if sep and k.lstrip("+~") in keys:
            mine[k.lstrip("+~")] = v
    return ", ".join(f"{k}={mine[k]}" for k in keys if k in mine) or overrides


def name_child(client, run_id: str, parent_run_id: str, overrides: str) -> None:
    """Rename a sweep's job after its swept values (the parent's ``swept`` tag).

    A name is no result: when the store fails here (a server lost just after the job created its
    run), the job keeps its default name and goes on; its run record notices the lost store at its
    next call and keeps everything on disk for ``scripts/upload_run.py``.
    """
    import sys

    from mlflow.exceptions import MlflowException

    try:
        keys = json.loads(client.get_run(parent_run_id).data.tags.get(SWEPT_TAG, "[]"))
        if keys:
            client.set_tag(run_id, "mlflow.runName", child_name(overrides, keys))
    except (MlflowException, OSError) as e:  # the message (a URL) is not shown: it could carry a password
        print(f"warning: sweep job not renamed after its swept values (the tracking store did not answer: "
              f"{type(e).__name__})", file=sys.stderr, flush=True)


def html_table(rows: List[Dict[str, Any]]) -> str:
    """The sweep's table as a standalone HTML page (accuracies in percent, two decimals)."""
    import pandas as pd

    frame = pd.DataFrame(rows).rename(columns=lambda c: c.replace("test/", ""))
    table = frame.to_html(index=False, na_rep="", float_format=lambda v: "" if math.isnan(v) else f"{v:.2f}",
                          border=0, classes="sweep")
    style = ("<style>table.sweep{border-collapse:collapse;font-family:sans-serif;font-size:14px}"
             "table.sweep th,table.sweep td{padding:4px 10px;border-bottom:1px solid #ddd;text-align:right}"
             "table.sweep th{background:#f4f4f4}</style>")
    return f"<!DOCTYPE html><html><head><meta charset='utf-8'>{style}</head><body>" \
           f"<p>Sweep summary (accuracy in %, energy in pJ per image)</p>{table}</body></html>\n"
