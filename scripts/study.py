"""Run a study's cells one by one, resumably: a software network, fine-tunes from it, evaluations.

    OMP_NUM_THREADS=1 python scripts/study.py results/resnet_fashion/plan.yaml --dir studies/resnet_fashion
    python scripts/study.py results/resnet_fashion/plan.yaml --dir studies/resnet_fashion --list
    python scripts/study.py PLAN --dir DIR --only 'tech_aware-64-*'      # a subset (fnmatch on names)
    python scripts/study.py PLAN --dir DIR --report results/resnet_fashion  # table, JSON and figure

The plan (YAML, see ``results/resnet_fashion/plan.yaml``) names an experiment, the overrides of
the run that trains the software network, and the axes: arrays (``tiles``), non-ideality sets,
strategies (``null``: the software network itself; otherwise overrides of a fine-tune that starts
from the software network's weights, ``training.init_from``) and BatchNorm options. Cells:

* ``software``: trains the software network (its own evaluation is on the experiment's arrays);
* ``<strategy>-<tile>-<nonideality>-bn_<first option>``: the fine-tune (or, for ``null``, an
  evaluation-only run of the software network) with the first BatchNorm option;
* ``...-bn_<other option>``: evaluation-only runs of the same weights with the other options;
* ``<cell>.all_on``, ``<cell>.no_<effect>``, ``<cell>.with_<remedy>`` (plan key ``ablations``):
  evaluation-only runs of a cell's weights with one effect group off or one remedy on;
* ``<cell>.seed<s>`` (plan key ``seeds``): whole replicates with another training seed.

Plan key ``reduced`` gives the fine-tunes the machine cannot afford in full their reduction
(e.g. fewer batches an epoch); it shows in the cell's command in the report.

Each cell is one ``run.py`` job with its own folder ``DIR/<cell>`` (``hydra.run.dir``) and the
study's own tracking store ``DIR/mlflow.db`` (``--tracking-uri`` to log elsewhere). A cell whose
folder holds ``DONE`` is skipped; a cell that was stopped is resumed from its last checkpoint
(``resume=true``), so the study can be stopped and started again at any point, across sessions.
A failed cell is reported and the study goes on with the cells that do not need it.

**Across machines.** The study folder lives outside the repository, so a new machine starts
without it. What is committed carries the study over: the record (``--record``, by default the
plan's folder) holds ``report.json``, one row per cell already measured, and the plan key
``networks`` names a folder there with the trained networks (``<cell>/card.json`` and
``weights.safetensors``, a logged model's files: tensors and JSON only), which
``--export-networks`` writes from the study's store. A cell with a row in the record (a training
cell: with its network too) is *recorded* and not run again (``--rerun`` runs it anyway); a cell
that needs a network the study folder lacks starts from (``training.init_from``) or evaluates
(``source=<folder>``) the committed one; and ``--report`` keeps the recorded rows of the cells
the store does not hold, so a report regenerated on a new machine loses none of them.
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import yaml

REPO = Path(__file__).resolve().parents[1]
DONE = "DONE"


@dataclass
class Cell:
    """One run.py job of the study."""

    name: str
    overrides: List[str]
    needs: Optional[str] = None          # the cell whose trained weights this one starts from or evaluates
    how: str = "train"                   # train (fine-tune from `needs`, or the software run) | evaluate
    tags: Dict[str, str] = field(default_factory=dict)


def cells(plan: dict) -> List[Cell]:
    """Every cell of ``plan`` in run order: the software network, then per non-ideality set (the
    cheaper first, as listed) and array, each strategy's training cell and its evaluations."""
    out = [Cell("software", list(plan["software"]))]
    bn = list(plan["bn_recalibration"])
    for nonideality, n_over in plan["nonidealities"].items():
        for tile, t_over in plan["tiles"].items():
            for strategy, s_over in plan["strategies"].items():
                stem = f"{strategy}-{tile}-{nonideality}"
                hw = [*t_over, *n_over]
                first = f"{stem}-bn_{bn[0]}"
                if s_over is None:  # the software network read on this hardware
                    out.append(Cell(first, [*hw, f"eval.bn_recalibration={bn[0]}"], "software", "evaluate"))
                else:
                    out.append(Cell(first, [*s_over, *reduced_training(plan, first), *hw,
                                            f"eval.bn_recalibration={bn[0]}"], "software", "train"))
                weights_of = "software" if s_over is None else first
                for option in bn[1:]:
                    out.append(Cell(f"{stem}-bn_{option}", [*hw, f"eval.bn_recalibration={option}"], weights_of,
                                    "evaluate"))
    return out + ablation_cells(plan, out) + seed_cells(plan, out)


