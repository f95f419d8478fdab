#!/usr/bin/env python
"""The energy model against IBM's 64-core PCM chip: TOPS/W of an IBM-like 256x256 layer at 8-bit in/out.

Published (Le Gallo et al., "A 64-core mixed-signal in-memory compute chip based on phase-change
memory for deep neural network inference", Nature Electronics 2023, abstract): 64 cores of 256x256
PCM unit cells in 14 nm; for 8-bit input/output matrix-vector multiplications 9.76 TOPS/W at
63.1 TOPS in the one-phase (low-precision) read mode and 2.48 TOPS/W at 16.1 TOPS in the
four-phase (high-precision) mode. 63.1 TOPS over 64 cores is one 256x256 multiplication
(2 x 256 x 256 operations) per 133 ns, conversion included: ``hardware=pcm`` reads for 130 ns.

The IBM-like layer: ``nn.Linear(256, 256)`` as torch initialises it (seed 0) on one 256x256 tile
of ``hardware=pcm``, 8-bit DAC and ADC (``xbar.dac_bits``/``adc_bits``), every other number the
repository's defaults (``conf/energy/default.yaml``, the paper's 1 kOhm driver and neuron
resistances), a column gain and bias per output (the chip's local digital unit applies an
affine correction per column), 256 inputs per read drawn uniformly from the 8-bit codes of [0, 1].

One phase is one read (:func:`xbarflow.nn.energy.measure_energy`). In the four-phase mode the chip
applies inputs and weights of each polarity in turn, four modulation cycles (its Extended Data
Fig. 4): each device still conducts in one of them, so the array's energy is that of one read,
while the converters work in all four; the four partial results add up digitally:
``E_4 = array + 4 (DAC + ADC) + digital + 3 x 256 additions``.

Printed: one line per variant (the IBM-like layer, then what changes it: the ADC figure of
Kull et al. instead of the default, ideal drivers and neurons, Gaussian weights), the parts in
nJ per multiplication, TOPS/W in both modes and their ratio to the published figures, and the
part that dominates. The last line is one JSON object.

    python scripts/validate_energy_ibm.py
"""
from __future__ import annotations

import json
import os
import sys
from typing import Dict, Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

PUBLISHED_TOPS_PER_W = {"one_phase": 9.76, "four_phase": 2.48}
IBM_LIKE = ("hardware=pcm", "xbar.size=256", "xbar.dac_bits=8", "xbar.adc_bits=8")


def ibm_like_layer(overrides: Sequence[str] = (), *, adc_fom_j: Optional[float] = None,
                   weights: str = "torch", reads: int = 256) -> Dict[str, object]:
    """TOPS/W and the parts of one 256x256 layer on the IBM-like configuration (plus ``overrides``).

    Args:
        overrides: further Hydra overrides.
        adc_fom_j: replaces ``energy.adc_fom_j``.
        weights: ``"torch"`` (nn.Linear's initialisation, seed 0) or ``"gaussian"`` (standard normal).
        reads: input vectors (8-bit codes in [0, 1], seed 0).
    """
    import torch
    from hydra import compose, initialize_config_dir

    from xbarflow.config import register_configs, validate
    from xbarflow.hardware import crossbar_spec, energy_params
    from xbarflow.nn import convert
    from xbarflow.nn.energy import EnergyParams, measure_energy

    register_configs()
    with initialize_config_dir(config_dir=os.path.join(REPO, "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[*IBM_LIKE, *overrides])
    typed = validate(cfg)
    spec, params = crossbar_spec(typed), energy_params(typed)
    if adc_fom_j is not None:
        params = EnergyParams(**{**params.__dict__, "adc_fom_j": adc_fom_j})
    torch.manual_seed(0)
    layer = torch.nn.Linear(256, 256)
    if weights == "gaussian":
        with torch.no_grad():
            layer.weight.normal_()
    net = convert(torch.nn.Sequential(layer), spec)
    x = torch.randint(0, 256, (reads, 256), generator=torch.Generator().manual_seed(0)).float() / 255
    report = measure_energy(net, [x], params, column_gain=True)
    parts = {p: report.part_j(p) for p in ("array", "dac", "adc", "digital")}
    one = report.total_j
    four = parts["array"] + 4 * (parts["dac"] + parts["adc"]) + parts["digital"] + 3 * 256 * params.digital_add_j
    ops = report.ops
    out: Dict[str, object] = {
        "overrides": list(overrides), "adc_fom_j": params.adc_fom_j, "weights": weights,
        "t_read_s": params.t_read, "r_source": spec.r_source, "r_sink": spec.r_sink, "v_read": spec.v_read,
        **{f"{p}_nj": round(v * 1e9, 4) for p, v in parts.items()},
        "one_phase_tops_per_w": round(ops / one / 1e12, 3), "four_phase_tops_per_w": round(ops / four / 1e12, 3),
        "dominant": report.dominant(),
    }
    for mode, published in PUBLISHED_TOPS_PER_W.items():
        out[f"{mode}_vs_published"] = round(float(out[f"{mode}_tops_per_w"]) / published, 3)  # type: ignore[arg-type]
    return out


VARIANTS = [
    ("IBM-like (repository defaults)", {}),
    ("ADC of Kull et al. (10 fJ/step)", {"adc_fom_j": 1.0e-14}),
    ("ideal drivers and neurons (r_source = r_sink = 0)", {"overrides": ["xbar.r_source=0", "xbar.r_sink=0"]}),
    ("Gaussian weights", {"weights": "gaussian"}),
]


def main() -> int:
    rows = []
    print(f"published: {PUBLISHED_TOPS_PER_W['one_phase']} TOPS/W one-phase, "
          f"{PUBLISHED_TOPS_PER_W['four_phase']} TOPS/W four-phase (Le Gallo et al., Nature Electronics 2023)")
    for name, kw in VARIANTS:
        r = ibm_like_layer(**kw)  # type: ignore[arg-type]
        rows.append({"variant": name, **r})
        print(f"{name}: array {r['array_nj']} nJ, DAC {r['dac_nj']} nJ, ADC {r['adc_nj']} nJ, digital "
              f"{r['digital_nj']} nJ per multiplication; one-phase {r['one_phase_tops_per_w']} TOPS/W "
              f"({r['one_phase_vs_published']}x published), four-phase {r['four_phase_tops_per_w']} TOPS/W "
              f"({r['four_phase_vs_published']}x); {r['dominant']} dominates")
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
