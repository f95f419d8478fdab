"""From config values to the crossbar core's objects: the layer spec and the chips.

The ``nonideality`` group switches each effect on or off; ``hardware`` and ``xbar``
give its numbers. An effect that is off is passed to the core as absent (0 / None),
so the core never needs to know about the switches.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .crossbar.devices import DeviceModel
from .crossbar.rng import layer_generator
from .crossbar.spec import CrossbarSpec
from .crossbar.variation import Chip
from .nn.convert import LayerSelection
from .nn.energy import EnergyParams


def crossbar_spec(cfg) -> CrossbarSpec:
    """The :class:`CrossbarSpec` of a composed config (hardware, xbar, nonideality)."""
    hw, xb, ni = cfg.hardware, cfg.xbar, cfg.nonideality
    return CrossbarSpec(
        rows=xb.rows or xb.size,
        cols=xb.cols or xb.size,
        g_min=1.0 / hw.r_off,
        g_max=1.0 / hw.r_on,
        r_source=xb.r_source if ni.r_source else 0.0,
        r_sink=xb.r_sink if ni.r_sink else 0.0,
        r_wire=xb.r_wire if ni.r_wire else 0.0,
        v_read=xb.v_read,
        mapping=xb.mapping,
        w_max=xb.w_max,
        levels=hw.levels if ni.levels else None,
        dac_bits=xb.dac_bits if ni.dac else None,
        dac_range=xb.dac_range,
        adc_bits=xb.adc_bits if ni.adc else None,
        adc_range=xb.adc_range,
        adc_range_mode=adc_range_mode(cfg),
        adc_granularity=xb.adc_granularity,
        adc_percentile=xb.adc_percentile,
        dac_range_mode=xb.dac_range_mode,
        dac_percentile=xb.dac_percentile,
        stuck_compensation=getattr(xb, "stuck_compensation", False),
    )


def adc_range_mode(cfg) -> str:
    """How the ADC ranges of this run are set: ``auto`` resolved by the training mode.

    Only technology-aware training trains through the converters, so ``learned`` (and ``auto``)
    is ``calibrated`` for any other training mode: the range a deployed chip of that network
    would calibrate after programming.
    """
    mode = cfg.xbar.adc_range_mode
    tech_aware = cfg.training.mode == "tech_aware"
    if mode == "auto":
        return "learned" if tech_aware else "calibrated"
    if mode == "learned" and not tech_aware:
        return "calibrated"
    return mode


def device_model(cfg) -> DeviceModel:
    """The random device effects that are switched on, with the technology's numbers."""
    hw, ni = cfg.hardware, cfg.nonideality
    return DeviceModel(
        stuck_on=hw.stuck_on if ni.stuck else 0.0,
        stuck_off=hw.stuck_off if ni.stuck else 0.0,
        read_noise=hw.read_noise if ni.read_noise else 0.0,
        drift_nu=hw.drift_nu if ni.drift else 0.0,
        drift_nu_std=hw.drift_nu_std if ni.drift else 0.0,
        drift_t0=hw.drift_t0,
    )


def has_variation(cfg) -> bool:
    """True when a chip differs from the nominal devices (some random or time effect is on and non-zero)."""
    hw, ni = cfg.hardware, cfg.nonideality
    return bool((ni.c2c and hw.c2c > 0) or (ni.d2d and hw.d2d > 0) or not device_model(cfg).is_ideal)


def make_chip(cfg, seed: int, train: bool = False) -> Optional[Chip]:
    """The chip with this seed, or ``None`` when no random effect is on (the nominal devices).

    Evaluation chips are read at ``t0`` (``time=None``; the evaluation moves them to
    each of ``eval.times``). A training chip (``train=True``) with drift on is read
    at a time drawn log-uniformly in ``[t0, max(eval.times)]`` from its seed, so that
    technology-aware training sees every age of the devices it is evaluated at.
    """
    if not has_variation(cfg):
        return None
    hw, ni = cfg.hardware, cfg.nonideality
    dev = device_model(cfg)
    time = None
    if train and dev.has_drift and cfg.eval.times:
        t_hi = max(max(cfg.eval.times), dev.drift_t0)
        u = float(torch.rand((), generator=layer_generator(int(seed), "<chip>", "time"), dtype=torch.float64))
        time = dev.drift_t0 * math.exp(u * math.log(t_hi / dev.drift_t0))
    return Chip(seed=int(seed), c2c=hw.c2c if ni.c2c else 0.0, d2d=hw.d2d if ni.d2d else 0.0, device=dev, time=time)


def layer_selection(cfg) -> LayerSelection:
    """Which layers go on crossbars (``xbar.layers``)."""
    sel = cfg.xbar.layers
    return LayerSelection(include=tuple(sel.include), exclude=tuple(sel.exclude),
                          first_last_digital=sel.first_last_digital)


def energy_params(cfg) -> EnergyParams:
    """The numbers of the energy and latency budget (``energy`` group, ``hardware.t_read``, ``xbar.adc_bits``).

    The converters are counted at ``xbar.adc_bits`` whether or not ``nonideality.adc`` simulates
    their rounding: a chip reads its arrays through them either way.
    """
    e = cfg.energy
    return EnergyParams(t_read=float(cfg.hardware.t_read), adc_fom_j=float(e.adc_fom_j), adc_bits=int(cfg.xbar.adc_bits),
                        dac_energy_j=float(e.dac_energy_j), digital_add_j=float(e.digital_add_j),
                        digital_mult_j=float(e.digital_mult_j), t_conv=float(e.t_conv_s),
                        columns_per_adc=int(e.columns_per_adc), tiles=str(e.tiles))
