"""Paper-style report of a sweep, read back from MLflow.

    python scripts/report.py --experiment paper_fcn --out results/paper_fcn
    python scripts/report.py --parent <run_id> --out results/x --tracking-uri sqlite:///mlflow.db

Writes into ``--out``: one PNG per swept quantity (crossbar accuracy against crossbar
size, resistance or variation sigma; one line per training mode, the software accuracy as
reference, the spread over chips shaded), ``report.md`` (a table of every job) and
``report.json`` (the same numbers, plus the largest configuration's ``ideal_acc``,
``standard_xbar_acc``, ``tech_aware_xbar_acc``, ``degradation`` and ``gap``, in points), and
``accuracy_vs_energy.png``: crossbar accuracy (mean over chips, the std over chips as error
bars) against the energy per image (``energy/total_pj_per_image``, log scale), coloured by
training mode, marked by array size, labeled with the array (and the ADC bits where the sweep
varies them), with each dataset's Pareto front (least energy, highest accuracy; listed in
report.json under ``pareto``). Runs without the energy metric are left out of that figure with
a note. Everything is also logged to the sweep's parent run under ``report/``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from xbarflow.tracking import SECTION8, TrackingStoreError, check_store, client_for, redact  # noqa: E402

ENERGY = "energy/total_pj_per_image"  # model note, section 10


def _has_energy(r: Dict[str, Any]) -> bool:
    """Whether a run logged a usable energy per image (runs before issue 29 have none)."""
    return isinstance(r.get(ENERGY), float) and math.isfinite(r[ENERGY]) and r[ENERGY] > 0

# The quantity a sweep varies, in order of preference, and how to read it from a run's params.
AXES = {
    "array": ("crossbar array (rows x cols)", lambda p: _array(p)),
    "r_source": ("R_source = R_sink (ohm)", lambda p: float(p["xbar.r_source"])),
    "r_sink": ("R_sink (ohm)", lambda p: float(p["xbar.r_sink"])),
    "c2c": ("chip variation sigma (c2c)", lambda p: float(p["hardware.c2c"])),
    "d2d": ("device-to-device sigma (d2d)", lambda p: float(p["hardware.d2d"])),
    "r_wire": ("R_wire per segment (ohm)", lambda p: float(p["xbar.r_wire"])),
}


def _array(p: Dict[str, str]):
    rows = p.get("xbar.rows", "None")
    cols = p.get("xbar.cols", "None")
    size = int(p["xbar.size"])
    rows = size if rows in ("None", "null") else int(rows)
    cols = size if cols in ("None", "null") else int(cols)
    return (rows, cols)


def _label(axis: str, v) -> str:
    if axis == "array":
        return f"{v[0]}x{v[1]}"
    return f"{v:g}"


def _sort_key(axis: str, v):
    return v[0] * v[1] if axis == "array" else v


def collect(client, parent_ids: List[str], series: List[str] = (), where: Dict[str, str] = None,
            extra: List[str] = ()) -> List[Dict[str, Any]]:
    """Finished child runs of the given sweeps; a later sweep's run replaces an earlier one
    of the same dataset, configuration and training mode.

    ``series``: params whose values split the runs into separate lines (joined to the dataset's
    name, e.g. ``mnist5k/learned``); ``where``: keep only runs whose params have these values."""
    runs = []
    for parent_id in parent_ids:
        parent = client.get_run(parent_id)
        runs += client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'",
                                   max_results=10000)
    runs.sort(key=lambda r: r.info.start_time)
    rows = []
    for r in runs:
        if r.info.status != "FINISHED":
            continue
        params = dict(r.data.params)
        if any(params.get(k) != v for k, v in (where or {}).items()):
            continue
        name = "/".join([params.get("dataset.name", "")] + [params.get(k, "?") for k in series])
        row = {"run_id": r.info.run_id, "params": params, "mode": params["training.mode"], "dataset": name,
               "commit": r.data.tags.get("git_commit"), "n_test": r.data.metrics.get("test/n_images")}
        row.update({m: r.data.metrics.get(m, float("nan")) for m in (*SECTION8, *extra)})
        rows.append(row)
    return rows


def dedupe(rows: List[Dict[str, Any]], axis: str) -> List[Dict[str, Any]]:
    get = AXES[axis][1]
    latest: Dict[Any, Dict[str, Any]] = {}
    for r in rows:  # in start order: the last one wins
        latest[(r["dataset"], str(get(r["params"])), r["mode"])] = r
    return list(latest.values())


def swept_axis(rows: List[Dict[str, Any]]) -> str:
    for axis, (_, get) in AXES.items():
        try:
            values = {str(get(r["params"])) for r in rows}
        except KeyError:
            continue
        if len(values) > 1:
            return axis
    return "array"


def summarise(rows: List[Dict[str, Any]], axis: str) -> Dict[str, Any]:
    get = AXES[axis][1]
    for r in rows:
        r["x"] = get(r["params"])
        r["x_label"] = _label(axis, r["x"])
    table = sorted(rows, key=lambda r: (r["dataset"], _sort_key(axis, r["x"]), r["mode"]))
    largest = max(rows, key=lambda r: _sort_key(axis, r["x"]))["x"]
    out: Dict[str, Any] = {"axis": axis, "largest": _label(axis, largest), "by_dataset": {}}
    for ds in sorted({r["dataset"] for r in rows}):
        at = {r["mode"]: r for r in rows if r["dataset"] == ds and r["x"] == largest}
        entry: Dict[str, Any] = {}
        if "standard" in at:
            ideal = at["standard"]["test/acc_software"]
            entry["ideal_acc"] = ideal
            entry["standard_xbar_acc"] = at["standard"]["test/acc_xbar_mean"]
            entry["standard_xbar_min"] = at["standard"]["test/acc_xbar_min"]
            entry["degradation"] = ideal - at["standard"]["test/acc_xbar_mean"]
            if "tech_aware" in at:
                entry["tech_aware_xbar_acc"] = at["tech_aware"]["test/acc_xbar_mean"]
                entry["tech_aware_xbar_min"] = at["tech_aware"]["test/acc_xbar_min"]
                entry["tech_aware_software_acc"] = at["tech_aware"]["test/acc_software"]
                entry["gap"] = ideal - at["tech_aware"]["test/acc_xbar_mean"]
        out["by_dataset"][ds] = entry
    # the headline numbers: the default dataset if present, else the first
    main = out["by_dataset"].get("mnist5k") or next(iter(out["by_dataset"].values()), {})
    out.update(main)
    out["jobs"] = [
        {"dataset": r["dataset"], "x": r["x_label"], "mode": r["mode"],
         "crossbar_arrays": _int_or_none(r["params"].get("n_crossbar_arrays")),
         **{m.replace("test/", ""): r[m] for m in SECTION8 + tuple(k for k in r if k.startswith("test/") and k not in SECTION8)},
         **({"energy_pj_per_image": r[ENERGY]} if _has_energy(r) else {})}
        for r in table
    ]
    return out


def _int_or_none(v):
    return int(v) if v not in (None, "", "None") else None


def figure(rows: List[Dict[str, Any]], axis: str, title: str):
    n_lines = len({(r["dataset"], r["mode"]) for r in rows})
    many = n_lines > 3  # the legend goes beside the axes, not over the lines
    fig, ax = plt.subplots(figsize=(11.5, 5.2) if many else (6.4, 4.2))
    colours = {"standard": "tab:red", "tech_aware": "tab:blue", "noise_aware": "tab:green"}
    modes = ["standard", "tech_aware"] + sorted({r["mode"] for r in rows} - {"standard", "tech_aware"})
    order = sorted({r["x"] for r in rows}, key=lambda v: _sort_key(axis, v))
    position = {v: i for i, v in enumerate(order)}
    datasets = sorted({r["dataset"] for r in rows}, key=lambda d: (d != "mnist5k", d))
    markers = dict(zip(datasets, ["o", "s", "D", "^", "P", "X", "*", "h"] * 4, strict=False))
    for ds in datasets:
        for mode in modes:
            rs = sorted((r for r in rows if r["mode"] == mode and r["dataset"] == ds), key=lambda r: _sort_key(axis, r["x"]))
            if not rs:
                continue
            xs = [position[r["x"]] for r in rs] if axis == "array" else [r["x"] for r in rs]
            mean = [r["test/acc_xbar_mean"] for r in rs]
            std = [r["test/acc_xbar_std"] for r in rs]
            lo = [r["test/acc_xbar_min"] for r in rs]
            tag = f"{mode}" + (f" ({ds})" if len({r['dataset'] for r in rows}) > 1 else "")
            c = colours.get(mode, "tab:purple")
            ax.plot(xs, mean, markers[ds] + "-", color=c, label=f"{tag}: crossbar, mean over chips")
            ax.fill_between(xs, [m - s for m, s in zip(mean, std, strict=True)], [m + s for m, s in zip(mean, std, strict=True)],
                            color=c, alpha=0.2)
            ax.plot(xs, lo, "v:", color=c, alpha=0.8, label=f"{tag}: worst chip")
            if mode == "standard":
                suffix = "" if tag == mode else " " + ds
                ax.plot(xs, [r["test/acc_software"] for r in rs], "k--", alpha=0.6, label=f"software (ideal){suffix}")
    if axis == "array":
        ax.set_xticks(range(len(order)), [_label(axis, v) for v in order], rotation=30)
    else:
        ax.set_xscale("log" if axis in ("r_source", "r_sink", "r_wire") and all(r["x"] > 0 for r in rows) else "linear")
    ax.set_xlabel(AXES[axis][0])
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if many:
        ax.legend(fontsize=6.5, loc="upper left", bbox_to_anchor=(1.01, 1.0), ncol=1 if n_lines <= 8 else 2)
    else:
        ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    return fig


def pareto_front(points: List[tuple]) -> List[int]:
    """Indices of the points ``(energy, accuracy)`` no other point dominates, in order of energy.

    A point is dominated when another costs no more energy and is at least as accurate, and is
    better in one of the two (cheaper, or more accurate): a point that only ties another on one
    axis and loses on the other is off the front; two equal points are both on it."""
    front = []
    for i, (e, a) in enumerate(points):
        if not any(e2 <= e and a2 >= a and (e2 < e or a2 > a) for j, (e2, a2) in enumerate(points) if j != i):
            front.append(i)
    return sorted(front, key=lambda i: (points[i][0], -points[i][1]))


def _adc_bits(r: Dict[str, Any]) -> str:
    return r["params"].get("xbar.adc_bits", "?")


def energy_points(rows: List[Dict[str, Any]], axis: str):
    """The runs that have the energy metric, the latest of each (dataset, swept value, array, ADC bits,
    training mode), and a note on the runs without it (None when every run has it)."""
    get = AXES[axis][1]
    has = [r for r in rows if _has_energy(r)]
    latest: Dict[Any, Dict[str, Any]] = {}
    for r in has:  # in start order: the last one wins
        latest[(r["dataset"], str(get(r["params"])), str(_array(r["params"])), _adc_bits(r), r["mode"])] = r
    kept = {id(r) for r in has}
    missing = [r for r in rows if id(r) not in kept]
    note = None
    if missing:
        note = (f"accuracy_vs_energy.png: {len(missing)} of {len(rows)} runs have no {ENERGY} (logged since issue 29)"
                " and are left out: " + ", ".join(f"{r['dataset']} {_label('array', _array(r['params']))} {r['mode']}"
                                                 for r in missing[:8]) + (" ..." if len(missing) > 8 else ""))
    return list(latest.values()), note


def energy_figure(points: List[Dict[str, Any]], axis: str, title: str):
    """Accuracy against energy per image, with each dataset's Pareto front over every configuration
    and training mode of it (the ``--series`` values are choices on the front too); also returns the
    fronts (``[{dataset, series, config, array, adc_bits, mode, energy_pj_per_image, acc_xbar_mean,
    acc_xbar_std, run_id}]``)."""
    colours = {"standard": "tab:red", "tech_aware": "tab:blue", "noise_aware": "tab:green"}
    arrays = sorted({_array(r["params"]) for r in points}, key=lambda v: v[0] * v[1])
    markers = dict(zip(arrays, ["o", "s", "D", "^", "v", "P", "X", "*", "h", "<", ">"] * 4, strict=False))
    several_bits = len({_adc_bits(r) for r in points}) > 1

    def task(r):
        return r["params"].get("dataset.name", "")

    def series(r):
        return r["dataset"][len(task(r)):].lstrip("/")

    tasks = sorted({task(r) for r in points}, key=lambda d: (d != "mnist5k", d))
    several_series = len({series(r) for r in points}) > 1
    fig, ax = plt.subplots(figsize=(9.5, 5.4))
    fronts = []
    for k, ds in enumerate(tasks):
        rs = [r for r in points if task(r) == ds]
        for r in rs:
            c = colours.get(r["mode"], "tab:purple")
            x, y = r[ENERGY] / 1e3, r["test/acc_xbar_mean"]
            ax.errorbar([x], [y], yerr=[r["test/acc_xbar_std"]], fmt=markers[_array(r["params"])], color=c, ms=6,
                        capsize=3, alpha=0.85, mfc="none" if k else c)
            label = _label("array", _array(r["params"])) + (f", {_adc_bits(r)} b" if several_bits else "")
            if axis != "array":
                label += f", {_label(axis, AXES[axis][1](r['params']))}"
            if several_series and series(r):
                label += f", {series(r)}"
            if len(tasks) > 1:
                label += f" ({ds})"
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 3), fontsize=6.5, color=c)
        idx = pareto_front([(r[ENERGY], r["test/acc_xbar_mean"]) for r in rs])
        on = [rs[i] for i in idx]
        ax.plot([r[ENERGY] / 1e3 for r in on], [r["test/acc_xbar_mean"] for r in on], drawstyle="steps-post",
                color="k", ls="-" if k == 0 else ":", lw=1.2, alpha=0.7, zorder=0,
                label="Pareto front" + (f" ({ds})" if len(tasks) > 1 else ""))
        fronts += [{"dataset": ds, "series": series(r), "config": _label(axis, AXES[axis][1](r["params"])),
                    "array": _label("array", _array(r["params"])), "adc_bits": _adc_bits(r), "mode": r["mode"],
                    "energy_pj_per_image": r[ENERGY], "acc_xbar_mean": r["test/acc_xbar_mean"],
                    "acc_xbar_std": r["test/acc_xbar_std"], "run_id": r["run_id"]} for r in on]
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=colours.get(m, "tab:purple"), marker="o", ls="", label=m)
               for m in sorted({r["mode"] for r in points}, key=lambda m: (m != "standard", m != "tech_aware", m))]
    handles += [Line2D([], [], color="0.4", marker=markers[a], ls="", mfc="none", label=_label("array", a)) for a in arrays]
    handles += ax.get_legend_handles_labels()[0]
    ax.set_xscale("log")
    ax.margins(x=0.12)  # room for the labels of the dearest points
    ax.set_xlabel("energy per image (nJ, crossbar layers, log scale)")
    ax.set_ylabel("test accuracy on the crossbar (%, mean ± std over chips)")
    ax.set_title(f"{title}: accuracy against energy")
    ax.grid(alpha=0.3, which="both")
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return fig, fronts


def provenance(client, parent_ids: List[str], rows: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Where the numbers come from (model note, section 9): the sweeps' commands, the commits, the
    test-set size, and one accuracy's standard error there."""
    commands = []
    for parent_id in parent_ids:
        overrides = client.get_run(parent_id).data.tags.get("overrides", "")
        commands.append(f"python run.py -m {overrides}".strip())
    n_test = sorted({int(r["n_test"]) for r in rows if r.get("n_test")})
    se = {n: 100 * math.sqrt(0.92 * 0.08 / n) for n in n_test}
    return {"commands": commands, "commits": sorted({r["commit"] for r in rows if r.get("commit")}),
            "n_test_images": n_test, "standard_error_at_92pct": se}