def seed_cells(plan: dict, main: List[Cell]) -> List[Cell]:
    """The plan's ``seeds`` (``values``: training seeds, ``cells``: fnmatch patterns): whole
    replicates of the matching cells and of every cell they need, the software network included,
    with ``seed=<s>``, named ``<cell>.seed<s>``; a replicate reads or starts from its own
    replicate's weights. Section 9 of the model note: a claim of less than 2 points needs three
    training seeds (the plan's cells are seed 0)."""
    spec = plan.get("seeds")
    if not spec:
        return []
    by_name = {c.name: c for c in main}
    wanted, stack = set(), [c.name for c in main if any(fnmatch.fnmatchcase(c.name, p) for p in spec["cells"])]
    while stack:
        name = stack.pop()
        if name not in wanted:
            wanted.add(name)
            stack += [by_name[name].needs] if by_name[name].needs else []
    return [Cell(f"{c.name}.seed{s}", [*c.overrides, f"seed={s}"], None if c.needs is None else f"{c.needs}.seed{s}",
                 c.how, tags={"seed_of": c.name, "seed": str(s)})
            for s in spec["values"] for c in main if c.name in wanted]


def reduced_training(plan: dict, name: str) -> List[str]:
    """The plan's ``reduced`` overrides of a fine-tune whose full cost the machine cannot give
    (fnmatch pattern on cell names -> overrides, e.g. fewer batches an epoch); the report says
    which cells ran reduced (their command)."""
    return [o for pattern, over in (plan.get("reduced") or {}).items() if fnmatch.fnmatch(name, pattern)
            for o in over]


def ablation_cells(plan: dict, main: List[Cell]) -> List[Cell]:
    """The plan's ``ablations``: evaluation-only runs of a cell's weights with every overrides of
    that cell's hardware, plus ``ablations.overrides`` (e.g. t0 only), and one effect group switched
    off at a time (``ablations.switch_off``: name -> overrides); ``all_on`` switches nothing off, the
    reference the others are compared with. Named ``<cell>.no_<effect>`` (``<cell>.all_on``).
    ``ablations.remedies`` (name -> overrides): the same, with a remedy switched on instead of an
    effect off (e.g. stuck-device compensation), named ``<cell>.with_<remedy>``."""
    spec = plan.get("ablations")
    if not spec:
        return []
    by_name = {c.name: c for c in main}
    out = []
    for base_name in spec["cells"]:
        base = by_name[base_name]
        weights_of = base.name if base.how == "train" else base.needs
        strategy_over = [*(plan["strategies"][base_name.split("-")[0]] or []), *reduced_training(plan, base_name)]
        variants = {"all_on": [], **{f"no_{k}": v for k, v in spec["switch_off"].items()},
                    **{f"with_{k}": v for k, v in (spec.get("remedies") or {}).items()}}
        for effect, off in variants.items():
            # a variant's own override replaces the ablations' (e.g. a remedy read at later times too),
            # and an ablation override the cell's own setting of that key (e.g. eval.times)
            own = {o.split("=", 1)[0] for o in off}
            extra = [o for o in spec.get("overrides", []) if o.split("=", 1)[0] not in own]
            keys = own | {o.split("=", 1)[0] for o in extra}
            hw = [o for o in base.overrides if o not in strategy_over and o.split("=", 1)[0] not in keys]
            out.append(Cell(f"{base_name}.{effect}", [*hw, *extra, *off], weights_of, "evaluate",
                            tags={"ablation_of": base_name, "effect_off": effect}))
    return out


def run_id_of(folder: Path) -> Optional[str]:
    """The MLflow run of a finished cell (``mlflow_run.json`` written by the run)."""
    try:
        return json.loads((folder / "mlflow_run.json").read_text())["run_id"]
    except (OSError, ValueError, KeyError):
        return None


