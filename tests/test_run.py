"""End-to-end runs through run.py, read back from MLflow."""
import json

from conftest import REPO, run_cli
from mlflow.tracking import MlflowClient


def _client(workdir):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")


def _runs(client, name="xbarflow"):
    exp = client.get_experiment_by_name(name)
    return client.search_runs([exp.experiment_id], max_results=100)


SECTION8 = ["test/acc_software", "test/acc_xbar_nominal", "test/acc_xbar_mean", "test/acc_xbar_std", "test/acc_xbar_min"]


def test_smoke_run_logs_params_metrics_artifacts(workdir):
    proc = run_cli(["experiment=smoke", "hardware=pcm", "logger.experiment_name=e2e"], cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = _client(workdir)
    (run,) = _runs(client, "e2e")
    assert run.info.status == "FINISHED"
    p = run.data.params
    assert p["hardware.name"] == "pcm" and p["xbar.r_source"] == "1000.0" and p["training.mode"] == "tech_aware"
    m = run.data.metrics
    for key in SECTION8 + ["train/loss", "val/acc"]:
        assert key in m, key
    assert 0 <= m["test/acc_xbar_min"] <= m["test/acc_xbar_mean"] <= 100
    assert m["test/acc_software"] > 20  # learned something in 5 batches
    assert run.data.tags["training"] == "tech_aware" and run.data.tags["hardware"] == "pcm"
    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "weights.pt", "chip_accuracy.png"} <= arts
    chips = client.get_metric_history(run.info.run_id, "test/acc_xbar_chip")
    assert len(chips) == 2  # experiment=smoke: 2 chips


def test_sweep_makes_parent_children_and_table(workdir):
    proc = run_cli(["-m", "experiment=smoke", "training=standard,tech_aware"], cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Sweep summary" in proc.stdout and "| job | status | training |" in proc.stdout
    client = _client(workdir)
    runs = _runs(client)
    parents = [r for r in runs if r.data.tags.get("sweep") == "parent"]
    assert len(parents) == 1
    parent = parents[0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.data.tags["training"] for r in children) == ["standard", "tech_aware"]
    # readable in the UI: the parent says what varies, a child its value
    assert parent.info.run_name == "smoke: training"  # the experiment= option, then what varies
    assert sorted(r.info.run_name for r in children) == ["training=standard", "training=tech_aware"]
    assert all(r.info.status == "FINISHED" for r in children + [parent])
    arts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"sweep_summary.md", "sweep_summary.csv", "sweep_summary.html", "sweep_accuracy.png"} <= arts
    table = client.download_artifacts(parent.info.run_id, "sweep_summary.csv", str(workdir))
    rows = open(table).read().splitlines()
    assert rows[0].startswith("job,status,training") and len(rows) == 3

    # the paper-style report of the same sweep
    import sys

    sys.path.insert(0, str(REPO / "scripts"))
    import report

    out = workdir / "report"
    assert report.main(["--experiment", "xbarflow", "--out", str(out),
                        "--tracking-uri", f"sqlite:///{workdir / 'mlflow.db'}"]) == 0
    summary = json.loads((out / "report.json").read_text())
    std = {r.data.tags["training"]: r.data.metrics for r in children}
    assert summary["ideal_acc"] == std["standard"]["test/acc_software"]
    assert summary["standard_xbar_acc"] == std["standard"]["test/acc_xbar_mean"]
    assert summary["tech_aware_xbar_acc"] == std["tech_aware"]["test/acc_xbar_mean"]
    assert abs(summary["degradation"] - (summary["ideal_acc"] - summary["standard_xbar_acc"])) < 1e-9
    assert abs(summary["gap"] - (summary["ideal_acc"] - summary["tech_aware_xbar_acc"])) < 1e-9
    assert (out / "accuracy_vs_array.png").stat().st_size > 10_000 and (out / "report.md").exists()
    # where the numbers come from (model note, section 9): command, commit, test-set size
    prov = summary["provenance"]
    assert prov["commands"] == [f"python run.py -m {parent.data.tags['overrides']}"]
    assert prov["commits"] == sorted({r.data.tags["git_commit"] for r in children if "git_commit" in r.data.tags})
    n_test = {int(r.data.metrics["test/n_images"]) for r in children}
    assert prov["n_test_images"] == sorted(n_test) and all(n > 0 for n in n_test)
    assert "python run.py -m" in (out / "report.md").read_text()
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/report.json", "report/report.md", "report/accuracy_vs_array.png"} <= logged