def markdown(summary: Dict[str, Any], name: str) -> str:
    lines = [f"# {name}", "", f"Swept: {AXES[summary['axis']][0]}; accuracies in %, crossbar = mean over chips (min).", ""]
    prov = summary.get("provenance")
    if prov:
        lines += [f"MLflow experiment `{name}`; sweeps (parent runs {', '.join(summary['parent_run_ids'])}):", ""]
        lines += [f"    {c}" for c in prov["commands"]] + [""]
        lines.append("Commit(s): " + (", ".join(f"`{c[:10]}`" for c in prov["commits"]) or "not recorded") + ".")
        if prov["n_test_images"]:
            lines.append("Test images per run: " + ", ".join(str(n) for n in prov["n_test_images"])
                         + "; one accuracy's standard error near 92 %: "
                         + ", ".join(f"{v:.2f} pt (n = {n})" for n, v in prov["standard_error_at_92pct"].items())
                         + ". A difference below twice that is no measurable difference.")
        lines.append("")
    arrays = any(j.get("crossbar_arrays") is not None for j in summary["jobs"])
    base = {m.replace("test/", "") for m in SECTION8}
    extra = [k for k in (summary["jobs"][0] if summary["jobs"] else {}) if k.startswith("acc_") and k not in base]
    lines.append("| dataset | config | training | software | nominal xbar | xbar mean ± std | xbar min |"
                 + "".join(f" {k.replace('acc_xbar_', '')} |" for k in extra) + (" arrays |" if arrays else ""))
    lines.append("|---|---|---|---|---|---|---|" + "---|" * len(extra) + ("---|" if arrays else ""))
    for j in summary["jobs"]:
        lines.append(f"| {j['dataset']} | {j['x']} | {j['mode']} | {j['acc_software']:.2f} | {j['acc_xbar_nominal']:.2f} | "
                     f"{j['acc_xbar_mean']:.2f} ± {j['acc_xbar_std']:.2f} | {j['acc_xbar_min']:.2f} |"
                     + "".join(f" {j.get(k, float('nan')):.2f} |" for k in extra)
                     + (f" {j.get('crossbar_arrays')} |" if arrays else ""))
    lines += ["", f"Largest configuration ({summary['largest']}):", ""]
    lines.append("| dataset | ideal (software, standard) | standard on crossbar | tech-aware on crossbar "
                 "| degradation (pts) | gap (pts) |")
    lines.append("|---|---|---|---|---|---|")
    for ds, e in summary["by_dataset"].items():
        if "gap" in e:
            lines.append(f"| {ds} | {e['ideal_acc']:.2f} | {e['standard_xbar_acc']:.2f} | {e['tech_aware_xbar_acc']:.2f} | "
                         f"{e['degradation']:.2f} | {e['gap']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--experiment", help="MLflow experiment name: all its sweeps are reported together")
    g.add_argument("--parent", action="append", help="parent run id of a sweep (repeatable)")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI", f"sqlite:///{os.path.abspath('mlflow.db')}"))
    ap.add_argument("--no-log", action="store_true", help="do not log the report to the parent run")
    ap.add_argument("--series", action="append", default=[],
                    help="a param that splits the runs into lines (repeatable), e.g. xbar.adc_range_mode")
    ap.add_argument("--metric", action="append", default=[],
                    help="another metric as a column (repeatable), e.g. test/acc_xbar_mean_at_31536000s")
    ap.add_argument("--where", action="append", default=[], metavar="KEY=VALUE",
                    help="report only runs with this param value (repeatable), e.g. hardware.name=rram")
    args = ap.parse_args(argv)

    try:
        check_store(args.tracking_uri)
    except TrackingStoreError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    client = client_for(args.tracking_uri)
    if args.parent:
        parent_ids = args.parent
    else:
        exp = client.get_experiment_by_name(args.experiment)
        if exp is None:
            print(f"error: no MLflow experiment named {args.experiment!r} at {redact(args.tracking_uri)}", file=sys.stderr)
            return 2
        parents = client.search_runs([exp.experiment_id], "tags.sweep = 'parent'", order_by=["attributes.start_time DESC"])
        if not parents:
            print(f"error: experiment {args.experiment!r} has no sweep (parent run)", file=sys.stderr)
            return 2
        parent_ids = [p.info.run_id for p in parents]
    parent_id = parent_ids[0]  # the most recent sweep receives the report
    where = dict(w.split("=", 1) for w in args.where)
    rows = collect(client, parent_ids, args.series, where, [*args.metric, ENERGY])
    if not rows:
        print(f"error: sweeps {parent_ids} have no finished runs", file=sys.stderr)
        return 2
    name = args.experiment or client.get_experiment(client.get_run(parent_id).info.experiment_id).name
    axis = swept_axis(rows)
    points, energy_note = energy_points(rows, axis)
    rows = dedupe(rows, axis)
    summary = summarise(rows, axis)
    summary.update({"experiment": name, "parent_run_ids": parent_ids, "provenance": provenance(client, parent_ids, rows)})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fig = figure(rows, axis, name)
    png = out / f"accuracy_vs_{axis}.png"
    fig.savefig(png, dpi=130)
    plt.close(fig)
    figures = [png]
    if energy_note:
        print(energy_note)
        summary["energy_note"] = energy_note
    if points:
        fig, summary["pareto"] = energy_figure(points, axis, name)
        figures.append(out / "accuracy_vs_energy.png")
        fig.savefig(figures[-1], dpi=130)
        plt.close(fig)
    else:
        print("accuracy_vs_energy.png: not drawn, no run of these sweeps has " + ENERGY)
    (out / "report.md").write_text(markdown(summary, name))
    def no_nan(v):
        return None if isinstance(v, float) and math.isnan(v) else v

    (out / "report.json").write_text(json.dumps(summary, indent=2, default=no_nan))
    if not args.no_log:
        for f in (*figures, out / "report.md", out / "report.json"):
            client.log_artifact(parent_id, str(f), artifact_path="report")
    print((out / "report.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