def network_of(plan: dict, record: Optional[Path], name: str) -> Optional[Path]:
    """The committed network of cell ``name`` (a model folder: ``card.json``, ``weights.safetensors``
    under the plan's ``networks`` folder in the record), or None."""
    if record is None or not plan.get("networks"):
        return None
    folder = record / plan["networks"] / name
    return folder if (folder / "card.json").is_file() and (folder / "weights.safetensors").is_file() else None


def recorded_rows(record: Optional[Path]) -> Dict[str, dict]:
    """The rows of ``report.json`` in the record, by cell name (empty where there is none)."""
    if record is None or not (record / "report.json").is_file():
        return {}
    return {r["cell"]: r for r in json.loads((record / "report.json").read_text()).get("cells", [])}


def is_recorded(cell: Cell, plan: dict, record: Optional[Path], rows: Dict[str, dict]) -> bool:
    """A cell measured before, on any machine: its row is in the record, and for a training cell
    its network is committed too (the cells after it need the weights, not only the row)."""
    return cell.name in rows and (cell.how != "train" or network_of(plan, record, cell.name) is not None)


def weights_available(name: str, plan: dict, study: Path, record: Optional[Path]) -> bool:
    """Whether the trained weights of cell ``name`` are at hand: done in this study, or committed."""
    return (study / name / DONE).exists() or network_of(plan, record, name) is not None


def command(cell: Cell, plan: dict, study: Path, tracking_uri: str, record: Optional[Path] = None,
            resume: bool = True) -> List[str]:
    """The run.py command of ``cell``; ``resume``: continue a stopped training cell (``resume=true``
    where its folder holds a run), False for the command as first given (the report's)."""
    folder = study / cell.name
    args = [sys.executable, str(REPO / "run.py"), f"experiment={plan['experiment']}", *cell.overrides,
            f"hydra.run.dir={folder}", f"logger.tracking_uri={tracking_uri}", f"run_name={cell.name}"]
    if cell.needs is not None:
        base = study / cell.needs
        committed = None if (base / DONE).exists() else network_of(plan, record, cell.needs)
        if cell.how == "evaluate":
            args += ["mode=evaluate", f"source={committed or run_id_of(base)}"]
        elif committed is not None:
            args += [f"training.init_from={committed / 'weights.safetensors'}"]
        else:
            args += [f"training.init_from={base / 'weights.pt'}"]
    if resume and (folder / "mlflow_run.json").exists() and cell.how == "train":
        args.append("resume=true")
    return args


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("plan", type=Path)
    p.add_argument("--dir", type=Path, required=True, help="the study's folder (cells, tracking store)")
    p.add_argument("--tracking-uri", default=None, help="default: sqlite:///<dir>/mlflow.db")
    p.add_argument("--only", action="append", default=[], help="fnmatch pattern(s) on cell names")
    p.add_argument("--list", action="store_true", help="list the cells and their state, run nothing")
    p.add_argument("--report", type=Path, default=None, help="write report.md, report.json and a figure here")
    p.add_argument("--record", type=Path, default=None,
                   help="the committed record: report.json and the plan's networks folder (default: the plan's folder)")
    p.add_argument("--rerun", action="store_true", help="also run the cells the record holds (to reproduce them)")
    p.add_argument("--export-networks", action="store_true",
                   help="copy every done training cell's network (card and weights) into the record's networks folder")
    a = p.parse_args(argv)
    plan = yaml.safe_load(a.plan.read_text())
    study = a.dir.resolve()
    study.mkdir(parents=True, exist_ok=True)
    record = (a.record or a.plan.parent).resolve()
    uri = a.tracking_uri or f"sqlite:///{study / 'mlflow.db'}"
    if a.report:
        return report(plan, study, uri, a.report, record)
    if a.export_networks:
        return export_networks(plan, study, uri, record)
    rows = recorded_rows(record)
    todo = [c for c in cells(plan) if not a.only or any(fnmatch.fnmatchcase(c.name, o) for o in a.only)]
    failed = []
    for cell in todo:
        folder = study / cell.name
        state = "done" if (folder / DONE).exists() else "started" if folder.exists() else \
            "recorded" if is_recorded(cell, plan, record, rows) else "to do"
        if a.list:
            print(f"{cell.name:40s} {state:8s} {' '.join(cell.overrides)}")
            continue
        if state == "done" or (state == "recorded" and not a.rerun):
            continue
        if cell.needs is not None and not weights_available(cell.needs, plan, study, record):
            print(f"skip {cell.name}: {cell.needs} is not done", flush=True)
            failed.append(cell.name)
            continue
        args = command(cell, plan, study, uri, record)
        print(f"== {cell.name}: {' '.join(args[2:])}", flush=True)
        start = time.time()
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / "console.log", "a") as log:
            rc = subprocess.call(args, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy())
        if rc == 0:
            (folder / DONE).write_text(f"{time.time() - start:.0f} s\n")
            print(f"   done in {time.time() - start:.0f} s", flush=True)
        else:
            print(f"   failed (exit {rc}); see {folder / 'console.log'}", flush=True)
            failed.append(cell.name)
    if failed:
        print(f"{len(failed)} cell(s) not done: {', '.join(failed)}", flush=True)
    return 1 if failed else 0


