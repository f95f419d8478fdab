"""Device effects beyond chip-to-chip/device-to-device variation (section 6 of the model note).

:class:`DeviceModel` holds a technology's numbers for the *random* device effects; a
:class:`~xbarflow.crossbar.variation.Chip` carries one and draws every random number
from its own seed, each effect from its own CRC32-salted generator
(:func:`~xbarflow.crossbar.variation.layer_generator`), so that the same chip has the
same devices on every machine and turning one effect on or off does not change the
draws of another.

The deterministic programming precision (finite conductance ``levels``) is
:func:`quantize_levels`; it is a property of how a layer is programmed
(:class:`~xbarflow.crossbar.spec.CrossbarSpec`), applied with or without a chip.

Order of the effects on a layer's physical arrays (see :func:`xbarflow.crossbar.effective.device_conductances`):

1. programming: mapping (section 3), tiling, with ``stuck_compensation`` the partner of each
   stuck device retargeted to keep the pair's difference (:func:`compensate_stuck_pairs`),
   rounding to ``levels``;
2. programming error: chip-wide (c2c) and per-device (d2d) lognormal factors;
3. stuck cells: replace a device by ``g_max`` (stuck-at-on) or ``g_min`` (stuck-at-off);
4. drift: ``G(t) = G * (t / t0) ** -nu``, ``nu`` per device;
5. read noise: ``G * (1 + read_noise * z)``, a fresh ``z`` at every read;
6. the circuit (parasitic resistances), then the peripherals (:mod:`.peripherals`).

To add an effect: a field here (with a check in ``__post_init__``), a function
below, one line in ``device_conductances``, and its numbers in ``conf/hardware/``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from .rng import draw, on_device


def ste(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Straight-through estimator: the value of ``y`` with the gradient of ``x`` (identity)."""
    return x + (y - x).detach()


def _check(name: str, value: float, lo: float = 0.0, hi: float = math.inf, lo_open: bool = False) -> float:
    value = float(value)
    ok = math.isfinite(value) and (value > lo if lo_open else value >= lo) and value <= hi
    if not ok:
        rng = f"{'>' if lo_open else '>='} {lo}" + (f" and <= {hi}" if hi != math.inf else "")
        raise ValueError(f"{name} must be finite and {rng} (got {value})")
    return value


@dataclass(frozen=True)
class DeviceModel:
    """A technology's random device effects (all off by default).

    Attributes:
        stuck_on: probability that a device is stuck at its lowest resistance (``g_max``).
        stuck_off: probability that a device is stuck at its highest resistance (``g_min``).
        read_noise: sigma of the relative conductance fluctuation per read (dimensionless).
        drift_nu: mean drift exponent ``nu`` of ``G(t) = G0 (t / t0) ** -nu``.
        drift_nu_std: spread (sigma) of ``nu`` from device to device; ``nu`` is clipped at 0.
        drift_t0: seconds after programming at which ``G = G0`` (drift starts there).
    """

    stuck_on: float = 0.0
    stuck_off: float = 0.0
    read_noise: float = 0.0
    drift_nu: float = 0.0
    drift_nu_std: float = 0.0
    drift_t0: float = 1.0

    def __post_init__(self):
        _check("stuck_on", self.stuck_on, hi=1.0)
        _check("stuck_off", self.stuck_off, hi=1.0)
        if self.stuck_on + self.stuck_off > 1.0:
            raise ValueError(f"stuck_on + stuck_off must be <= 1 (got {self.stuck_on} + {self.stuck_off})")
        _check("read_noise", self.read_noise)
        _check("drift_nu", self.drift_nu)
        _check("drift_nu_std", self.drift_nu_std)
        _check("drift_t0", self.drift_t0, lo_open=True)

    @property
    def has_stuck(self) -> bool:
        return self.stuck_on > 0.0 or self.stuck_off > 0.0

    @property
    def has_drift(self) -> bool:
        return self.drift_nu > 0.0 or self.drift_nu_std > 0.0

    @property
    def has_read_noise(self) -> bool:
        return self.read_noise > 0.0

    @property
    def is_ideal(self) -> bool:
        return not (self.has_stuck or self.has_drift or self.has_read_noise)


def quantize_levels(G: torch.Tensor, levels: int, g_min: float, g_max: float) -> torch.Tensor:
    """Program to the nearest of ``levels`` equally spaced conductances in ``[g_min, g_max]``.

    Args:
        G: target conductances, siemens, any shape.
        levels: number of programmable values (>= 2), ``g_min`` and ``g_max`` included.

    Returns:
        Conductances on the grid, siemens; the gradient passes straight through (STE).
    """
    step = (g_max - g_min) / (levels - 1)
    q = g_min + torch.round((G.clamp(g_min, g_max) - g_min) / step) * step
    return ste(G, q)


def apply_stuck(G: torch.Tensor, model: DeviceModel, seed: int, name: str, g_min: float, g_max: float) -> torch.Tensor:
    """Replace stuck devices: ``u < stuck_on`` -> ``g_max``; ``stuck_on <= u < stuck_on + stuck_off`` -> ``g_min``.

    ``u ~ U(0, 1)`` per device from the chip's seed (salt ``"stuck"``). Stuck devices
    get no gradient (they ignore their programmed value).
    """
    if not model.has_stuck:
        return G
    on, off = _stuck_masks(model, seed, name, tuple(G.shape), G.device)
    G = torch.where(on, torch.full_like(G, g_max), G)
    return torch.where(off, torch.full_like(G, g_min), G)


