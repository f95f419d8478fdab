"""The physical description of the arrays a layer is programmed into."""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Optional

MAPPINGS = ("separate", "interleaved")


@dataclass(frozen=True)
class CrossbarSpec:
    """Everything the circuit model needs to know about one layer's arrays.

    Attributes:
        rows: word lines (inputs) per tile.
        cols: bit lines (outputs) per tile.
        g_min: lowest device conductance, siemens (``1 / r_off``).
        g_max: highest device conductance, siemens (``1 / r_on``).
        r_source: row driver output resistance, ohm.
        r_sink: column neuron input resistance, ohm.
        r_wire: wire segment resistance between neighbouring cells, ohm.
        v_read: read voltage for the largest input, volts.
        mapping: ``"separate"`` (G+ and G- in two arrays of the same shape) or
            ``"interleaved"`` (G+ and G- in neighbouring columns of one array).
        w_max: weight clipping range; ``None`` uses max |W| of the layer.
    """

    rows: int = 64
    cols: int = 64
    g_min: float = 1.0 / 200e3
    g_max: float = 1.0 / 20e3
    r_source: float = 0.0
    r_sink: float = 0.0
    r_wire: float = 0.0
    v_read: float = 0.2
    mapping: str = "separate"
    w_max: Optional[float] = None

    def __post_init__(self):
        for name in ("rows", "cols"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1 (got {v!r})")
        for name in ("g_min", "r_source", "r_sink", "r_wire"):
            v = getattr(self, name)
            if not _finite(v) or v < 0:
                raise ValueError(f"{name} must be finite and >= 0 (got {v!r})")
        for name in ("g_max", "v_read"):
            v = getattr(self, name)
            if not _finite(v) or v <= 0:
                raise ValueError(f"{name} must be finite and > 0 (got {v!r})")
        if not self.g_max > self.g_min:
            raise ValueError(f"g_max must be > g_min (got g_max={self.g_max}, g_min={self.g_min})")
        if self.mapping not in MAPPINGS:
            raise ValueError(f"mapping must be one of {MAPPINGS} (got {self.mapping!r})")
        if self.mapping == "interleaved" and self.cols % 2:
            raise ValueError(f"cols must be even for interleaved mapping (got {self.cols})")
        if self.w_max is not None and (not _finite(self.w_max) or self.w_max <= 0):
            raise ValueError(f"w_max must be finite and > 0 or None (got {self.w_max!r})")

    @property
    def is_ideal_circuit(self) -> bool:
        """True when the circuit multiplies by G exactly (no parasitic resistance)."""
        return self.r_source == 0.0 and self.r_sink == 0.0 and self.r_wire == 0.0

    def replace(self, **changes) -> "CrossbarSpec":
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(changes)
        return CrossbarSpec(**values)


def _finite(v) -> bool:
    try:
        return math.isfinite(float(v))
    except (TypeError, ValueError):
        return False