# ------------------------------------------------------------------ the report
ACC = ("acc_software", "acc_xbar_nominal", "acc_xbar_mean", "acc_xbar_std", "acc_xbar_min")
TIMES = {"1 day": 86400, "1 year": 31536000}


def standard_error(row: dict) -> float:
    """Standard error (points) of the mean over chips: the test set's binomial error of one
    accuracy (model note, section 9) and the chips' spread, added in quadrature."""
    p, n = row["acc_xbar_mean"] / 100, row["n_images"]
    chips = row["acc_xbar_std"] / math.sqrt(row["n_chips"]) if row["n_chips"] > 1 else 0.0
    return math.hypot(100 * math.sqrt(p * (1 - p) / n), chips)


def collect(plan: dict, study: Path, uri: str, record: Optional[Path] = None) -> List[dict]:
    """One row per done cell, its metrics read back from the tracking store."""
    sys.path.insert(0, str(REPO))
    from xbarflow.tracking import client_for

    client = client_for(uri)
    rows = []
    for cell in cells(plan):
        folder = study / cell.name
        run_id = run_id_of(folder)
        if not (folder / DONE).exists() or run_id is None:
            continue
        run = client.get_run(run_id)
        m, params = run.data.metrics, run.data.params
        row = {"cell": cell.name, "run_id": run_id, "commit": run.data.tags.get("git_commit", ""),
               "n_images": int(m.get("test/n_images", 0)), "n_chips": int(params.get("eval.n_chips", 1)),
               "command": " ".join(command(cell, plan, study, uri, record, resume=False)[1:])}
        parts = cell.name.split("-")
        if "ablation_of" in cell.tags:
            row.update(ablation_of=cell.tags["ablation_of"], effect_off=cell.tags["effect_off"])
        elif "seed_of" in cell.tags:
            row.update(seed_of=cell.tags["seed_of"], seed=int(cell.tags["seed"]))
        elif len(parts) == 4:
            row.update(strategy=parts[0], tile=parts[1], nonideality=parts[2], bn=parts[3][3:])
        row.update({k: m[f"test/{k}"] for k in ACC if f"test/{k}" in m})
        for label, t in TIMES.items():
            if f"test/acc_xbar_mean_at_{t}s" in m:
                row[f"mean_{label}"] = m[f"test/acc_xbar_mean_at_{t}s"]
                row[f"min_{label}"] = m[f"test/acc_xbar_min_at_{t}s"]
        if "acc_xbar_mean" in row and row["n_images"]:
            row["se"] = standard_error(row)
        # per chip (t0), in chip order: chip k is drawn from the same seed in every cell
        row["chips"] = [m.value for m in sorted(client.get_metric_history(run_id, "test/acc_xbar_chip"),
                                                key=lambda m: m.step)]
        rows.append(row)
    return rows


