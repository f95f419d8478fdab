"""Energy and latency of a network's crossbar layers per image (model note, section 10).

For every crossbar layer, per image:

- **Array**: ``t_read * sum_r trace(Y_r M_r)``, with ``Y_r`` the driving-point admittance of the
  tiles of grid row ``r`` (:func:`xbarflow.crossbar.energy.layer_admittance`, computed once per
  layer weight and chip and cached) and ``M_r`` the second moment of that row's input voltages
  ``V = v_read x / x_max`` (after the DAC), accumulated by forward hooks while images go through.
- **DAC**: one conversion per driven row per read. A tile drives the rows its slice of the
  fan-in uses (padding rows are 0 V, not driven), every tile of a grid row drives its own, and
  the two arrays of a separate differential pair share them: ``fan_in * n_c`` per read.
- **ADC**: one conversion per output column per tile row per read (``n_r * fan_out``): each
  tile's partial output ``I+ - I-`` is converted before the digital sum (section 6). ADCs shared
  by ``columns_per_adc`` columns convert in turn: that changes latency, not the count. Energy
  per conversion by Walden's figure of merit, ``E = FOM_W * 2^bits`` (the nominal resolution
  standing in for the ENOB).
- **Digital**: the sum of the partial outputs over the tile rows (``(n_r - 1) * fan_out``
  additions per read), the column gain (one multiplication per output, counted when the layer
  has gains other than 1, or when asked for) and the bias (one addition per output, when the
  layer has one).
- **Reads**: a linear layer reads its tiles once per image, a convolution once per output
  position (the im2col view, section 5).
- **Latency**: a read of a tile takes ``t_read + t_conv * min(columns_per_adc, outputs per
  tile)`` (each ADC converts its columns in turn); the tiles of a layer are read all at once
  (``parallel``) or one after the other (``sequential``, ``n_r * n_c`` tile reads per read; the
  arrays of a differential pair count as one tile), and a layer's reads follow each other. The
  network's latency is the sum over its crossbar layers. Digital operations, data movement and
  the layers that stay digital are not counted.
- **TOPS/W**: 2 operations per multiply-accumulate, ``fan_in * fan_out * reads`` of them per
  image and layer, over the total energy.

Every number (read pulse, converter figures, digital energy per operation) is data: it comes
with :class:`EnergyParams`, filled from the config (``hardware.t_read``, the ``energy`` group,
``xbar.adc_bits``) with their sources there.
"""
from __future__ import annotations

import json
import math
import weakref
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Dict, Iterable, Iterator, List, Optional, Tuple

import torch
import torch.nn as nn

from ..crossbar.effective import outputs_per_tile
from ..crossbar.energy import ReadModel, array_energy, layer_read_model, second_moments
from ..crossbar.tiling import grid_shape
from ..crossbar.variation import Chip
from .convert import xbar_layers, xbar_mode
from .layers import XbarConv2d, _XbarMixin

TILE_ORDERS = ("parallel", "sequential")


