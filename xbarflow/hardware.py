"""From config values to the crossbar core's objects: the layer spec and the chips."""
from __future__ import annotations

from typing import Optional

from .crossbar.spec import CrossbarSpec
from .crossbar.variation import Chip


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
    )


def has_variation(cfg) -> bool:
    """True when a chip differs from the nominal devices (some random effect is on and non-zero)."""
    hw, ni = cfg.hardware, cfg.nonideality
    return (ni.c2c and hw.c2c > 0) or (ni.d2d and hw.d2d > 0)


def make_chip(cfg, seed: int) -> Optional[Chip]:
    """The chip with this seed, or ``None`` when no random effect is on (the nominal devices)."""
    if not has_variation(cfg):
        return None
    hw, ni = cfg.hardware, cfg.nonideality
    return Chip(seed=int(seed), c2c=hw.c2c if ni.c2c else 0.0, d2d=hw.d2d if ni.d2d else 0.0)