def export_networks(plan: dict, study: Path, uri: str, record: Path) -> int:
    """Every done training cell's logged model (``card.json`` and ``weights.safetensors`` only) into
    ``<record>/<networks>/<cell>``, so that a study on another machine starts from them."""
    if not plan.get("networks"):
        print("the plan names no `networks` folder", file=sys.stderr)
        return 2
    sys.path.insert(0, str(REPO))
    import shutil
    import tempfile

    from xbarflow.logged_model import fetch, read_folder

    n = 0
    for cell in cells(plan):
        run_id = run_id_of(study / cell.name)
        if cell.how != "train" or not (study / cell.name / DONE).exists() or run_id is None:
            continue
        dst = record / plan["networks"] / cell.name
        with tempfile.TemporaryDirectory() as tmp:
            folder = fetch(run_id, Path(tmp), uri)
            read_folder(folder)  # a readable card and weights, or stop here
            dst.mkdir(parents=True, exist_ok=True)
            for name in ("card.json", "weights.safetensors"):
                shutil.copyfile(folder / name, dst / name)
        (dst / "run.json").write_text(json.dumps({"cell": cell.name, "run_id": run_id}, indent=1) + "\n")
        print(f"{cell.name}: {dst}")
        n += 1
    print(f"{n} network(s) exported to {record / plan['networks']}")
    return 0


