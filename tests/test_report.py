"""scripts/report.py on a small fake sweep in a temporary MLflow SQLite store: accuracy against energy
per image (issue 29) and its Pareto front."""
import json
import sys

import pytest
from conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))
import report  # noqa: E402


def test_pareto_front_by_hand():
    pts = [(10.0, 90.0),   # 0: cheapest, on the front
           (10.0, 85.0),   # 1: same energy as 0, less accurate: dominated on one axis only
           (20.0, 92.0),   # 2: on the front
           (30.0, 92.0),   # 3: as accurate as 2, more energy: dominated on one axis only
           (25.0, 91.0),   # 4: dominated by 2 on both axes
           (40.0, 95.0),   # 5: most accurate, on the front
           (40.0, 95.0),   # 6: equal to 5: neither dominates the other
           (5.0, 50.0)]    # 7: cheapest of all, worst: on the front
    assert report.pareto_front(pts) == [7, 0, 2, 5, 6]
    assert report.pareto_front([]) == []
    assert report.pareto_front([(1.0, 1.0)]) == [0]
    # one point better on both axes takes the whole front
    assert report.pareto_front([(3.0, 80.0), (1.0, 99.0), (2.0, 90.0)]) == [1]


def _fake_sweep(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("fake", artifact_location=str(tmp_path / "artifacts"))
    parent = client.create_run(exp, tags={"sweep": "parent", "overrides": "xbar.size=64,784 training=standard,tech_aware"})
    # (size, adc bits, mode, accuracy, energy pJ per image or None: a run from before issue 29)
    jobs = [(64, 8, "standard", 90.5, 113e3), (64, 8, "tech_aware", 92.9, 115e3),
            (784, 8, "standard", 11.0, 11.8e3), (784, 8, "tech_aware", 93.3, 13.7e3),
            (784, 6, "tech_aware", 93.3, 9.0e3), (64, 6, "standard", 90.0, None)]
    ids = {}
    for size, bits, mode, acc, energy in jobs:
        run = client.create_run(exp, tags={"mlflow.parentRunId": parent.info.run_id, "git_commit": "abc"})
        rid = run.info.run_id
        rows, cols = ("784", "500") if size == 784 else ("None", "None")
        for k, v in {"dataset.name": "mnist5k", "training.mode": mode, "xbar.size": "64" if size == 784 else str(size),
                     "xbar.rows": rows, "xbar.cols": cols, "xbar.adc_bits": str(bits)}.items():
            client.log_param(rid, k, v)
        metrics = {"test/acc_software": 92.3, "test/acc_xbar_nominal": acc, "test/acc_xbar_mean": acc,
                   "test/acc_xbar_std": 0.2, "test/acc_xbar_min": acc - 0.3, "test/n_images": 1000}
        if energy is not None:
            metrics["energy/total_pj_per_image"] = energy
        for k, v in metrics.items():
            client.log_metric(rid, k, v)
        client.set_terminated(rid)
        ids[(size, bits, mode)] = rid
    client.set_terminated(parent.info.run_id)
    return uri, client, parent.info.run_id, ids


def test_report_draws_accuracy_against_energy_with_the_front(tmp_path, capsys):
    uri, client, parent_id, ids = _fake_sweep(tmp_path)
    out = tmp_path / "report"
    assert report.main(["--experiment", "fake", "--out", str(out), "--tracking-uri", uri]) == 0
    png = out / "accuracy_vs_energy.png"
    assert png.stat().st_size > 10_000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the run without energy is left out, with a note; the others are on the figure
    printed = capsys.readouterr().out
    assert "1 of 6 runs have no energy/total_pj_per_image" in printed and "64x64 standard" in printed
    summary = json.loads((out / "report.json").read_text())
    assert "energy_note" in summary
    # the front: 784x500 tech_aware 6-bit (cheapest, as accurate as the 8-bit one, which it dominates on
    # energy only), then nothing until 64x64 is not more accurate than 93.3: the front is one point
    front = [(p["array"], p["adc_bits"], p["mode"]) for p in summary["pareto"]]
    assert front == [("784x500", "6", "tech_aware")]
    assert summary["pareto"][0]["run_id"] == ids[(784, 6, "tech_aware")]
    assert summary["pareto"][0]["energy_pj_per_image"] == pytest.approx(9.0e3)
    # the report's other outputs are unchanged, and everything is logged to the parent
    assert (out / "accuracy_vs_array.png").exists() and (out / "report.md").exists()
    logged = {a.path for a in client.list_artifacts(parent_id, "report")}
    assert "report/accuracy_vs_energy.png" in logged


def test_report_front_with_a_trade_off(tmp_path):
    """Cheaper but less accurate is on the front; cheaper and more accurate dominates."""
    uri, client, parent_id, ids = _fake_sweep(tmp_path)
    # a dearer, more accurate run: a trade-off against the 6-bit 784x500 one
    exp = client.get_run(parent_id).info.experiment_id
    run = client.create_run(exp, tags={"mlflow.parentRunId": parent_id})
    for k, v in {"dataset.name": "mnist5k", "training.mode": "tech_aware", "xbar.size": "256", "xbar.rows": "None",
                 "xbar.cols": "None", "xbar.adc_bits": "8"}.items():
        client.log_param(run.info.run_id, k, v)
    for k, v in {"test/acc_software": 92.3, "test/acc_xbar_nominal": 94.0, "test/acc_xbar_mean": 94.0,
                 "test/acc_xbar_std": 0.2, "test/acc_xbar_min": 93.7, "energy/total_pj_per_image": 35e3}.items():
        client.log_metric(run.info.run_id, k, v)
    client.set_terminated(run.info.run_id)
    out = tmp_path / "report"
    assert report.main(["--experiment", "fake", "--out", str(out), "--tracking-uri", uri, "--no-log"]) == 0
    summary = json.loads((out / "report.json").read_text())
    assert [(p["array"], p["adc_bits"]) for p in summary["pareto"]] == [("784x500", "6"), ("256x256", "8")]
    assert (out / "accuracy_vs_energy.png").stat().st_size > 10_000


def test_report_without_any_energy_skips_the_figure_with_a_note(tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("old", artifact_location=str(tmp_path / "artifacts"))
    parent = client.create_run(exp, tags={"sweep": "parent"})
    for mode in ("standard", "tech_aware"):
        rid = client.create_run(exp, tags={"mlflow.parentRunId": parent.info.run_id}).info.run_id
        for k, v in {"dataset.name": "mnist5k", "training.mode": mode, "xbar.size": "64"}.items():
            client.log_param(rid, k, v)
        for k in ("test/acc_software", "test/acc_xbar_nominal", "test/acc_xbar_mean", "test/acc_xbar_std",
                  "test/acc_xbar_min"):
            client.log_metric(rid, k, 90.0)
        client.set_terminated(rid)
    out = tmp_path / "report"
    assert report.main(["--experiment", "old", "--out", str(out), "--tracking-uri", uri, "--no-log"]) == 0
    assert not (out / "accuracy_vs_energy.png").exists() and (out / "accuracy_vs_array.png").exists()
    printed = capsys.readouterr().out
    assert "2 of 2 runs have no energy/total_pj_per_image" in printed and "not drawn" in printed
