"""Readable sweeps and the Optuna search (issue 15)."""
from pathlib import Path

import pytest
import yaml
from conftest import run_cli

from xbarflow.sweep_view import child_name, html_table


def test_child_name_keeps_only_the_swept_values_in_sweep_order():
    overrides = "experiment=paper_fcn training=standard xbar={size:16} +x.y=3"
    assert child_name(overrides, ["xbar", "training"]) == "xbar={size:16}, training=standard"
    assert child_name(overrides, ["x.y"]) == "x.y=3"
    assert child_name("dataset=digits", ["xbar"]) == "dataset=digits"  # nothing swept found: all of it


def test_a_lost_store_leaves_a_sweep_job_unnamed_not_failed(capsys):
    """The server lost just after a sweep job created its run (found by the PostgreSQL kill test:
    every job of the sweep failed here): the job keeps its default name and goes on."""
    from mlflow.exceptions import MlflowException

    from xbarflow.sweep_view import name_child

    class DeadStore:
        def get_run(self, run_id):
            raise MlflowException("API request to http://alice:secret@host/api/2.0/mlflow/runs/get failed")

        def set_tag(self, *args):
            raise AssertionError("nothing to rename without the parent's tags")

    name_child(DeadStore(), "child", "parent", "seed=1")
    err = capsys.readouterr().err
    assert err.startswith("warning: sweep job not renamed") and "secret" not in err


def test_html_table_renders_every_row_and_column():
    rows = [{"job": 0, "status": "FINISHED", "xbar": "{size:16}", "test/acc_xbar_mean": 91.234},
            {"job": 1, "status": "FAILED", "xbar": "{size:32}", "test/acc_xbar_mean": float("nan")}]
    page = html_table(rows)
    assert page.startswith("<!DOCTYPE html>") and page.count("<tr") == 3
    assert "<th>acc_xbar_mean</th>" in page and "<td>91.23</td>" in page and "nan" not in page


def test_optuna_two_trials_make_one_parent_and_two_children(workdir):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    proc = run_cli(["-m", "experiment=tune_tech_aware", "dataset=digits", "hydra.sweeper.n_trials=2",
                    "training.epochs=1", "trainer.limit_train_batches=3", "trainer.limit_val_batches=2",
                    "eval.n_chips=2"], cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    exp = client.get_experiment_by_name("tune_tech_aware")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    (parent,) = [r for r in runs if r.data.tags.get("sweep") == "parent"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(runs) == 3 and len(children) == 2
    # named by what varies (training.epochs is pinned on the command line), children by their values
    assert parent.info.run_name == "tune_tech_aware: training.lr x xbar.w_max"
    for child in children:
        assert child.info.run_name.startswith("training.lr=") and ", xbar.w_max=" in child.info.run_name
        assert child.info.status == "FINISHED" and child.data.params["training.epochs"] == "1"
        assert 0 <= child.data.metrics["val/acc_xbar_mean"] <= 100  # the objective, on the validation split
    assert {"sweep_summary.md", "sweep_summary.html", "sweep_accuracy.png"} <= \
        {a.path for a in client.list_artifacts(parent.info.run_id)}
    # Optuna maximised what run.py returned: the best child's validation accuracy on the crossbar
    (result,) = Path(workdir, "multirun").rglob("optimization_results.yaml")
    best = yaml.safe_load(result.read_text())["best_value"]
    assert best == max(c.data.metrics["val/acc_xbar_mean"] for c in children)
