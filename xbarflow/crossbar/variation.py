"""Chip-to-chip and device-to-device conductance variation (section 6 of the model note).

A :class:`Chip` is one fabricated chip: a seed fixes every random number it holds,
so the same chip is drawn on every machine. Its conductances are the programmed
ones times a global factor ``exp(c2c * z0)`` shared by the whole chip and a
per-device factor ``exp(d2d * z_ij)`` (lognormal, median 1).
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Sequence

import torch


def _check_sigma(name: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite sigma >= 0 (got {value})")
    return value


def layer_generator(seed: int, name: str, salt: str = "") -> torch.Generator:
    """A CPU generator for one layer of one chip, stable across machines and runs.

    The layer's name is hashed with CRC32 (not Python's salted ``hash``) so that
    seeds mean the same thing in every process.
    """
    key = zlib.crc32(f"{name}|{salt}".encode())
    gen = torch.Generator(device="cpu")
    gen.manual_seed((int(seed) * 0x9E3779B1 + key) % (2**63 - 1))
    return gen


@dataclass(frozen=True)
class Chip:
    """One random draw of a fabricated chip.

    Attributes:
        seed: integer that fixes every random number of this chip.
        c2c: sigma of the log of the chip-wide conductance factor.
        d2d: sigma of the log of the per-device conductance factor.
    """

    seed: int
    c2c: float = 0.0
    d2d: float = 0.0

    def __post_init__(self):
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer (got {self.seed!r})")
        _check_sigma("c2c", self.c2c)
        _check_sigma("d2d", self.d2d)

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
            Factors (dimensionless), shape ``shape``; drawn in float64 on the CPU so
            that the same chip has the same devices on every machine.
        """
        f = torch.full(tuple(shape), self.global_factor(), dtype=torch.float64)
        if self.d2d > 0.0:
            z = torch.randn(tuple(shape), generator=layer_generator(self.seed, name, "d2d"), dtype=torch.float64)
            f = f * torch.exp(self.d2d * z)
        return f.to(dtype=dtype, device=device)

    def apply(self, G: torch.Tensor, name: str) -> torch.Tensor:
        """Conductances of this chip: ``G`` times its factors (differentiable in G)."""
        if self.c2c == 0.0 and self.d2d == 0.0:
            return G
        return G * self.conductance_factors(name, G.shape, dtype=G.dtype, device=G.device)