def _stuck_masks(model: DeviceModel, seed: int, name: str, shape, device):
    """``(stuck_on, stuck_off)`` boolean masks of the chip's devices, shape ``shape``."""
    # compared in float64, as drawn: the same cells are stuck on every machine
    u = on_device(lambda: draw("rand", shape, seed, name, "stuck"), dtype=torch.float64, device=device,
                  key=("stuck", seed, name, shape))
    return u < model.stuck_on, (u >= model.stuck_on) & (u < model.stuck_on + model.stuck_off)


def stuck_conductances(G: torch.Tensor, model: DeviceModel, seed: int, name: str, g_min: float,
                       g_max: float) -> Optional[torch.Tensor]:
    """The conductance each stuck device holds (``g_max`` or ``g_min``, siemens), NaN where the
    device is not stuck; shape and dtype of ``G``. ``None`` without stuck cells.

    What a program-and-verify pass learns about a chip: a device that does not move is stuck,
    and its read-back value says where. The same cells as :func:`apply_stuck`.
    """
    if not model.has_stuck:
        return None
    on, off = _stuck_masks(model, seed, name, tuple(G.shape), G.device)
    stuck = torch.full_like(G, float("nan"), requires_grad=False)
    stuck = torch.where(on, torch.full_like(stuck, g_max), stuck)
    return torch.where(off, torch.full_like(stuck, g_min), stuck)


def compensate_stuck_pairs(G: torch.Tensor, stuck: torch.Tensor, partner, g_min: float, g_max: float) -> torch.Tensor:
    """Program the partner of each stuck device so that the pair's difference is kept.

    A weight is the difference of a device pair, ``G+ - G-``. When one device of a pair is
    stuck at ``s`` instead of its target ``g``, its partner's target ``h`` becomes
    ``h + (s - g)``, clipped to ``[g_min, g_max]``. Exact where that stays in range: a
    stuck-at-on device that carries the weight (its partner moves up by the same amount).
    Otherwise the nearest the range allows: a stuck-at-on device on the weight's idle side
    leaves an error of ``|w|`` (both at ``g_max``) instead of about the full scale; a
    stuck-at-off device that carries the weight leaves ``|w|`` as before. Pairs with both
    devices stuck, and devices not stuck, keep their targets.

    Args:
        G: programmed target conductances, siemens, a layer's arrays in their layout.
        stuck: :func:`stuck_conductances` of the same arrays (NaN: not stuck).
        partner: maps a tensor of the arrays' layout to its pair partners' values (an
            involution: ``partner(partner(x)) == x``), e.g. :func:`~xbarflow.crossbar.mapping.pair_partner`.

    Returns:
        Target conductances, siemens, shape of ``G``; differentiable in G (the clip passes no
        gradient where it binds). The stuck devices themselves are replaced later
        (:func:`apply_stuck`).
    """
    stuck_partner = partner(stuck)
    fix = stuck.isnan() & ~stuck_partner.isnan()
    moved = (G + (stuck_partner.nan_to_num(0.0) - partner(G))).clamp(g_min, g_max)
    return torch.where(fix, moved, G)


def drift_factors(model: DeviceModel, t: Optional[float], shape, seed: int, name: str, dtype, device):
    """``(t / t0) ** -nu`` per device (``nu ~ N(drift_nu, drift_nu_std)``, clipped at 0), or ``None``.

    ``t`` in seconds after programming; ``None`` or ``t <= t0`` means no drift yet
    (the power law holds from ``t0`` on). Salt ``"drift"``. Without a spread of ``nu`` the
    factor is one number (a float), the same for every device.
    """
    if not model.has_drift or t is None or t <= model.drift_t0:
        return None
    log_ratio = math.log(t / model.drift_t0)
    if model.drift_nu_std == 0.0:
        return math.exp(-model.drift_nu * log_ratio)  # a number: no host-to-device copy
    shape = tuple(int(s) for s in shape)

    def make():
        nu = (model.drift_nu + model.drift_nu_std * draw("randn", shape, seed, name, "drift")).clamp_min(0.0)
        return torch.exp(-nu * log_ratio)

    return on_device(make, dtype=dtype, device=device,
                     key=("drift", seed, name, shape, model.drift_nu, model.drift_nu_std, log_ratio))


def apply_read_noise(G: torch.Tensor, model: DeviceModel, seed: int, name: str, read: int) -> torch.Tensor:
    """One read's conductances: ``G * (1 + read_noise * z)``, ``z ~ N(0, 1)`` per device, clipped at 0.

    ``read`` numbers the reads of this layer on this chip (salt ``"read<n>"``): every
    read draws afresh, and the ``n``-th read of a chip is the same on every machine.
    """
    if not model.has_read_noise:
        return G
    z = on_device(lambda: draw("randn", G.shape, seed, name, f"read{int(read)}"), dtype=G.dtype, device=G.device)
    return (G * (1.0 + model.read_noise * z)).clamp_min(0.0)
