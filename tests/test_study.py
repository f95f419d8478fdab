"""scripts/study.py: the ResNet study's plan expands into resumable cells that start from the right weights."""
import importlib.util
import json
import os
import sys

import pytest
import yaml
from conftest import REPO

spec = importlib.util.spec_from_file_location("study", REPO / "scripts" / "study.py")
study = importlib.util.module_from_spec(spec)
sys.modules["study"] = study  # dataclasses look their module up
spec.loader.exec_module(study)
PLAN = yaml.safe_load((REPO / "results" / "resnet_fashion" / "plan.yaml").read_text())


def test_plan_expands_to_every_cell_of_the_issue():
    cells = {c.name: c for c in study.cells(PLAN)}
    # the software network, then 2 arrays x 2 non-ideality sets x 3 strategies x 2 BatchNorm options,
    # then the ablations of 2 cells (a reference, 7 effect groups switched off, a remedy switched on, read at t0
    # and over time, and with programming variation off too)
    assert len(cells) == 1 + 2 * 2 * 3 * 2 + 2 * 11 + 2 * 4  # + seeds 1, 2 of 3 cells and their software network
    assert cells["software"].overrides == ["training=standard"] and cells["software"].needs is None
    ta = cells["tech_aware-256-full_wire-bn_chip"]
    assert ta.how == "train" and ta.needs == "software"
    assert {"training=tech_aware", "xbar.size=256", "nonideality=full", "xbar.r_wire=2.5",
            "eval.bn_recalibration=chip"} <= set(ta.overrides)
    # a fine-tune the machine cannot give in full runs reduced (plan key `reduced`), and only that one
    assert "trainer.limit_train_batches=0.25" in ta.overrides
    assert not any("limit_train_batches" in o for c in cells.values() if c.name != ta.name for o in c.overrides)
    # the other BatchNorm option reads the fine-tuned weights, the standard cells the software network's
    assert cells["tech_aware-256-full_wire-bn_none"].needs == "tech_aware-256-full_wire-bn_chip"
    assert cells["tech_aware-256-full_wire-bn_none"].how == "evaluate"
    assert cells["standard-64-paper-bn_chip"].needs == "software"
    assert cells["standard-64-paper-bn_chip"].how == "evaluate"


def _fake_runs(monkeypatch, study_dir):
    """Replace run.py jobs by a stub that records the command and leaves run id ``c...c`` in the cell's folder."""
    calls = []

    def fake_call(args, **kw):
        calls.append(args)
        folder = study_dir / next(a for a in args if a.startswith("run_name=")).split("=", 1)[1]
        (folder / "mlflow_run.json").write_text(json.dumps({"run_id": "c" * 32}))
        return 0

    monkeypatch.setattr(study.subprocess, "call", fake_call)
    return calls


def test_done_cells_skipped_stopped_ones_resumed_and_sources_resolved(tmp_path, monkeypatch):
    plan = {**PLAN, "tiles": {"64": ["xbar.size=64"]}, "nonidealities": {"paper": ["nonideality=paper"]},
            "strategies": {"standard": None, "tech_aware": ["training=tech_aware"]}, "ablations": None,
            "seeds": None}
    (tmp_path / "software").mkdir()
    (tmp_path / "software" / "DONE").write_text("1 s\n")
    (tmp_path / "software" / "mlflow_run.json").write_text(json.dumps({"run_id": "a" * 32}))
    stopped = tmp_path / "tech_aware-64-paper-bn_chip"
    stopped.mkdir()
    (stopped / "mlflow_run.json").write_text(json.dumps({"run_id": "b" * 32}))
    calls = _fake_runs(monkeypatch, tmp_path)
    plan_file = tmp_path / "plan.yaml"
    plan_file.write_text(yaml.safe_dump(plan))
    assert study.main([str(plan_file), "--dir", str(tmp_path)]) == 0
    names = [next(a for a in c if a.startswith("run_name=")).split("=")[1] for c in calls]
    assert names == ["standard-64-paper-bn_chip", "standard-64-paper-bn_none",
                     "tech_aware-64-paper-bn_chip", "tech_aware-64-paper-bn_none"]  # software is done
    assert f"source={'a' * 32}" in calls[0] and "mode=evaluate" in calls[0]
    assert f"training.init_from={tmp_path / 'software' / 'weights.pt'}" in calls[2] and "resume=true" in calls[2]
    assert f"source={'c' * 32}" in calls[3]
    assert all((tmp_path / n / "DONE").exists() for n in names)
    calls.clear()
    assert study.main([str(plan_file), "--dir", str(tmp_path)]) == 0 and calls == []  # all done: nothing reruns


