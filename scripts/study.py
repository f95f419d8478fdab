"""Run a study's cells one by one, resumably: a software network, fine-tunes from it, evaluations.

    OMP_NUM_THREADS=1 python scripts/study.py results/resnet_fashion/plan.yaml --dir studies/resnet_fashion
    python scripts/study.py results/resnet_fashion/plan.yaml --dir studies/resnet_fashion --list
    python scripts/study.py PLAN --dir DIR --only 'tech_aware-64-*'      # a subset (fnmatch on names)

The plan (YAML, see ``results/resnet_fashion/plan.yaml``) names an experiment, the overrides of
the run that trains the software network, and the axes: arrays (``tiles``), non-ideality sets,
strategies (``null``: the software network itself; otherwise overrides of a fine-tune that starts
from the software network's weights, ``training.init_from``) and BatchNorm options. Cells:

* ``software``: trains the software network (its own evaluation is on the experiment's arrays);
* ``<strategy>-<tile>-<nonideality>-bn_<first option>``: the fine-tune (or, for ``null``, an
  evaluation-only run of the software network) with the first BatchNorm option;
* ``...-bn_<other option>``: evaluation-only runs of the same weights with the other options.

Each cell is one ``run.py`` job with its own folder ``DIR/<cell>`` (``hydra.run.dir``) and the
study's own tracking store ``DIR/mlflow.db`` (``--tracking-uri`` to log elsewhere). A cell whose
folder holds ``DONE`` is skipped; a cell that was stopped is resumed from its last checkpoint
(``resume=true``), so the study can be stopped and started again at any point, across sessions.
A failed cell is reported and the study goes on with the cells that do not need it.
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

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
                    out.append(Cell(first, [*s_over, *hw, f"eval.bn_recalibration={bn[0]}"], "software", "train"))
                weights_of = "software" if s_over is None else first
                for option in bn[1:]:
                    out.append(Cell(f"{stem}-bn_{option}", [*hw, f"eval.bn_recalibration={option}"], weights_of,
                                    "evaluate"))
    return out


def run_id_of(folder: Path) -> Optional[str]:
    """The MLflow run of a finished cell (``mlflow_run.json`` written by the run)."""
    try:
        return json.loads((folder / "mlflow_run.json").read_text())["run_id"]
    except (OSError, ValueError, KeyError):
        return None


def command(cell: Cell, plan: dict, study: Path, tracking_uri: str) -> List[str]:
    folder = study / cell.name
    args = [sys.executable, str(REPO / "run.py"), f"experiment={plan['experiment']}", *cell.overrides,
            f"hydra.run.dir={folder}", f"logger.tracking_uri={tracking_uri}", f"run_name={cell.name}"]
    if cell.needs is not None:
        base = study / cell.needs
        if cell.how == "evaluate":
            args += ["mode=evaluate", f"source={run_id_of(base)}"]
        else:
            args += [f"training.init_from={base / 'weights.pt'}"]
    if (folder / "mlflow_run.json").exists() and cell.how == "train":
        args.append("resume=true")
    return args


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("plan", type=Path)
    p.add_argument("--dir", type=Path, required=True, help="the study's folder (cells, tracking store)")
    p.add_argument("--tracking-uri", default=None, help="default: sqlite:///<dir>/mlflow.db")
    p.add_argument("--only", action="append", default=[], help="fnmatch pattern(s) on cell names")
    p.add_argument("--list", action="store_true", help="list the cells and their state, run nothing")
    a = p.parse_args(argv)
    plan = yaml.safe_load(a.plan.read_text())
    study = a.dir.resolve()
    study.mkdir(parents=True, exist_ok=True)
    uri = a.tracking_uri or f"sqlite:///{study / 'mlflow.db'}"
    todo = [c for c in cells(plan) if not a.only or any(fnmatch.fnmatchcase(c.name, o) for o in a.only)]
    failed = []
    for cell in todo:
        folder = study / cell.name
        state = "done" if (folder / DONE).exists() else "started" if folder.exists() else "to do"
        if a.list:
            print(f"{cell.name:40s} {state:8s} {' '.join(cell.overrides)}")
            continue
        if state == "done":
            continue
        if cell.needs is not None and not (study / cell.needs / DONE).exists():
            print(f"skip {cell.name}: {cell.needs} is not done", flush=True)
            failed.append(cell.name)
            continue
        args = command(cell, plan, study, uri)
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


if __name__ == "__main__":
    sys.exit(main())
