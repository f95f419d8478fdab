#!/usr/bin/env python
"""Benchmark: a run's evaluation with the energy measurement against without, same process, warm.

The model and data come from Hydra overrides, as a run composes them (default: the FCN 784-500-10
on mnist5k, RRAM, 64x64 tiles, the paper's non-idealities, 5 chips). The weights are untrained:
the time does not depend on them. The converters are calibrated as a run does; then, after one
untimed call of each, ``--rounds`` times in turn, each starting from empty caches (the layers'
effective weights and the energy's solves), as a run's single evaluation does:

* ``without``: :func:`xbarflow.pipeline.evaluate_on_test` (software, nominal crossbar, the chips);
* ``with``: :func:`xbarflow.pipeline.measure_energy_per_image`, then the same evaluation: the
  order of a run with ``energy.enabled=true``, whose evaluation reuses the energy step's nominal
  solve.

Printed: the median of each and their ratio, in wall-clock time and in the process's CPU time
(with one torch thread the CPU time does not count the waits of a machine shared with other
jobs, so it is the steadier of the two), and the energy step's own share. The last line is one
JSON object.

    python scripts/bench_energy.py                          # the default run
    python scripts/bench_energy.py experiment=paper_cnn xbar.size=128 --rounds 3
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for run.py")
    parser.add_argument("--rounds", type=int, default=5, help="timed calls of each variant, alternating")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args(argv)

    import torch
    from hydra import compose, initialize_config_dir

    from xbarflow import pipeline
    from xbarflow.config import register_configs, validate
    from xbarflow.data import build_datasets
    from xbarflow.nn import energy as nn_energy
    from xbarflow.nn import xbar_layers

    torch.set_num_threads(args.threads)
    register_configs()
    with initialize_config_dir(config_dir=os.path.join(REPO, "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(args.overrides))
    typed = validate(cfg)
    pipeline.seed_everything(typed.seed)
    data = build_datasets(typed.dataset)
    model = pipeline.build_crossbar_model(typed, data)
    device = torch.device("cpu")
    pipeline.calibrate_periphery(typed, model, data, device)

    def cold():
        nn_energy._READ_MODEL.clear()
        for layer in xbar_layers(model):
            layer._cache_key = None
            layer._cache_weight = None

    reports = []
    parts = {"energy": ([], [])}

    def without():
        cold()
        pipeline.evaluate_on_test(typed, model, data, device)

    def with_energy():
        cold()
        t0, c0 = time.perf_counter(), time.process_time()
        reports.append(pipeline.measure_energy_per_image(typed, model, data, device))
        parts["energy"][0].append(time.perf_counter() - t0)
        parts["energy"][1].append(time.process_time() - c0)
        pipeline.evaluate_on_test(typed, model, data, device)

    variants = {"without": without, "with": with_energy}
    for step in variants.values():
        step()  # warm
    parts["energy"][0].clear()
    parts["energy"][1].clear()
    wall: dict = {name: [] for name in variants}
    cpu: dict = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, step in variants.items():
            t0, c0 = time.perf_counter(), time.process_time()
            step()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    med = {f"{k}_{unit}": round(statistics.median(v[k]), 3) for unit, v in (("s", wall), ("cpu_s", cpu)) for k in v}
    med["energy_step_s"] = round(statistics.median(parts["energy"][0]), 3)
    med["energy_step_cpu_s"] = round(statistics.median(parts["energy"][1]), 3)
    ratio, ratio_cpu = med["with_s"] / med["without_s"], med["with_cpu_s"] / med["without_cpu_s"]
    summary = {"overrides": list(args.overrides), "threads": args.threads, "rounds": args.rounds,
               "test_images": len(data.test), "n_chips": typed.eval.n_chips,
               "energy_samples": min(typed.energy.samples, len(data.test)), **med,
               "ratio": round(ratio, 3), "ratio_cpu": round(ratio_cpu, 3)}
    print(f"wall: evaluation {med['without_s']:.3f} s without energy, {med['with_s']:.3f} s with "
          f"(energy step {med['energy_step_s']:.3f} s): {ratio:.3f} x")
    print(f"CPU:  evaluation {med['without_cpu_s']:.3f} s without energy, {med['with_cpu_s']:.3f} s with "
          f"(energy step {med['energy_step_cpu_s']:.3f} s): {ratio_cpu:.3f} x")
    if reports and reports[-1] is not None:
        m = reports[-1].metrics()
        summary.update({"total_pj_per_image": round(m["energy/total_pj_per_image"], 1),
                        "tops_per_w": round(m["energy/tops_per_w"], 3)})
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
