"""The physical description of the arrays a layer is programmed into."""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Optional

MAPPINGS = ("separate", "interleaved")
ADC_RANGE_MODES = ("fixed", "calibrated", "learned")
ADC_GRANULARITIES = ("tile", "column")
DAC_RANGE_MODES = ("per_sample", "fixed", "calibrated")


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
        levels: number of programmable conductances in ``[g_min, g_max]`` (>= 2);
            ``None`` programs any value (continuous).
        dac_bits: row DAC resolution, bits; ``None`` for ideal drivers.
        dac_range: DAC full scale in input units; ``None`` uses each sample's max |x|.
        adc_bits: column ADC resolution, bits; ``None`` for ideal read-out (no
            per-tile quantisation: the forward pass is one matmul).
        adc_range: ADC full scale as a fraction of the largest differential current a
            tile can produce, ``rows * (g_max - g_min) * v_read`` (see :mod:`.peripherals`);
            with ``adc_range_mode`` ``calibrated`` or ``learned``, the starting value.
        adc_range_mode: ``"fixed"`` (``adc_range`` for every converter), ``"calibrated"``
            (per tile or column pair, a percentile of the outputs on a calibration batch) or
            ``"learned"`` (calibrated, then trained with the weights).
        adc_granularity: ``"tile"`` (one range per tile) or ``"column"`` (one per column pair).
        dac_range_mode: ``"per_sample"`` (each sample's max |x|), ``"fixed"`` (``dac_range``)
            or ``"calibrated"`` (a percentile of the layer's inputs on a calibration batch).
        adc_percentile, dac_percentile: the percentiles (0-100] that calibration sets the
            ranges to (:func:`xbarflow.nn.calibrate_converters`).
        stuck_compensation: program-and-verify with pair compensation: the chip's stuck
            devices are found when it is programmed, and the partner of each is programmed
            to keep the pair's difference (:func:`~xbarflow.crossbar.devices.compensate_stuck_pairs`).
            ``False``: every device gets its own target, stuck or not.
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
    levels: Optional[int] = None
    dac_bits: Optional[int] = None
    dac_range: Optional[float] = None
    adc_bits: Optional[int] = None
    adc_range: float = 1.0
    adc_range_mode: str = "fixed"
    adc_granularity: str = "tile"
    dac_range_mode: str = "per_sample"
    adc_percentile: float = 99.9
    dac_percentile: float = 99.9
    stuck_compensation: bool = False

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
        for name, lo in (("levels", 2), ("dac_bits", 1), ("adc_bits", 1)):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < lo):
                raise ValueError(f"{name} must be an integer >= {lo} or None (got {v!r})")
        if self.dac_range is not None and (not _finite(self.dac_range) or self.dac_range <= 0):
            raise ValueError(f"dac_range must be finite and > 0 or None (got {self.dac_range!r})")
        if not _finite(self.adc_range) or self.adc_range <= 0:
            raise ValueError(f"adc_range must be finite and > 0 (got {self.adc_range!r})")
        for name, allowed in (("adc_range_mode", ADC_RANGE_MODES), ("adc_granularity", ADC_GRANULARITIES),
                              ("dac_range_mode", DAC_RANGE_MODES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed} (got {getattr(self, name)!r})")
        for name in ("adc_percentile", "dac_percentile"):
            v = getattr(self, name)
            if not _finite(v) or not 0 < v <= 100:
                raise ValueError(f"{name} must be in (0, 100] (got {v!r})")
        if not isinstance(self.stuck_compensation, bool):
            raise ValueError(f"stuck_compensation must be true or false (got {self.stuck_compensation!r})")
        if self.dac_range_mode == "fixed" and self.dac_range is None:
            raise ValueError("dac_range_mode 'fixed' needs a dac_range")

    @property
    def is_ideal_circuit(self) -> bool:
        """True when the circuit multiplies by G exactly (no parasitic resistance)."""
        return self.r_source == 0.0 and self.r_sink == 0.0 and self.r_wire == 0.0

    @property
    def has_adc(self) -> bool:
        """True when each tile's output is quantised before the digital sum (per-tile forward)."""
        return self.adc_bits is not None

    @property
    def has_peripherals(self) -> bool:
        """True when inputs or outputs are quantised (DAC or ADC): work per batch in the forward."""
        return self.dac_bits is not None or self.adc_bits is not None

    def replace(self, **changes) -> "CrossbarSpec":
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(changes)
        return CrossbarSpec(**values)


def _finite(v) -> bool:
    try:
        return math.isfinite(float(v))
    except (TypeError, ValueError):
        return False
