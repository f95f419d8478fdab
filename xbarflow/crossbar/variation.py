"""Chip-to-chip and device-to-device conductance variation (section 6 of the model note).

A :class:`Chip` is one fabricated chip: a seed fixes every random number it holds,
so the same chip is drawn on every machine. Its conductances are the programmed
ones times a global factor ``exp(c2c * z0)`` shared by the whole chip and a
per-device factor ``exp(d2d * z_ij)`` (lognormal, median 1).

A chip also carries its technology's random device effects
(:class:`~xbarflow.crossbar.devices.DeviceModel`: stuck cells, drift, read noise)
and the time at which it is read (drift). Each effect draws from its own salted
generator of the chip's seed, so the same seed gives the same devices everywhere.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Optional, Sequence

import torch

from . import devices as _dev
from . import rng as _rng
from .devices import DeviceModel
from .rng import layer_generator  # noqa: F401  (re-exported: the chip's generators)


def _check_sigma(name: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite sigma >= 0 (got {value})")
    return value


@dataclass(frozen=True)
class Chip:
    """One random draw of a fabricated chip.

    Attributes:
        seed: integer that fixes every random number of this chip.
        c2c: sigma of the log of the chip-wide conductance factor.
        d2d: sigma of the log of the per-device conductance factor.
        device: the random device effects of the technology (stuck, drift, read noise).
        time: seconds since programming at which the chip is read (drift);
            ``None`` reads it at ``device.drift_t0`` (no drift yet).
    """

    seed: int
    c2c: float = 0.0
    d2d: float = 0.0
    device: DeviceModel = field(default_factory=DeviceModel)
    time: Optional[float] = None

    def __post_init__(self):
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer (got {self.seed!r})")
        _check_sigma("c2c", self.c2c)
        _check_sigma("d2d", self.d2d)
        if not isinstance(self.device, DeviceModel):
            raise ValueError(f"device must be a DeviceModel (got {self.device!r})")
        if self.time is not None and (not math.isfinite(float(self.time)) or float(self.time) <= 0):
            raise ValueError(f"time must be finite and > 0 seconds or None (got {self.time!r})")

    def at(self, time: Optional[float]) -> "Chip":
        """The same chip (same devices) read ``time`` seconds after programming."""
        return replace(self, time=None if time is None else float(time))

    @property
    def per_read(self) -> bool:
        """True when every read of this chip differs (read noise): nothing can be cached."""
        return self.device.has_read_noise

    def global_factor(self) -> float:
        """The chip-wide multiplicative factor on every conductance (dimensionless)."""
        if self.c2c == 0.0:
            return 1.0
        z = torch.randn((), generator=layer_generator(self.seed, "<chip>"), dtype=torch.float64)
        return float(torch.exp(self.c2c * z))

    def conductance_factors(self, name: str, shape: Sequence[int], dtype=torch.float32, device=None) -> torch.Tensor:
        """Multiplicative factors on the physical conductances of the layer ``name``.

        Args:
            name: the layer's stable name (its qualified module name).
            shape: shape of the layer's physical arrays (tiles included).

        Returns:
            Factors (dimensionless), shape ``shape``, on ``device``: drawn and computed in
            float64 on the CPU so that the same chip has the same devices on every
            machine, then kept on the device for the chip's next read
            (:func:`~xbarflow.crossbar.rng.on_device`; do not modify in place).
        """
        shape = tuple(int(s) for s in shape)

        def make():
            f = torch.full(shape, self.global_factor(), dtype=torch.float64)
            if self.d2d > 0.0:
                f = f * torch.exp(self.d2d * _rng.draw("randn", shape, self.seed, name, "d2d"))
            return f

        return _rng.on_device(make, dtype=dtype, device=device,
                              key=("factors", self.seed, self.c2c, self.d2d, name, shape))

    def apply(self, G: torch.Tensor, name: str) -> torch.Tensor:
        """Conductances of this chip: ``G`` times its factors (differentiable in G)."""
        if self.c2c == 0.0 and self.d2d == 0.0:
            return G
        return G * self.conductance_factors(name, G.shape, dtype=G.dtype, device=G.device)

    def devices(self, G: torch.Tensor, name: str, g_min: float, g_max: float) -> torch.Tensor:
        """Programmed conductances (siemens, any shape) -> this chip's devices at ``self.time``.

        Programming error (c2c, d2d), then stuck cells, then drift; the order of
        :mod:`xbarflow.crossbar.devices`. Differentiable in G (stuck devices excepted).
        """
        G = self.apply(G, name)
        G = _dev.apply_stuck(G, self.device, self.seed, name, g_min, g_max)
        f = _dev.drift_factors(self.device, self.time, G.shape, self.seed, name, G.dtype, G.device)
        return G if f is None else G * f

    def stuck_conductances(self, G: torch.Tensor, name: str, g_min: float, g_max: float) -> Optional[torch.Tensor]:
        """Where this chip's devices of ``G``'s arrays are stuck, and at what (siemens; NaN: not
        stuck), as a program-and-verify pass finds them; ``None`` without stuck cells."""
        return _dev.stuck_conductances(G, self.device, self.seed, name, g_min, g_max)

    def read(self, G: torch.Tensor, name: str, read: int = 0) -> torch.Tensor:
        """The conductances seen by read number ``read`` (read noise; identity without it)."""
        return _dev.apply_read_noise(G, self.device, self.seed, name, read)