@dataclass(frozen=True)
class EnergyParams:
    """The technology's and periphery's numbers (SI units).

    Attributes:
        t_read: read pulse, seconds (the time the row voltages are applied).
        adc_fom_j: ADC figure of merit (Walden), joules per conversion step.
        adc_bits: ADC resolution, bits: ``E_adc = adc_fom_j * 2**adc_bits`` per conversion.
        dac_energy_j: energy per DAC conversion (one driven row, one read), joules.
        digital_add_j: energy per digital addition (partial sums, bias), joules.
        digital_mult_j: energy per digital multiplication (column gain), joules.
        t_conv: time per ADC conversion, seconds.
        columns_per_adc: columns that share one ADC (converted in turn).
        tiles: ``"parallel"`` or ``"sequential"``: how a layer's tiles are read.
    """

    t_read: float
    adc_fom_j: float
    adc_bits: int
    dac_energy_j: float
    digital_add_j: float
    digital_mult_j: float
    t_conv: float = 0.0
    columns_per_adc: int = 1
    tiles: str = "parallel"

    def __post_init__(self):
        for name in ("t_read", "adc_fom_j", "dac_energy_j", "digital_add_j", "digital_mult_j", "t_conv"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be a finite number >= 0 (got {v!r})")
        for name in ("adc_bits", "columns_per_adc"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1 (got {v!r})")
        if self.tiles not in TILE_ORDERS:
            raise ValueError(f"tiles must be one of {TILE_ORDERS} (got {self.tiles!r})")

    @property
    def adc_energy_j(self) -> float:
        """Energy of one ADC conversion, ``FOM_W * 2^bits`` (J)."""
        return self.adc_fom_j * 2.0 ** self.adc_bits


@dataclass(frozen=True)
class LayerCounts:
    """What one read of a layer's tiles does (no energy yet).

    Attributes:
        grid: tiles along (fan-in, fan-out), ``(n_r, n_c)``.
        dac: DAC conversions per read.
        adc: ADC conversions per read.
        adds: digital additions per read (partial sums over tile rows, bias).
        mults: digital multiplications per read (column gains).
        macs: multiply-accumulates per read, ``fan_in * fan_out``.
        tile_reads: tile reads one after the other per read (1 in parallel).
        t_tile: seconds per tile read, ``t_read + t_conv * min(columns_per_adc, outputs per tile)``.
    """

    grid: Tuple[int, int]
    dac: int
    adc: int
    adds: int
    mults: int
    macs: int
    tile_reads: int
    t_tile: float


def layer_counts(fan_in: int, fan_out: int, spec, params: EnergyParams, *, bias: bool,
                 column_gain: bool) -> LayerCounts:
    """Conversions, digital operations and timing of one read of a ``fan_in x fan_out`` layer on ``spec``'s tiles."""
    out_cols = 2 * fan_out if spec.mapping == "interleaved" else fan_out
    n_r, n_c = grid_shape(fan_in, out_cols, spec.rows, spec.cols)
    adds = (n_r - 1) * fan_out + (fan_out if bias else 0)
    t_tile = params.t_read + params.t_conv * min(params.columns_per_adc, outputs_per_tile(spec))
    return LayerCounts(grid=(n_r, n_c), dac=fan_in * n_c, adc=n_r * fan_out, adds=adds,
                       mults=fan_out if column_gain else 0, macs=fan_in * fan_out,
                       tile_reads=1 if params.tiles == "parallel" else n_r * n_c, t_tile=t_tile)


@dataclass
class LayerEnergy:
    """One crossbar layer's budget per image (joules, seconds) and its counts per image."""

    name: str
    kind: str
    matrix: Tuple[int, int]
    grid: Tuple[int, int]
    reads: float             # reads of the tiles per image (output positions of a convolution)
    dac_conversions: float
    adc_conversions: float
    digital_adds: float
    digital_mults: float
    macs: float
    array_j: float
    dac_j: float
    adc_j: float
    digital_j: float
    latency_s: float

    @property
    def total_j(self) -> float:
        return self.array_j + self.dac_j + self.adc_j + self.digital_j


PARTS = ("array", "dac", "adc", "digital")


@dataclass
class EnergyReport:
    """A network's energy and latency per image, layer by layer (crossbar layers only)."""

    layers: List[LayerEnergy]
    images: int
    params: EnergyParams
    notes: List[str] = field(default_factory=list)

    def part_j(self, part: str) -> float:
        return sum(getattr(layer, f"{part}_j") for layer in self.layers)

    @property
    def total_j(self) -> float:
        return sum(layer.total_j for layer in self.layers)

    @property
    def latency_s(self) -> float:
        return sum(layer.latency_s for layer in self.layers)

    @property
    def ops(self) -> float:
        """Operations per image: 2 per multiply-accumulate."""
        return 2.0 * sum(layer.macs for layer in self.layers)

    @property
    def tops_per_w(self) -> float:
        """Tera-operations per second per watt, ``ops / energy / 1e12`` (0 without energy)."""
        return self.ops / self.total_j / 1e12 if self.total_j > 0 else 0.0

    def dominant(self) -> str:
        """The part (array, dac, adc, digital) with the largest share of the energy."""
        return max(PARTS, key=self.part_j)

    def metrics(self) -> Dict[str, float]:
        """``energy/{total,array,dac,adc,digital}_pj_per_image``, ``latency/ns_per_image``, ``energy/tops_per_w``."""
        out = {"energy/total_pj_per_image": self.total_j * 1e12}
        out.update({f"energy/{p}_pj_per_image": self.part_j(p) * 1e12 for p in PARTS})
        out["latency/ns_per_image"] = self.latency_s * 1e9
        out["energy/tops_per_w"] = self.tops_per_w
        return out

    def as_dict(self) -> dict:
        return {"images": self.images, "params": asdict(self.params), "totals": self.metrics(),
                "dominant": self.dominant(), "notes": list(self.notes),
                "layers": [{**asdict(layer), "total_j": layer.total_j} for layer in self.layers]}

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=1)

    def to_markdown(self) -> str:
        """A table per layer (pJ and ns per image) and the totals."""
        lines = [f"Energy and latency per image (crossbar layers, {self.images} test images, nominal crossbar)", "",
                 "| layer | type | matrix | tile grid | reads | DAC conv. | ADC conv. | array pJ | DAC pJ | ADC pJ "
                 "| digital pJ | total pJ | latency ns |",
                 "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in self.layers:
            lines.append(f"| {r.name} | {r.kind} | {r.matrix[0]}x{r.matrix[1]} | {r.grid[0]}x{r.grid[1]} | {r.reads:g} "
                         f"| {r.dac_conversions:g} | {r.adc_conversions:g} | {r.array_j * 1e12:.4g} "
                         f"| {r.dac_j * 1e12:.4g} | {r.adc_j * 1e12:.4g} | {r.digital_j * 1e12:.4g} "
                         f"| {r.total_j * 1e12:.4g} | {r.latency_s * 1e9:.4g} |")
        m = self.metrics()
        lines += ["", f"total {m['energy/total_pj_per_image']:.4g} pJ per image (array "
                  f"{m['energy/array_pj_per_image']:.4g}, DAC {m['energy/dac_pj_per_image']:.4g}, ADC "
                  f"{m['energy/adc_pj_per_image']:.4g}, digital {m['energy/digital_pj_per_image']:.4g}; "
                  f"{self.dominant()} dominates), latency {m['latency/ns_per_image']:.4g} ns per image, "
                  f"{m['energy/tops_per_w']:.4g} TOPS/W (2 operations per multiply-accumulate)"]
        p = self.params
        lines += ["", f"t_read {p.t_read:g} s, ADC {p.adc_bits} bits at FOM_W {p.adc_fom_j:g} J/step "
                  f"({p.adc_energy_j:g} J per conversion), DAC {p.dac_energy_j:g} J per conversion, digital add "
                  f"{p.digital_add_j:g} J, mult {p.digital_mult_j:g} J, t_conv {p.t_conv:g} s, "
                  f"{p.columns_per_adc} columns per ADC, tiles read in {p.tiles}"]
        lines += [f"- {n}" for n in self.notes]
        return "\n".join(lines)


# (W_eff, Y) per layer: recomputed when the weight, the arrays or the chip change (like the effective weight)
_READ_MODEL: "weakref.WeakKeyDictionary[nn.Module, Tuple[tuple, ReadModel]]" = weakref.WeakKeyDictionary()


def _weight_key(layer: _XbarMixin, chip: Optional[Chip]) -> tuple:
    """What the effective weight of ``layer`` depends on: the key of the layer's own cache
    (:meth:`~xbarflow.nn.layers._XbarMixin.effective_weight_matrix`)."""
    w = layer.weight
    return (w._version, w.data_ptr(), w.dtype, w.device, layer.spec, chip)


def read_model(layer: _XbarMixin, chip: Optional[Chip] = None) -> ReadModel:
    """The layer's effective weight and ``Y_r`` per grid row (:func:`~xbarflow.crossbar.energy.layer_read_model`,
    one solve of its tiles), cached per weight, spec and chip."""
    key = _weight_key(layer, chip)
    hit = _READ_MODEL.get(layer)
    if hit is not None and hit[0] == key:
        return hit[1]
    value = layer_read_model(layer._weight_matrix(), layer.spec, chip, layer.xbar_name)
    _READ_MODEL[layer] = (key, value)
    return value


def admittance(layer: _XbarMixin, chip: Optional[Chip] = None) -> torch.Tensor:
    """The layer's ``Y_r`` per grid row, ``(n_r, rows, rows)`` (S), cached (:func:`read_model`)."""
    return read_model(layer, chip).admittance


def _keep_solved_weights(layers: List[_XbarMixin], chip: Optional[Chip]) -> None:
    """Where the effective weight that came with a layer's Y (:func:`read_model`) is bitwise the
    layer's own (``exact``, nominal devices), it goes into the layer's cache: the pass that collects
    the inputs, and a nominal evaluation that follows, solve no circuit again (the layer would have
    computed the same bits). Elsewhere the layer computes its weight as usual (cached by the layer:
    still shared with a nominal evaluation that follows)."""
    for layer in layers:
        model = read_model(layer, chip)
        if chip is None and model.exact and not layer._training_through_circuit():
            layer._cache_key = _weight_key(layer, None)
            layer._cache_weight = model.weight


class _Moments:
    """Second moments of one layer's row voltages, accumulated over reads (float64)."""

    def __init__(self):
        self.M: Optional[torch.Tensor] = None
        self.reads = 0
        self.images = 0

    def add(self, layer: _XbarMixin, x: torch.Tensor) -> None:
        with torch.no_grad():
            x2, x_max = layer.array_inputs(x)                   # after the DAC; one row per read
            V = x2 * (layer.spec.v_read / x_max)                # V = v_read x / x_max (volts)
            M = second_moments(V, layer.spec.rows).double()
            self.M = M if self.M is None else self.M + M
            self.reads += x2.shape[0]
            self.images += x.shape[0]


@contextmanager
def collect_moments(model: nn.Module) -> Iterator[Dict[str, Tuple[_XbarMixin, _Moments]]]:
    """Forward hooks on every crossbar layer that accumulate its input voltages' second moments.

    Yields ``{layer name: (layer, moments)}``, filled as images go through ``model``; the hooks
    are removed on exit.
    """
    found: Dict[str, Tuple[_XbarMixin, _Moments]] = {}
    handles = []
    for layer in xbar_layers(model):
        moments = _Moments()
        found[layer.xbar_name or str(id(layer))] = (layer, moments)

        def hook(module, inputs, output, moments=moments):
            moments.add(module, inputs[0])

        handles.append(layer.register_forward_hook(hook))
    try:
        yield found
    finally:
        for h in handles:
            h.remove()


def _has_gains(layer: _XbarMixin) -> bool:
    return bool((layer.log_column_gain.detach() != 0).any())


def layer_energy(layer: _XbarMixin, moments: _Moments, params: EnergyParams, *, chip: Optional[Chip] = None,
                 column_gain: Optional[bool] = None) -> LayerEnergy:
    """One layer's budget per image from the reads its hook saw."""
    if moments.images == 0 or moments.M is None:
        raise ValueError(f"layer {layer.xbar_name!r} saw no input: run images through the model first")
    fan_out, fan_in = layer.weight.shape[0], layer.weight[0].numel()
    gains = _has_gains(layer) if column_gain is None else column_gain
    c = layer_counts(fan_in, fan_out, layer.spec, params, bias=layer.bias is not None, column_gain=gains)
    reads = moments.reads / moments.images
    array_j = array_energy(admittance(layer, chip), moments.M, params.t_read) / moments.images
    kind = "Conv2d" if isinstance(layer, XbarConv2d) else "Linear"
    return LayerEnergy(
        name=layer.xbar_name, kind=kind, matrix=(fan_in, fan_out), grid=c.grid, reads=reads,
        dac_conversions=c.dac * reads, adc_conversions=c.adc * reads, digital_adds=c.adds * reads,
        digital_mults=c.mults * reads, macs=c.macs * reads, array_j=array_j,
        dac_j=c.dac * reads * params.dac_energy_j, adc_j=c.adc * reads * params.adc_energy_j,
        digital_j=(c.adds * params.digital_add_j + c.mults * params.digital_mult_j) * reads,
        latency_s=c.tile_reads * c.t_tile * reads)


@torch.no_grad()
def measure_energy(model: nn.Module, batches: Iterable[torch.Tensor], params: EnergyParams, *,
                   chip: Optional[Chip] = None, column_gain: Optional[bool] = None) -> EnergyReport:
    """Energy and latency per image of ``model``'s crossbar layers on the images of ``batches``.

    The images go through the model once on the nominal crossbar (or on ``chip``), which
    gives every layer the inputs it sees on the chip; the mode of each layer is restored.

    Args:
        model: a converted model (:func:`~xbarflow.nn.convert`).
        batches: image batches (tensors on the model's device).
        params: the numbers (:class:`EnergyParams`).
        chip: the chip whose devices the arrays hold (``None``: nominal devices).
        column_gain: count the column gain's multiplication per output (``None``: in the layers
            whose gains are not all 1).

    Returns:
        :class:`EnergyReport` (per image; averages over the images).
    """
    was_training = model.training
    model.eval()
    images = 0
    try:
        xbars = list(xbar_layers(model))
        _keep_solved_weights(xbars, chip)
        with xbar_mode(model, "chip" if chip is not None else "nominal", chip), collect_moments(model) as found:
            for x in batches:
                model(x)
                images += x.shape[0]
    finally:
        model.train(was_training)
    layers = [layer_energy(layer, moments, params, chip=chip, column_gain=column_gain)
              for layer, moments in found.values() if moments.images]
    notes = [f"{name} saw no input" for name, (_, m) in found.items() if not m.images]
    return EnergyReport(layers=layers, images=images, params=params, notes=notes)
