#!/usr/bin/env python
"""Energy and latency per image of the paper's FCN against the array size (results/energy/README.md).

The network of ``experiment=paper_fcn`` (FCN 784-500-10, mnist5k, RRAM, the paper's 1 kOhm driver
and neuron resistances) is trained once in software (Adam, ``--epochs`` epochs, seed 0; the
energy depends on the weights only through the array part), then programmed onto each layout of the
study's sweep (square tiles 16 ... 512, and the first layer in one 784x500 array) and measured as a
run measures it (:func:`xbarflow.pipeline.measure_energy_per_image`: the first ``energy.samples``
test images on the nominal crossbar, the repository's energy numbers). Written: ``--out``/energy_vs_size.json
and .md (one row per layout: arrays, the parts, total, latency, TOPS/W).

    python scripts/energy_vs_size.py --out results/energy
"""
from __future__ import annotations

import argparse
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

LAYOUTS = [("16x16", ["xbar.size=16"]), ("32x32", ["xbar.size=32"]), ("64x64", ["xbar.size=64"]),
           ("128x128", ["xbar.size=128"]), ("256x256", ["xbar.size=256"]), ("512x512", ["xbar.size=512"]),
           ("784x500", ["xbar.rows=784", "xbar.cols=500"])]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join(REPO, "results", "energy"))
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args(argv)

    import torch
    from hydra import compose, initialize_config_dir

    from xbarflow import pipeline
    from xbarflow.builders import build_model
    from xbarflow.config import register_configs, validate
    from xbarflow.data import build_datasets
    from xbarflow.nn import crossbar_array_count

    register_configs()

    def typed_config(overrides):
        with initialize_config_dir(config_dir=os.path.join(REPO, "conf"), version_base="1.3"):
            return validate(compose(config_name="config", overrides=["experiment=paper_fcn", *overrides]))

    typed = typed_config([])
    pipeline.seed_everything(typed.seed)
    data = build_datasets(typed.dataset)
    net = build_model(typed.model, data.in_shape, data.num_classes)
    opt = torch.optim.Adam(net.parameters(), lr=typed.training.lr)
    loader = torch.utils.data.DataLoader(data.train, batch_size=typed.training.batch_size, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    for _ in range(args.epochs):
        for x, y in loader:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        correct = sum(int((net(x).argmax(1) == y).sum()) for x, y in torch.utils.data.DataLoader(data.test, batch_size=1000))
    software = 100.0 * correct / len(data.test)
    state = net.state_dict()

    rows = []
    for name, overrides in LAYOUTS:
        typed = typed_config(overrides)
        model = pipeline.build_crossbar_model(typed, data)
        model.load_state_dict(state, strict=False)
        report = pipeline.measure_energy_per_image(typed, model, data, torch.device("cpu"))
        m = report.metrics()
        rows.append({"layout": name, "arrays": crossbar_array_count(model),
                     **{k.split("/")[1]: round(v, 3) for k, v in m.items()}, "dominant": report.dominant()})
        print(rows[-1], flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "energy_vs_size.json"), "w") as f:
        json.dump({"software_accuracy": software, "epochs": args.epochs, "rows": rows}, f, indent=1)
    lines = ["| layout | arrays | array pJ | DAC pJ | ADC pJ | digital pJ | total pJ | latency ns | TOPS/W | dominant |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['layout']} | {r['arrays']} | {r['array_pj_per_image']:.4g} | {r['dac_pj_per_image']:.4g} "
                     f"| {r['adc_pj_per_image']:.4g} | {r['digital_pj_per_image']:.4g} | {r['total_pj_per_image']:.4g} "
                     f"| {r['ns_per_image']:.4g} | {r['tops_per_w']:.3g} | {r['dominant']} |")
    with open(os.path.join(args.out, "energy_vs_size.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"software accuracy {software:.1f} %")
    return 0


if __name__ == "__main__":
    sys.exit(main())