def _small_plan(tmp_path, **extra):
    plan = {**PLAN, "tiles": {"64": ["xbar.size=64"]}, "nonidealities": {"paper": ["nonideality=paper"]},
            "strategies": {"standard": None, "tech_aware": ["training=tech_aware"]}, "ablations": None,
            "seeds": None, **extra}
    plan_file = tmp_path / "plan.yaml"
    plan_file.write_text(yaml.safe_dump(plan))
    return plan, plan_file


def _row(cell, acc, run="d"):
    return {"cell": cell, "run_id": run * 32, "commit": "0" * 40, "n_images": 10000, "n_chips": 2,
            "command": "run.py ...", "acc_software": 92.5, "acc_xbar_nominal": acc, "acc_xbar_mean": acc,
            "acc_xbar_std": 0.1, "acc_xbar_min": acc - 0.1, "se": 0.3, "chips": [acc + 0.1, acc - 0.1],
            **({} if cell == "software" else dict(zip(("strategy", "tile", "nonideality", "bn"),
                                                      [*cell.split("-")[:3], cell.split("-")[3][3:]], strict=True)))}


def test_a_new_machine_continues_the_study_from_the_record(tmp_path, monkeypatch, capsys):
    """The study folder is gone (a new machine); the committed record holds the rows measured so far and
    the software network: recorded cells are not run again, the others start from the committed network."""
    import torch
    from safetensors.torch import save_file

    plan, plan_file = _small_plan(tmp_path, networks="networks")
    record, study_dir = tmp_path / "record", tmp_path / "study"
    net = record / "networks" / "software"
    net.mkdir(parents=True)
    (net / "card.json").write_text("{}")
    save_file({"w": torch.zeros(2)}, str(net / "weights.safetensors"))
    # the fine-tune's row is recorded, but not its network: its evaluations need the weights, so it runs again
    (record / "report.json").write_text(json.dumps({"software": 92.5, "cells": [
        _row("software", 10.0), _row("standard-64-paper-bn_chip", 90.3), _row("tech_aware-64-paper-bn_chip", 91.8)]}))
    calls = _fake_runs(monkeypatch, study_dir)
    argv = [str(plan_file), "--dir", str(study_dir), "--record", str(record)]
    assert study.main([*argv, "--list"]) == 0
    states = {line.split()[0]: line.split()[1] for line in capsys.readouterr().out.splitlines()}
    assert states == {"software": "recorded", "standard-64-paper-bn_chip": "recorded",
                      "standard-64-paper-bn_none": "to", "tech_aware-64-paper-bn_chip": "to",
                      "tech_aware-64-paper-bn_none": "to"}
    assert study.main(argv) == 0
    names = [next(a for a in c if a.startswith("run_name=")).split("=")[1] for c in calls]
    assert names == ["standard-64-paper-bn_none", "tech_aware-64-paper-bn_chip", "tech_aware-64-paper-bn_none"]
    assert f"source={net}" in calls[0] and "mode=evaluate" in calls[0]
    assert f"training.init_from={net / 'weights.safetensors'}" in calls[1]
    assert f"source={'c' * 32}" in calls[2]  # the fine-tune just done in this study
    calls.clear()
    assert study.main([*argv, "--rerun", "--only", "software"]) == 0 and len(calls) == 1  # reproduce on request


def test_a_report_on_a_new_machine_keeps_the_recorded_rows(tmp_path, monkeypatch):
    plan, _ = _small_plan(tmp_path)
    out = tmp_path / "record"
    out.mkdir()
    (out / "report.json").write_text(json.dumps({"software": 92.5, "cells": [
        _row("software", 10.0), _row("standard-64-paper-bn_chip", 90.3), _row("tech_aware-64-paper-bn_chip", 91.8)]}))
    # the new store holds one cell measured again (it replaces the recorded row) and one new cell
    fresh = [_row("tech_aware-64-paper-bn_chip", 91.6, run="e"), _row("tech_aware-64-paper-bn_none", 89.2, run="f")]
    monkeypatch.setattr(study, "collect", lambda *a, **k: fresh)
    assert study.report(plan, tmp_path / "study", "sqlite:///x.db", out) == 0
    rows = {r["cell"]: r for r in json.loads((out / "report.json").read_text())["cells"]}
    assert list(rows) == ["software", "standard-64-paper-bn_chip", "tech_aware-64-paper-bn_chip",
                          "tech_aware-64-paper-bn_none"]  # plan order
    assert rows["tech_aware-64-paper-bn_chip"]["run_id"] == "e" * 32  # measured again: the new row
    assert rows["standard-64-paper-bn_chip"]["acc_xbar_mean"] == 90.3  # only recorded: kept
    table = (out / "report.md").read_text()
    assert "| tech_aware | 64x64 | paper | none | 89.20 |" in table and "| standard | 64x64 | paper | chip | 90.30 |" in table