def test_user_device_through_searchpath(workdir, tmp_path_factory):
    extra = tmp_path_factory.mktemp("userconf")
    (extra / "hardware").mkdir()
    (extra / "hardware" / "mydevice.yaml").write_text(
        "# a user's device\nname: mydevice\nr_on: 50.0e3\nr_off: 5.0e6\nc2c: 0.0\nd2d: 0.0\n")
    proc = run_cli(["experiment=smoke", f"hydra.searchpath=[file://{extra}]", "hardware=mydevice"], cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = _runs(_client(workdir))
    assert run.data.params["hardware.r_off"] == "5000000.0" and run.data.tags["hardware"] == "mydevice"
    # no variation on this device: every chip is the nominal one
    m = run.data.metrics
    assert m["test/acc_xbar_std"] == 0.0 and m["test/acc_xbar_mean"] == m["test/acc_xbar_nominal"]


def test_user_device_with_missing_key_is_rejected(workdir, tmp_path_factory):
    extra = tmp_path_factory.mktemp("userconf")
    (extra / "hardware").mkdir()
    (extra / "hardware" / "bad.yaml").write_text("name: bad\nr_on: 50.0e3\nc2c: 0.0\nd2d: 0.0\n")
    proc = run_cli(["experiment=smoke", f"hydra.searchpath=[file://{extra}]", "hardware=bad"], cwd=workdir)
    assert proc.returncode != 0
    assert "hardware.r_off" in proc.stderr
    assert not (workdir / "mlflow.db").exists()


def test_upload_after_a_lost_store_finishes_the_sweep_parent(workdir):
    """A sweep whose store went away: uploading its jobs ends the parent with the summary, in the
    same store (the server came back) or in another one (a new parent), and uploading twice
    doubles nothing."""
    import sys

    sys.path.insert(0, str(REPO / "scripts"))
    import upload_run

    proc = run_cli(["-m", "experiment=smoke", "dataset=digits", "trainer.limit_train_batches=2", "eval.n_chips=1",
                    "seed=0,1"], cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (parent_file,) = workdir.glob("multirun/*/*/mlflow_parent.json")
    sweep_dir = parent_file.parent
    jobs = [str(sweep_dir / "0"), str(sweep_dir / "1")]
    original = json.loads(parent_file.read_text())["run_id"]
    # a third job, rejected before it made a run (as when the store was already gone at its start)
    from xbarflow import tracking

    (sweep_dir / "2").mkdir()
    overrides = json.loads((sweep_dir / "0" / "tracking" / "run.json").read_text())["tags"]["overrides"]
    tracking.record_failure(str(sweep_dir), 2, overrides.replace("seed=0", "seed=2"),
                            "rejected: tracking server unreachable")
    jobs.append(str(sweep_dir / "2"))

    # only one job uploaded: the other store gets no parent yet
    partial = f"sqlite:///{workdir / 'partial.db'}"
    assert upload_run.main([jobs[0], "--tracking-uri", partial]) == 0
    client = MlflowClient(partial)
    assert [r.data.tags.get("sweep") for r in _runs(client)] == [None]

    # every job into a store that never saw the sweep: a new parent with the summary, the jobs under it
    other = f"sqlite:///{workdir / 'other.db'}"
    for _ in range(2):  # twice: the second upload finds the runs of the first
        assert upload_run.main([*jobs, "--tracking-uri", other]) == 0
        client = MlflowClient(other)
        runs = _runs(client)
        (parent,) = [r for r in runs if r.data.tags.get("sweep") == "parent"]
        children = [r for r in runs if r is not parent]
        assert len(children) == 2 and parent.data.tags["uploaded_from"] == original
        assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parent.info.run_id}
        assert parent.info.status == "FAILED" and parent.data.tags["n_jobs"] == "3"  # the rejected job counts
        assert parent.data.tags["n_failed"] == "1" and parent.info.run_name == "smoke: seed"
        rows = open(client.download_artifacts(parent.info.run_id, "sweep_summary.csv", str(workdir))).read()
        assert rows.splitlines()[0].startswith("job,status,seed") and len(rows.splitlines()) == 4
        assert rows.splitlines()[3].startswith("2,REJECTED,2")

    # the sweep's own store, as a server that came back finds it: the parent still RUNNING
    own = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    own.update_run(original, "RUNNING")
    own.set_tag(original, "n_jobs", "unknown")
    assert upload_run.main(jobs) == 0
    runs = _runs(own)
    assert len(runs) == 3 and own.get_run(original).info.status == "FAILED"
    assert own.get_run(original).data.tags["n_jobs"] == "3"


def test_sweep_figure_orders_numbers_and_takes_a_row_without_the_swept_key():
    from xbarflow.tracking import SECTION8, sweep_figure

    def row(job, **kw):
        return {"job": job, "status": "FINISHED", **kw, **{m: 90.0 + job for m in SECTION8}}

    rows = [row(0, **{"xbar.size": "128"}), row(1, **{"xbar.size": "64"}), row(2, **{"xbar.size": "oops"}),
            {**row(3), "status": "REJECTED"}]  # a rejected job whose overrides lack the key
    fig = sweep_figure(rows)
    line = fig.axes[0].lines[0]
    assert [str(x) for x in line.get_xdata()] == ["64.0", "128.0", "None", "oops"]
    assert list(line.get_ydata()) == [91.0, 90.0, 93.0, 92.0]