def report(plan: dict, study: Path, uri: str, out: Path, record: Optional[Path] = None) -> int:
    """``report.md`` (every done cell: mean over chips, worst chip, standard error, gap to the
    software network), ``report.json`` and ``accuracy_by_cell.png`` in ``out``.

    Cells the store does not hold keep their row from the record's ``report.json`` (measured
    before, possibly on another machine; the row keeps its run id, commit and command)."""
    fresh = {r["cell"]: r for r in collect(plan, study, uri, record)}
    recorded = recorded_rows(record if record is not None else out)
    rows = [fresh.get(c.name) or recorded[c.name] for c in cells(plan) if c.name in fresh or c.name in recorded]
    out.mkdir(parents=True, exist_ok=True)
    software = next((r for r in rows if r["cell"] == "software"), None)
    sw = software["acc_software"] if software else float("nan")
    lines = [f"Software network (cell `software`): {sw:.2f} % on {software['n_images'] if software else '?'} "
             "test images.", "",
             "| strategy | array | non-idealities | BN statistics | nominal | chips: mean (worst) | ± SE | gap to software "
             "| 1 day: mean (worst) | 1 year: mean (worst) | run |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "strategy" not in r:
            continue
        later = [f"{r[f'mean_{k}']:.2f} ({r[f'min_{k}']:.2f})" if f"mean_{k}" in r else "-" for k in TIMES]
        lines.append(f"| {r['strategy']} | {r['tile']}x{r['tile']} | {r['nonideality']} | {r['bn']} | "
                     f"{r['acc_xbar_nominal']:.2f} | {r['acc_xbar_mean']:.2f} ({r['acc_xbar_min']:.2f}) | "
                     f"{r.get('se', float('nan')):.2f} | {sw - r['acc_xbar_mean']:.2f} | {later[0]} | {later[1]} | "
                     f"`{r['run_id'][:8]}` |")
    lines += ["", "SE: the standard error of the mean over chips, the test set's binomial error and the chips' "
              "spread (std / sqrt(n_chips)) in quadrature. Commands, commits and run ids: report.json."]
    lines += strategy_differences(rows, "tech_aware", "noise_aware")
    lines += ablation_table(rows, sw)
    lines += seed_table(rows, [("tech_aware", "standard"), ("tech_aware", "noise_aware")])
    (out / "report.md").write_text("\n".join(lines) + "\n")
    (out / "report.json").write_text(json.dumps({"software": sw, "cells": rows}, indent=1) + "\n")
    figure(rows, sw, out / "accuracy_by_cell.png")
    print("\n".join(lines))
    return 0


def paired_difference(r: dict, other: dict) -> Tuple[List[float], float]:
    """Per-chip differences of two rows (``chips``: t0 accuracies in chip order) and the standard
    error of their mean; ``([], nan)`` when the rows were read on different numbers of chips (chip k
    is the same seeded draw in every cell, so only equal chip lists pair)."""
    mine, theirs = r.get("chips", []), other.get("chips", [])
    diffs = [x - y for x, y in zip(mine, theirs, strict=True)] if len(mine) == len(theirs) else []
    return diffs, (statistics.stdev(diffs) / math.sqrt(len(diffs))) if len(diffs) > 1 else float("nan")


def strategy_differences(rows: List[dict], a: str, b: str) -> List[str]:
    """Strategy ``a`` against ``b`` on the same arrays, non-idealities and BatchNorm option: the
    difference of the means over chips, its standard error from the per-chip differences (the
    cells draw chip k from the same seed, so the difference is paired), and as an upper bound
    both cells' SEs in quadrature (errors taken as independent)."""
    out: List[str] = []
    for r in rows:
        if r.get("strategy") != a or "acc_xbar_mean" not in r:
            continue
        other = next((o for o in rows if o.get("strategy") == b and "acc_xbar_mean" in o and
                      (o["tile"], o["nonideality"], o["bn"]) == (r["tile"], r["nonideality"], r["bn"])), None)
        if other is None:
            continue
        diffs, paired = paired_difference(r, other)
        bound = math.hypot(r.get("se", float("nan")), other.get("se", float("nan")))
        if not out:
            out += ["", f"{a} against {b} (t0; chip k is the same draw in both cells):", "",
                    "| array | non-idealities | BN statistics | difference of means | ± SE, paired over chips | "
                    "± SE, upper bound | chips where it is ahead |", "|---|---|---|---|---|---|---|"]
        out.append(f"| {r['tile']}x{r['tile']} | {r['nonideality']} | {r['bn']} | "
                   f"{r['acc_xbar_mean'] - other['acc_xbar_mean']:+.2f} | {paired:.2f} | {bound:.2f} | "
                   f"{sum(d > 0 for d in diffs)} of {len(diffs)} |")
    return out


def seed_table(rows: List[dict], pairs: List[Tuple[str, str]]) -> List[str]:
    """Cells replicated over training seeds (the cell itself is seed 0): the mean over chips per
    seed, their mean and spread over seeds; then strategy against strategy, the per-seed difference
    of the means over chips, with the standard error over seeds (std / sqrt(n)), where every seed
    of both cells is done."""
    def accuracy(r: dict, cell: str) -> Optional[float]:
        # the software network's own figure is its digital accuracy (read on a chip with its
        # trained statistics it is the collapsed 10 % of the standard cells)
        return r.get("acc_software") if cell == "software" else r.get("acc_xbar_mean")

    by_seed: Dict[str, Dict[int, float]] = {}
    for r in rows:
        if "seed_of" in r and accuracy(r, r["seed_of"]) is not None:
            by_seed.setdefault(r["seed_of"], {})[r["seed"]] = accuracy(r, r["seed_of"])
    for r in rows:
        if r["cell"] in by_seed and accuracy(r, r["cell"]) is not None:
            by_seed[r["cell"]][0] = accuracy(r, r["cell"])
    if not by_seed:
        return []
    out = ["", "Over training seeds (seed 0: the cell above; each seed a whole replicate from its own software "
           "network): mean over chips per seed (software: the digital network's accuracy).", "",
           "| cell | seeds | per seed | mean | ± std over seeds |", "|---|---|---|---|---|"]
    for cell, accs in by_seed.items():
        vals = [accs[s] for s in sorted(accs)]
        spread = statistics.stdev(vals) if len(vals) > 1 else float("nan")
        out.append(f"| {cell} | {', '.join(map(str, sorted(accs)))} | {', '.join(f'{v:.2f}' for v in vals)} | "
                   f"{statistics.mean(vals):.2f} | {spread:.2f} |")
    diffs_lines = []
    for a, b in pairs:
        for cell, accs in by_seed.items():
            if not cell.startswith(f"{a}-"):
                continue
            other = by_seed.get(f"{b}-" + cell.split("-", 1)[1])
            if other is None or sorted(other) != sorted(accs) or len(accs) < 2:
                continue
            d = [accs[s] - other[s] for s in sorted(accs)]
            diffs_lines.append(f"| {cell.split('-', 1)[1]} | {a} against {b} | {len(d)} | {statistics.mean(d):+.2f} | "
                               f"{statistics.stdev(d) / math.sqrt(len(d)):.2f} |")
    if diffs_lines:
        out += ["", "| cell | difference | seeds | mean of per-seed differences | ± SE over seeds |",
                "|---|---|---|---|---|", *diffs_lines]
    return out


def ablation_table(rows: List[dict], software: float) -> List[str]:
    """Per ablated cell: the accuracy at t0 with each effect group switched off, and what switching it
    off gains against ``all_on`` (the same weights, chips and reads with nothing off; the trained
    cell's own t0 evaluation where ``all_on`` is not done)."""
    out: List[str] = []
    for base in dict.fromkeys(r["ablation_of"] for r in rows if "ablation_of" in r):
        ref = next((r for r in rows if r.get("ablation_of") == base and r["effect_off"] == "all_on"), None)
        ref = ref or next((r for r in rows if r["cell"] == base), None)
        out += ["", f"Which effect costs what, `{base}` (evaluation only, t0, same chips; "
                f"reference: `{ref['cell'] if ref else '-'}`):", "",
                "| switched off (or remedy on) | nominal | chips: mean (worst) | ± SE | gain over all on "
                "| ± SE, paired over chips | ± SE, upper bound | gap to software |",
                "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            if r.get("ablation_of") != base or "acc_xbar_mean" not in r:
                continue
            gain = r["acc_xbar_mean"] - ref["acc_xbar_mean"] if ref else float("nan")
            # the two runs share chips and test images, so this (independent errors) is an upper bound
            se_gain = math.hypot(r.get("se", 0.0), ref.get("se", 0.0)) if ref and r is not ref else 0.0
            paired = paired_difference(r, ref)[1] if ref and r is not ref else 0.0
            effect = r["effect_off"]
            label = f"(remedy on) {effect.removeprefix('with_')}" if effect.startswith("with_") else \
                effect.removeprefix("no_")
            out.append(f"| {label} | {r['acc_xbar_nominal']:.2f} | "
                       f"{r['acc_xbar_mean']:.2f} ({r['acc_xbar_min']:.2f}) | {r.get('se', float('nan')):.2f} | "
                       f"{gain:+.2f} | {paired:.2f} | {se_gain:.2f} | {software - r['acc_xbar_mean']:.2f} |")
        out += ["", "A gain's paired SE comes from the per-chip differences (chip k is the same draw in every "
                "run); the upper bound adds both runs' SEs in quadrature, as if their errors were independent."]
        for r in rows:  # a variant read at later times too (a remedy over time): those reads
            if r.get("ablation_of") == base and any(f"mean_{k}" in r for k in TIMES):
                later = "; ".join(f"{k}: {r[f'mean_{k}']:.2f} ({r[f'min_{k}']:.2f}), gap to software "
                                  f"{software - r[f'mean_{k}']:.2f}" for k in TIMES if f"mean_{k}" in r)
                out += ["", f"`{r['cell']}` read later, mean over chips (worst): {later}."]
    return out


def figure(rows: List[dict], software: float, path: Path) -> None:
    """Mean accuracy over chips (worst chip as a marker) per cell, grouped by array and non-idealities."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells_ = [r for r in rows if "strategy" in r]
    if not cells_:
        return
    groups = list(dict.fromkeys((r["tile"], r["nonideality"]) for r in cells_))
    series = list(dict.fromkeys((r["strategy"], r["bn"]) for r in cells_))
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(2.2 * len(groups) + 3, 5))
    for j, (strategy, bn) in enumerate(series):
        xs, means, mins, errs = [], [], [], []
        for i, g in enumerate(groups):
            r = next((r for r in cells_ if (r["tile"], r["nonideality"]) == g and (r["strategy"], r["bn"]) ==
                      (strategy, bn)), None)
            if r is not None:
                xs.append(i + (j - (len(series) - 1) / 2) * width)
                means.append(r["acc_xbar_mean"])
                mins.append(r["acc_xbar_min"])
                errs.append(r.get("se", 0.0))
        bars = ax.bar(xs, means, width, yerr=errs, capsize=2, label=f"{strategy}, BN {bn}",
                      hatch="" if bn == "chip" else "//", alpha=0.85)
        ax.scatter(xs, mins, marker="v", color=bars.patches[0].get_facecolor() if bars.patches else "k", s=14,
                   zorder=3)
    ax.axhline(software, color="k", ls="--", lw=1, label=f"software ({software:.2f} %)")
    ax.set_xticks(range(len(groups)), [f"{t}x{t}\n{n}" for t, n in groups])
    ax.set_ylabel("test accuracy (%), mean over chips (v: worst chip)")
    ax.set_ylim(0, 100)
    # below the axes: the collapsed cells' bars sit at the bottom of the plot
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