def test_a_failed_cell_leaves_its_dependants_undone(tmp_path, monkeypatch):
    plan = {**PLAN, "tiles": {"64": ["xbar.size=64"]}, "nonidealities": {"paper": ["nonideality=paper"]},
            "strategies": {"tech_aware": ["training=tech_aware"]}, "ablations": None, "seeds": None}
    monkeypatch.setattr(study.subprocess, "call", lambda args, **kw: 1)
    plan_file = tmp_path / "plan.yaml"
    plan_file.write_text(yaml.safe_dump(plan))
    assert study.main([str(plan_file), "--dir", str(tmp_path)]) == 1
    assert not any(tmp_path.glob("*/DONE"))


@pytest.mark.parametrize("pattern,expected", [("software", 1), ("*-64-paper-*", 6 + 6), ("tech_aware-*", 8 + 2 * 11 + 2),
                                              ("*.no_*", 2 * 7), ("*.with_*", 2 * 3)])
def test_only_selects_cells_by_name(tmp_path, capsys, pattern, expected):
    assert study.main([str(REPO / "results" / "resnet_fashion" / "plan.yaml"), "--dir", str(tmp_path),
                       "--record", str(tmp_path), "--only", pattern, "--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == expected and all(line.split()[1] == "to" for line in lines)  # "to do"


def test_ablations_read_the_cells_weights_with_one_effect_off_at_t0():
    cells = {c.name: c for c in study.cells(PLAN)}
    base = "tech_aware-64-full_wire-bn_chip"
    ablations = [c for c in cells.values() if c.tags.get("ablation_of") == base]
    assert {c.tags["effect_off"] for c in ablations} == {"all_on", "no_wire", "no_source_sink",
                                                         "no_programming_variation", "no_read_noise", "no_stuck",
                                                         "no_levels", "no_converters",
                                                         "with_stuck_compensation",
                                                         "with_stuck_compensation_over_time",
                                                         "with_stuck_compensation_and_no_programming_variation"}
    ref = cells[f"{base}.all_on"]
    # the fine-tuned weights, evaluated: the cell's hardware, no training overrides, t0 only
    assert ref.how == "evaluate" and ref.needs == base
    assert ref.overrides == ["xbar.size=64", "nonideality=full", "xbar.r_wire=2.5", "eval.bn_recalibration=chip",
                             "eval.times=[]", "eval.source_periphery=keep"]
    assert cells[f"{base}.no_wire"].overrides == [*ref.overrides, "nonideality.r_wire=false"]
    assert cells[f"{base}.no_converters"].overrides == [*ref.overrides, "nonideality.dac=false",
                                                        "nonideality.adc=false"]
    assert cells[f"{base}.with_stuck_compensation"].overrides == [*ref.overrides, "xbar.stuck_compensation=true"]
    # a remedy that sets eval.times itself is read at those times: its setting replaces the ablations' t0 only
    later = cells[f"{base}.with_stuck_compensation_over_time"].overrides
    assert [o for o in later if o.startswith("eval.times=")] == ["eval.times=[86400.0,31536000.0]"]
    assert "xbar.stuck_compensation=true" in later and "eval.source_periphery=keep" in later
    # the ablation of an evaluation-only cell reads the weights that cell reads
    plan = {**PLAN, "ablations": {**PLAN["ablations"], "cells": ["standard-64-full_wire-bn_chip"]}}
    std = {c.name: c for c in study.cells(plan)}["standard-64-full_wire-bn_chip.no_wire"]
    assert std.needs == "software" and std.how == "evaluate"


def test_ablation_table_gives_a_remedy_read_over_time_its_later_reads():
    rows = [{"cell": "b.all_on", "ablation_of": "b", "effect_off": "all_on", "acc_xbar_nominal": 90.0,
             "acc_xbar_mean": 86.0, "acc_xbar_min": 85.0, "se": 0.5, "chips": [86.0, 86.0]},
            {"cell": "b.with_fix_over_time", "ablation_of": "b", "effect_off": "with_fix_over_time",
             "acc_xbar_nominal": 90.0, "acc_xbar_mean": 89.0, "acc_xbar_min": 88.5, "se": 0.4, "chips": [89.0, 89.0],
             "mean_1 day": 88.8, "min_1 day": 88.1, "mean_1 year": 88.2, "min_1 year": 87.0}]
    lines = study.ablation_table(rows, 92.0)
    (line,) = [line for line in lines if "read later" in line]
    assert "1 day: 88.80 (88.10), gap to software 3.20" in line and "1 year: 88.20 (87.00), gap to software 3.80" in line


def test_ablation_table_measures_gains_against_the_reference():
    def row(effect, chips, worst):
        return {"cell": f"b.{effect}", "ablation_of": "b", "effect_off": effect, "acc_xbar_nominal": 90.0,
                "acc_xbar_mean": sum(chips) / len(chips), "acc_xbar_min": worst, "se": 0.3, "chips": chips}
    # per-chip gains 2.0, 2.5, 3.0: mean 2.5, paired SE 0.5 / sqrt(3) = 0.29; bound hypot(0.3, 0.3) = 0.42
    lines = study.ablation_table([row("all_on", [88.0, 87.5, 87.0], 85.0), row("no_wire", [90.0, 90.0, 90.0], 89.0)],
                                 software=92.5)
    body = [line for line in lines if line.startswith("| wire") or line.startswith("| all_on")]
    assert body == ["| all_on | 90.00 | 87.50 (85.00) | 0.30 | +0.00 | 0.00 | 0.00 | 5.00 |",
                    "| wire | 90.00 | 90.00 (89.00) | 0.30 | +2.50 | 0.29 | 0.42 | 2.50 |"]
    # without the reference run, the trained cell's own evaluation is the reference (no chips: no pairing)
    lines = study.ablation_table([{"cell": "b", "acc_xbar_mean": 87.0, "se": 0.4},
                                  row("no_wire", [90.0, 90.0, 90.0], 89.0)], 92.5)
    assert "| wire | 90.00 | 90.00 (89.00) | 0.30 | +3.00 | nan | 0.50 | 2.50 |" in lines


def test_strategy_difference_is_paired_over_chips():
    def row(strategy, chips, se):
        mean = sum(chips) / len(chips)
        return {"strategy": strategy, "tile": "64", "nonideality": "full_wire", "bn": "chip", "acc_xbar_mean": mean,
                "chips": chips, "se": se}
    rows = [row("noise_aware", [85.0, 86.0, 82.0], 0.7), row("tech_aware", [87.0, 88.5, 85.0], 0.7)]
    (line,) = [line for line in study.strategy_differences(rows, "tech_aware", "noise_aware") if "full_wire" in line]
    # differences 2.0, 2.5, 3.0: mean 2.5, stdev 0.5, paired SE 0.5 / sqrt(3); bound hypot(0.7, 0.7)
    assert line == "| 64x64 | full_wire | chip | +2.50 | 0.29 | 0.99 | 3 of 3 |"
    assert study.strategy_differences(rows[:1], "tech_aware", "noise_aware") == []  # nothing to compare


def test_seed_replicates_are_whole_chains_with_their_own_weights():
    cells = {c.name: c for c in study.cells(PLAN)}
    reps = {n: c for n, c in cells.items() if "seed_of" in c.tags}
    # seeds 1 and 2 of the three 64x64 paper cells with per-chip BN, and of the software network they need
    assert sorted(reps) == sorted(f"{n}.seed{s}" for s in (1, 2) for n in (
        "software", "standard-64-paper-bn_chip", "noise_aware-64-paper-bn_chip", "tech_aware-64-paper-bn_chip"))
    ta = reps["tech_aware-64-paper-bn_chip.seed1"]
    assert ta.overrides == [*cells["tech_aware-64-paper-bn_chip"].overrides, "seed=1"]
    assert ta.needs == "software.seed1" and ta.how == "train"
    assert reps["standard-64-paper-bn_chip.seed2"].needs == "software.seed2"
    assert reps["software.seed2"].needs is None and reps["software.seed2"].overrides == ["training=standard", "seed=2"]
    # a replicate's software network is trained before what needs it
    order = [c.name for c in study.cells(PLAN)]
    assert order.index("software.seed1") < order.index("tech_aware-64-paper-bn_chip.seed1")


def test_seed_table_gives_the_spread_over_seeds_and_the_per_seed_difference():
    def row(cell, acc, seed=None):
        r = {"cell": cell if seed is None else f"{cell}.seed{seed}", "acc_xbar_mean": acc}
        return r if seed is None else {**r, "seed_of": cell, "seed": seed}
    rows = [row("tech_aware-64-paper-bn_chip", 92.0), row("tech_aware-64-paper-bn_chip", 91.0, 1),
            row("tech_aware-64-paper-bn_chip", 93.0, 2), row("standard-64-paper-bn_chip", 90.0),
            row("standard-64-paper-bn_chip", 90.5, 1), row("standard-64-paper-bn_chip", 89.5, 2)]
    lines = study.seed_table(rows, [("tech_aware", "standard")])
    assert "| tech_aware-64-paper-bn_chip | 0, 1, 2 | 92.00, 91.00, 93.00 | 92.00 | 1.00 |" in lines
    # per-seed differences 2.0, 0.5, 3.5: mean 2.0, SE 1.5 / sqrt(3) = 0.87
    assert "| 64-paper-bn_chip | tech_aware against standard | 3 | +2.00 | 0.87 |" in lines
    # a seed missing on one side: no difference row
    assert not any("against" in line for line in study.seed_table(rows[:-1], [("tech_aware", "standard")]))


def test_seed_table_reads_the_software_networks_digital_accuracy():
    rows = [{"cell": "software", "acc_software": 92.52, "acc_xbar_mean": 10.0},
            {"cell": "software.seed1", "seed_of": "software", "seed": 1, "acc_software": 92.55, "acc_xbar_mean": 10.01}]
    lines = study.seed_table(rows, [])
    assert "| software | 0, 1 | 92.52, 92.55 | 92.53 | 0.02 |" in lines


# MLflow's SQL store, used in this process, configures SQLAlchemy mappers with a deprecated option
@pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated")
def test_networks_exported_and_a_new_machine_reads_them_to_the_same_numbers(tmp_path, monkeypatch, capsys):
    """End to end on the smoke experiment: a study trains its software network and reads it on one
    array; its network is exported beside the report; a new study folder (another machine) runs the
    recorded evaluation again from the committed network, and gets the same accuracies."""
    plan = {"experiment": "smoke", "software": ["training=standard", "dataset=digits"], "networks": "networks",
            "tiles": {"16": ["xbar.size=16", "dataset=digits"]}, "nonidealities": {"paper": ["nonideality=paper"]},
            "strategies": {"standard": None}, "bn_recalibration": ["none"]}
    record = tmp_path / "record"
    record.mkdir()
    plan_file = record / "plan.yaml"
    plan_file.write_text(yaml.safe_dump(plan))

    def run(*args):
        assert study.main([str(plan_file), *args]) == 0

    monkeypatch.chdir(tmp_path)
    first = tmp_path / "first"
    run("--dir", str(first))
    run("--dir", str(first), "--report", str(record))
    import mlflow

    unset_before = not mlflow.tracking.is_tracking_uri_set()
    run("--dir", str(first), "--export-networks")
    # fetching the logged models left MLflow's global tracking URI as it found it (pinning it would send
    # a later run of this process, or a subprocess through MLFLOW_TRACKING_URI, into this study's store)
    assert not unset_before or (not mlflow.tracking.is_tracking_uri_set() and "MLFLOW_TRACKING_URI" not in os.environ)
    net = record / "networks" / "software"
    assert sorted(p.name for p in net.iterdir()) == ["card.json", "run.json", "weights.safetensors"]
    before = {r["cell"]: r for r in json.loads((record / "report.json").read_text())["cells"]}
    assert set(before) == {"software", "standard-16-paper-bn_none"}
    # the report gives a trained cell's command as first given, not the command that would resume it
    assert before["software"]["command"].endswith("run_name=software") and "resume" not in before["software"]["command"]
    # a new machine: the study folder is empty, nothing is left to run ...
    second = tmp_path / "second"
    run("--dir", str(second), "--list")
    assert "recorded" in capsys.readouterr().out
    # ... unless asked to reproduce: the evaluation reads the committed network, not a run of this store
    run("--dir", str(second), "--rerun", "--only", "standard-16-*")
    run("--dir", str(second), "--report", str(record))
    after = {r["cell"]: r for r in json.loads((record / "report.json").read_text())["cells"]}
    again, old = after["standard-16-paper-bn_none"], before["standard-16-paper-bn_none"]
    assert again["run_id"] != old["run_id"] and f"source={net}" in again["command"]
    # the same weights, chips and test images through the same code: the same accuracies
    assert again["chips"] == old["chips"] and again["acc_xbar_nominal"] == old["acc_xbar_nominal"]
    assert after["software"] == before["software"]  # kept from the record
