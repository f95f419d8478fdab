#!/usr/bin/env python
"""Energy and latency per image of the paper's FCN against the array size, beside the accuracy of standard
and technology-aware training (results/energy/README.md).

The network of ``--experiment`` (``paper_fcn``: FCN 784-500-10, mnist5k, RRAM, the paper's 1 kOhm driver
and neuron resistances; ``paper_fcn_full``: the same with every non-ideality on, 8-bit DACs and ADCs) is
trained once in software (Adam, ``--epochs`` epochs, seed 0; the energy depends on the weights only through
the array part), then programmed onto each layout of the study's sweep (square tiles 16 ... 512, and the
first layer in one 784x500 array) and measured as a run measures it: the converters calibrated as after
programming (:func:`xbarflow.pipeline.calibrate_periphery`; ``training=standard``, so ``auto`` ADC ranges
are calibrated ones), then :func:`xbarflow.pipeline.measure_energy_per_image` (the first ``energy.samples``
test images on the nominal crossbar, the repository's energy numbers). With ``xbar.r_wire > 0`` (pass
``--override xbar.r_wire=2.5``) the arrays' admittance comes from the nested dissection.

Two budgets per layout: ``standard`` (no column gains) and ``tech_aware`` (the same, plus one column-gain
multiplication per output, as a technology-aware network has). Their accuracies (crossbar, mean over chips,
std over chips, worst chip; software) are the study's, read from ``results/<experiment>/report.json``: the
job of the layout and training mode whose ADC range is what ``xbar.adc_range_mode=auto`` gives that
training (calibrated for standard, learned for tech_aware) where the report splits by it.

Written into ``--out``: ``energy_vs_size_<experiment>[_<tag>].json`` and ``.md`` (one row per layout:
arrays, the parts, totals, latency, TOPS/W, accuracies, CPU seconds of the measurement), and
``accuracy_vs_energy.png`` drawn from every ``energy_vs_size_*.json`` there without a tag (accuracy of
standard and tech_aware against energy per image, one point per layout, labeled).

    python scripts/energy_vs_size.py --experiment paper_fcn --out results/energy
    python scripts/energy_vs_size.py --experiment paper_fcn_full --out results/energy
    python scripts/energy_vs_size.py --experiment paper_fcn_full --layouts 16x16 --override xbar.r_wire=2.5 --tag wire2.5
    python scripts/energy_vs_size.py --figure-only --out results/energy
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

LAYOUTS = [("16x16", ["xbar.size=16"]), ("32x32", ["xbar.size=32"]), ("64x64", ["xbar.size=64"]),
           ("128x128", ["xbar.size=128"]), ("256x256", ["xbar.size=256"]), ("512x512", ["xbar.size=512"]),
           ("784x500", ["xbar.rows=784", "xbar.cols=500"])]
EXPERIMENTS = ("paper_fcn", "paper_fcn_full")
MODES = ("standard", "tech_aware")
# the ADC range xbar.adc_range_mode=auto gives each training (xbarflow.hardware.adc_range_mode)
AUTO_RANGE = {"standard": "calibrated", "tech_aware": "learned"}


def study_accuracies(report_json: str, dataset: str) -> dict:
    """``{layout: {mode: {acc_xbar_mean, acc_xbar_std, acc_xbar_min, acc_software}}}`` from a study's
    report.json (scripts/report.py): the jobs of ``dataset``, or of ``dataset/<range>`` with the range
    ``auto`` gives the training mode where the report splits the runs by the ADC range."""
    with open(report_json) as f:
        report = json.load(f)
    out: dict = {}
    for job in report["jobs"]:
        mode = job["mode"]
        if mode not in MODES or job["dataset"] not in (dataset, f"{dataset}/{AUTO_RANGE[mode]}"):
            continue
        out.setdefault(job["x"], {})[mode] = {k: job[k] for k in ("acc_xbar_mean", "acc_xbar_std", "acc_xbar_min",
                                                                     "acc_software")}
    return out


def measure(experiment: str, layouts, epochs: int, overrides) -> dict:
    import torch
    from hydra import compose, initialize_config_dir

    from xbarflow import pipeline
    from xbarflow.builders import build_model
    from xbarflow.config import register_configs, validate
    from xbarflow.data import build_datasets
    from xbarflow.nn import crossbar_array_count
    from xbarflow.nn.energy import measure_energy

    register_configs()

    def typed_config(more):
        with initialize_config_dir(config_dir=os.path.join(REPO, "conf"), version_base="1.3"):
            return validate(compose(config_name="config", overrides=[f"experiment={experiment}", "training=standard",
                                                                     *overrides, *more]))

    typed = typed_config([])
    pipeline.seed_everything(typed.seed)
    data = build_datasets(typed.dataset)
    net = build_model(typed.model, data.in_shape, data.num_classes)
    opt = torch.optim.Adam(net.parameters(), lr=typed.training.lr)
    loader = torch.utils.data.DataLoader(data.train, batch_size=typed.training.batch_size, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    for _ in range(epochs):
        for x, y in loader:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        correct = sum(int((net(x).argmax(1) == y).sum()) for x, y in torch.utils.data.DataLoader(data.test, batch_size=1000))
    software = 100.0 * correct / len(data.test)
    state = net.state_dict()
    print(f"{experiment}: software accuracy {software:.1f} % after {epochs} epochs", flush=True)

    rows = []
    for name, layout in layouts:
        typed = typed_config(layout)
        cpu0, wall0 = time.process_time(), time.perf_counter()
        model = pipeline.build_crossbar_model(typed, data)
        model.load_state_dict(state, strict=False)
        pipeline.calibrate_periphery(typed, model, data, torch.device("cpu"))
        report = pipeline.measure_energy_per_image(typed, model, data, torch.device("cpu"))
        # a technology-aware network: the same reads, plus its column gains' multiplications (the
        # arrays' admittance is cached, so this is one more pass over the images, no solve)
        n = min(typed.energy.samples, len(data.test))
        batches = (torch.stack([data.test[i][0] for i in range(s, min(s + typed.eval.batch_size, n))])
                   for s in range(0, n, typed.eval.batch_size))
        tat = measure_energy(model, batches, pipeline.energy_params(typed), column_gain=True)
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        m, mt = report.metrics(), tat.metrics()
        rows.append({"layout": name, "arrays": crossbar_array_count(model),
                     **{k.split("/")[1]: round(v, 3) for k, v in m.items()}, "dominant": report.dominant(),
                     "tech_aware": {k.split("/")[1]: round(v, 3) for k, v in mt.items()},
                     "r_wire": typed.xbar.r_wire if typed.nonideality.r_wire else 0.0,
                     "cpu_s": round(cpu, 1), "wall_s": round(wall, 1)})
        print(rows[-1], flush=True)
    return {"experiment": experiment, "overrides": list(overrides), "software_accuracy": software, "epochs": epochs,
            "n_test": len(data.test), "energy_samples": typed.energy.samples, "rows": rows}


def markdown(result: dict) -> str:
    lines = [f"Experiment `{result['experiment']}`" + (f" with {' '.join(result['overrides'])}" if result["overrides"] else "")
             + f"; software-trained stand-in weights ({result['epochs']} epochs, {result['software_accuracy']:.1f} %),"
             f" {result['energy_samples']} test images, nominal crossbar. Energy per image; accuracies in %, crossbar"
             " mean over chips ± std over chips, from the study's report.json"
             + (" (measured without the overrides above)" if result["overrides"] else "") + ".", "",
             "| layout | arrays | array pJ | DAC pJ | ADC pJ | digital pJ | total nJ (standard) | total nJ (tech_aware)"
             " | latency ns | TOPS/W (standard) | dominant | standard accuracy | tech_aware accuracy | CPU s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def acc(r, mode):
        a = r.get("accuracy", {}).get(mode)
        return f"{a['acc_xbar_mean']:.1f} ± {a['acc_xbar_std']:.1f}" if a else "not in the study"

    for r in result["rows"]:
        lines.append(f"| {r['layout']} | {r['arrays']} | {r['array_pj_per_image']:.0f} | {r['dac_pj_per_image']:.0f} "
                     f"| {r['adc_pj_per_image']:.0f} | {r['digital_pj_per_image']:.0f} | {r['total_pj_per_image'] / 1e3:.3g} "
                     f"| {r['tech_aware']['total_pj_per_image'] / 1e3:.3g} | {r['ns_per_image']:.4g} "
                     f"| {r['tops_per_w']:.3g} | {r['dominant']} | {acc(r, 'standard')} | {acc(r, 'tech_aware')} "
                     f"| {r['cpu_s']:g} |")
    return "\n".join(lines) + "\n"


def savings(result: dict) -> dict:
    """The largest layout whose tech_aware accuracy is not measurably below its 64x64 one (less than two
    standard errors of a difference of two accuracies on the test set, model note section 9), its energy per
    image against 64x64 tiles (ratios, tech_aware and standard budgets) and the accuracies it keeps."""
    by = {r["layout"]: r for r in result["rows"]}
    base = by.get("64x64")
    if not base or "tech_aware" not in base.get("accuracy", {}):
        return {}
    ref = base["accuracy"]["tech_aware"]["acc_xbar_mean"]
    p = ref / 100.0
    se_diff = 100.0 * math.sqrt(2 * p * (1 - p) / result["n_test"])
    usable = [r for r in result["rows"] if "tech_aware" in r.get("accuracy", {})
              and r["accuracy"]["tech_aware"]["acc_xbar_mean"] >= ref - 2 * se_diff]
    best = usable[-1]  # rows are in LAYOUTS order, the largest last
    return {"layout": best["layout"], "usable_threshold": ref - 2 * se_diff,
            "ratio_64x64_over_it": base["tech_aware"]["total_pj_per_image"] / best["tech_aware"]["total_pj_per_image"],
            "ratio_standard_budgets": base["total_pj_per_image"] / best["total_pj_per_image"],
            "accuracy": best["accuracy"], "accuracy_64x64": base["accuracy"]}


def figure(out: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = []
    for path in sorted(glob.glob(os.path.join(out, "energy_vs_size_*.json"))):
        with open(path) as f:
            r = json.load(f)
        if r.get("experiment") in EXPERIMENTS and not r.get("tag"):
            results.append(r)
    if not results:
        return None
    fig, ax = plt.subplots(figsize=(8.5, 5.2))
    colours = {"standard": "tab:red", "tech_aware": "tab:blue"}
    markers = {"paper_fcn": "o", "paper_fcn_full": "s"}
    labeled = set()
    for r in results:
        for mode in MODES:
            pts = [(row["total_pj_per_image"] if mode == "standard" else row["tech_aware"]["total_pj_per_image"],
                    row["accuracy"][mode], row["layout"]) for row in r["rows"] if mode in row.get("accuracy", {})]
            if not pts:
                continue
            xs = [p[0] / 1e3 for p in pts]
            ys = [p[1]["acc_xbar_mean"] for p in pts]
            es = [p[1]["acc_xbar_std"] for p in pts]
            ls = "-" if r["experiment"] == "paper_fcn" else "--"
            ax.errorbar(xs, ys, yerr=es, fmt=markers.get(r["experiment"], "D") + ls, color=colours[mode], capsize=3,
                        ms=5, alpha=0.85, label=f"{r['experiment']}, {mode}")
            for x, y, p in zip(xs, ys, pts, strict=True):
                if (mode, f"{x:.3g}") in labeled:  # the other experiment's point of the layout: same energy
                    continue
                labeled.add((mode, f"{x:.3g}"))
                ax.annotate(p[2], (x, y), textcoords="offset points", xytext=(4, 6 if mode == "tech_aware" else -12),
                            fontsize=7, color=colours[mode])
    ax.set_xscale("log")
    ax.margins(x=0.08)
    ax.set_xlabel("energy per image (nJ, crossbar layers; log scale)")
    ax.set_ylabel("test accuracy on the crossbar (%, mean ± std over chips)")
    ax.set_ylim(0, 100)
    ax.set_title("FCN 784-500-10 on mnist5k: accuracy against energy, one point per layout")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7.5, loc="center right")
    fig.tight_layout()
    png = os.path.join(out, "accuracy_vs_energy.png")
    fig.savefig(png, dpi=130)
    plt.close(fig)
    return png


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiment", choices=EXPERIMENTS, default="paper_fcn")
    parser.add_argument("--out", default=os.path.join(REPO, "results", "energy"))
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--layouts", nargs="+", choices=[name for name, _ in LAYOUTS], help="a subset (default: all)")
    parser.add_argument("--override", action="append", default=[], help="a further Hydra override (repeatable)")
    parser.add_argument("--tag", default="", help="suffix of the output names (runs with a tag stay out of the figure)")
    parser.add_argument("--report", help="the study's report.json (default results/<experiment>/report.json)")
    parser.add_argument("--figure-only", action="store_true", help="only redraw accuracy_vs_energy.png")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if not args.figure_only:
        layouts = [lay for lay in LAYOUTS if not args.layouts or lay[0] in args.layouts]
        result = measure(args.experiment, layouts, args.epochs, args.override)
        result["tag"] = args.tag
        report = args.report or os.path.join(REPO, "results", args.experiment, "report.json")
        accuracies = study_accuracies(report, "mnist5k")
        result["accuracy_source"] = os.path.relpath(report, REPO)
        for row in result["rows"]:
            row["accuracy"] = accuracies.get(row["layout"], {})
        result["savings"] = savings(result)
        stem = os.path.join(args.out, f"energy_vs_size_{args.experiment}" + (f"_{args.tag}" if args.tag else ""))
        with open(stem + ".json", "w") as f:
            json.dump(result, f, indent=1)
        table = markdown(result)
        with open(stem + ".md", "w") as f:
            f.write(table)
        print(table)
        s = result["savings"]
        if s:
            print(f"largest usable array (tech_aware >= {s['usable_threshold']:.2f} %, 2 standard errors below 64x64): "
                  f"{s['layout']}, 64x64 tiles / it = "
                  f"{s['ratio_64x64_over_it']:.2f}x energy per image (tech_aware budgets; standard budgets "
                  f"{s['ratio_standard_budgets']:.2f}x); accuracy there: "
                  + ", ".join(f"{m} {a['acc_xbar_mean']:.2f} ± {a['acc_xbar_std']:.2f}" for m, a in s["accuracy"].items())
                  + "; at 64x64: "
                  + ", ".join(f"{m} {a['acc_xbar_mean']:.2f} ± {a['acc_xbar_std']:.2f}"
                              for m, a in s["accuracy_64x64"].items()))
    png = figure(args.out)
    print("figure:", os.path.relpath(png, REPO) if png else f"none (no untagged energy_vs_size_*.json in {args.out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
