"""End-to-end runs through run.py, read back from MLflow."""
import json

from conftest import REPO, run_cli


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
