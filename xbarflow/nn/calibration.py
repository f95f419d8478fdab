"""Digital column-gain calibration of crossbar layers."""
from __future__ import annotations

from typing import Optional, cast

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import XbarConv2d, XbarLinear, _XbarMixin


def _ideal_product(layer: _XbarMixin, x: torch.Tensor) -> torch.Tensor:
    if isinstance(layer, XbarConv2d):
        return F.conv2d(x, layer.weight, None, layer.stride, layer.padding, layer.dilation, 1)
    return F.linear(x, layer.weight)


def channels_and_bias(layer: _XbarMixin, output: torch.Tensor):
    """``(channel_dim, shape, bias)`` of a crossbar layer's output: where its channels are, the
    shape that broadcasts one value per channel, and its digital bias in that shape (or 0)."""
    channel_dim = 1 if isinstance(layer, XbarConv2d) else -1
    shape = [1] * output.dim()
    shape[channel_dim] = -1
    layer_bias = cast(Optional[torch.Tensor], layer.bias)  # the torch layer's (Linear, Conv2d)
    bias = layer_bias.reshape(shape) if layer_bias is not None else 0.0
    return channel_dim, shape, bias


@torch.no_grad()
def calibrate_column_gains(model: nn.Module, x: torch.Tensor, min_gain: float = 1e-3) -> None:
    """Set every crossbar layer's column gain so that its output matches the ideal layer's.

    One forward pass of ``model`` on ``x`` in its current (non-ideal) mode. Layer by
    layer, in execution order, each layer's gain ``g_j`` is the least-squares fit of
    its array output to the ideal product of the *same* input (``sum y_ideal y_xbar /
    sum y_xbar^2`` over the batch and, for convolutions, positions), so later layers
    are calibrated on the outputs of the already calibrated earlier ones.

    Args:
        model: a converted model in mode ``nominal`` or ``chip``.
        x: a calibration batch.
        min_gain: floor for a column whose array output does not correlate with the ideal one.
    """
    handles = []

    def hook(layer, inputs, output):
        channel_dim, shape, bias = channels_and_bias(layer, output)
        array = (output - bias) / layer.log_column_gain.exp().reshape(shape)
        ideal = _ideal_product(layer, inputs[0])
        dims = [d for d in range(output.dim()) if d != channel_dim % output.dim()]
        gain = (ideal * array).sum(dims) / (array * array).sum(dims).clamp_min(1e-30)
        layer.log_column_gain.copy_(gain.clamp_min(min_gain).log())
        return array * gain.clamp_min(min_gain).reshape(shape) + bias

    for m in model.modules():
        if isinstance(m, (XbarLinear, XbarConv2d)):
            handles.append(m.register_forward_hook(hook))
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()


def reset_column_gains(model: nn.Module) -> None:
    """Unity gain on every crossbar layer."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _XbarMixin):
                m.log_column_gain.zero_()


# Largest tensor torch.quantile takes; larger calibration sets are subsampled (evenly strided).
_QUANTILE_MAX = 2 ** 24 - 1


def _percentile(values: torch.Tensor, q: float, numel: Optional[int] = None) -> torch.Tensor:
    """The ``q``-th percentile (0-100) along the last dimension, NaNs ignored.

    ``numel``: the size of the whole set when ``values`` is one chunk of its rows (the
    subsampling stride, if any, is the whole set's, so chunks give what the whole set gives).
    """
    numel = values.numel() if numel is None else numel
    if numel > _QUANTILE_MAX:
        values = values[..., ::-(-numel // _QUANTILE_MAX)]
    return torch.nanquantile(values.float(), q / 100.0, dim=-1).to(values.dtype)


# Fewest layer outputs one product of the chunked ADC calibration forms: a product of a few
# columns runs at the speed of reading its inputs (one column per product made per-column ranges
# 4x slower; 32 is as fast as one product of every column, on 64x64 and 256x256 tiles).
MIN_CALIBRATION_COLUMNS = 32


def calibration_groups_per_chunk(n_r: int, reads: int, per_group: int) -> int:
    """ADC groups (of ``per_group`` layer outputs) whose partial outputs calibration forms at once:
    at most ``ADC_CHUNK_PARTIALS`` partial outputs, but at least one group and
    ``MIN_CALIBRATION_COLUMNS`` outputs. ``n_r`` tile rows, ``reads`` rows of the batch's im2col view."""
    from ..crossbar.effective import ADC_CHUNK_PARTIALS

    return max(1, ADC_CHUNK_PARTIALS // (n_r * reads * per_group), -(-MIN_CALIBRATION_COLUMNS // per_group))


def _rows_of_groups(frac: torch.Tensor, per_group: int) -> torch.Tensor:
    """``(n_r, reads, groups * per_group)`` -> ``(n_r, groups, reads * per_group)``: each ADC group's
    values in one row (a view for one range per column pair)."""
    n_r, reads, columns = frac.shape
    if per_group == 1:
        return frac.transpose(1, 2)
    return frac.reshape(n_r, reads, columns // per_group, per_group).permute(0, 2, 1, 3).reshape(n_r, columns // per_group, -1)


def _adc_ranges(layer: _XbarMixin, x2: torch.Tensor, x_max) -> torch.Tensor:
    """Per tile row and ADC group ``(n_r, n_groups)``: the ``spec.adc_percentile``-th percentile of
    ``|I+ - I-|`` over the reads of ``x2`` ``(reads, fan_in)``, as a fraction of a tile's largest
    differential current.

    A group's percentile needs only its own columns, so the groups go through in chunks
    (:func:`calibration_groups_per_chunk`): the same ranges as with every partial output of the
    batch formed at once, equal to rounding (a product of another width may round a partial
    output's float32 sum differently in the last bit, depending on the CPU), in a bounded memory
    (the percentile's sort copies its input). A last tile that the layer fills only in part is
    taken on its own, at its used width (a layout to the tile's full width would be mostly padding).
    """
    from ..crossbar.effective import output_full_scale, outputs_per_adc_range, tile_partials

    spec = layer.spec
    W_eff = layer.effective_weight_matrix()
    full = output_full_scale(spec, layer.weight_range(), x_max)
    fan_out = W_eff.shape[1]
    n_r, n_groups = layer.log_adc_range.shape
    reads = x2.shape[0]
    per_group = outputs_per_adc_range(spec)                                # layer outputs in a group
    numel = n_r * reads * fan_out                                          # the whole set's values
    chunk = calibration_groups_per_chunk(n_r, reads, per_group)
    ranges = []
    for g0 in range(0, n_groups, chunk):
        g1 = min(n_groups, g0 + chunk)
        frac = tile_partials(x2, W_eff[:, g0 * per_group:g1 * per_group], spec.rows)
        frac.div_(full).abs_()                                              # (n_r, reads, columns)
        whole = frac.shape[-1] // per_group                                 # groups of per_group columns
        if whole:
            ranges.append(_percentile(_rows_of_groups(frac[..., :whole * per_group], per_group),
                                      spec.adc_percentile, numel))
        if whole * per_group < frac.shape[-1]:                              # a last tile used in part
            ranges.append(_percentile(frac[..., whole * per_group:].reshape(n_r, 1, -1), spec.adc_percentile, numel))
        del frac
    return torch.cat(ranges, dim=-1).clamp_min(1e-6)


def _converter_hook(layer: _XbarMixin, inputs) -> None:
    """Forward pre-hook: set the layer's calibrated DAC scale and ADC ranges from its input."""
    spec = layer.spec
    x = inputs[0]
    if spec.dac_range_mode == "calibrated":
        layer.dac_scale.copy_(_percentile(x.detach().abs().reshape(1, -1), spec.dac_percentile)
                              .clamp_min(1e-12).reshape(()))
    if not spec.has_adc or spec.adc_range_mode == "fixed" or getattr(layer, "_keep_learned_range", False):
        return
    x2, x_max = layer.array_inputs(x)
    layer.log_adc_range.data.copy_(_adc_ranges(layer, x2, x_max).log())


@torch.no_grad()
def calibrate_converters(model: nn.Module, x: torch.Tensor, learned: bool = True) -> bool:
    """Set the calibrated converter ranges of every crossbar layer from one batch on the nominal array.

    Layer by layer, in execution order (so a layer sees the outputs of the already calibrated
    layers before it): a DAC with ``dac_range_mode="calibrated"`` gets the
    ``spec.dac_percentile``-th percentile of the layer's ``|inputs|`` as its scale; ADCs with
    ``adc_range_mode`` ``"calibrated"`` or ``"learned"`` get, per tile (or column pair) and
    tile row, the ``spec.adc_percentile``-th percentile of ``|I+ - I-|`` over the batch, as a
    fraction of the tile's largest differential current. This is what a deployed macro does
    with a programmable reference or a gain stage, calibrated once after programming.

    Args:
        model: a converted model (any mode; calibration always runs on the nominal array).
        x: a calibration batch from the training split (never the test split).
        learned: also (re)start the learned ADC ranges from a calibration.

    Returns:
        Whether any layer had something to calibrate.
    """
    from .convert import xbar_mode

    layers = [m for m in model.modules() if isinstance(m, _XbarMixin) and calibrated_by(m.spec, learned)]
    if not layers:
        return False
    handles = [m.register_forward_pre_hook(_converter_hook) for m in layers]
    for m in layers:
        m._keep_learned_range = not learned and m.spec.adc_range_mode == "learned"
    try:
        with xbar_mode(model, "nominal"):
            model(x)
    finally:
        for h in handles:
            h.remove()
        for m in layers:
            del m._keep_learned_range
    return True


def needs_converter_calibration(spec) -> bool:
    """True when a layer's DAC scale or ADC ranges are set by :func:`calibrate_converters`."""
    return spec.dac_range_mode == "calibrated" or (spec.has_adc and spec.adc_range_mode != "fixed")


def calibrated_by(spec, learned: bool) -> bool:
    """Whether :func:`calibrate_converters` with this ``learned`` sets something of a layer on ``spec``
    (``learned=False``, after training: learned ADC ranges keep what training gave them)."""
    return needs_converter_calibration(spec) and (
        learned or spec.adc_range_mode != "learned" or spec.dac_range_mode == "calibrated")


def converter_ranges(model: nn.Module) -> dict:
    """The converter settings of every crossbar layer that has an ADC or a calibrated DAC.

    Returns:
        ``{layer name: {"adc_bits", "adc_range_mode", "adc_granularity", "adc_range" (fractions of a
        tile's largest differential current, nested lists ``[tile row][tile or column]``),
        "adc_full_scale_uA" (the same in microamperes), "dac_range_mode", "dac_scale"}}``.
    """
    out = {}
    for name, m in model.named_modules():
        if not isinstance(m, _XbarMixin):
            continue
        spec = m.spec
        if not (spec.has_adc or spec.dac_range_mode == "calibrated"):
            continue
        entry = {"dac_range_mode": spec.dac_range_mode, "dac_scale": float(m.dac_scale)}
        if spec.has_adc:
            frac = m.adc_range()
            frac = torch.full_like(m.log_adc_range, spec.adc_range) if frac is None else frac.detach()
            tile_current_uA = spec.rows * (spec.g_max - spec.g_min) * spec.v_read * 1e6
            entry.update({"adc_bits": spec.adc_bits, "adc_range_mode": spec.adc_range_mode,
                          "adc_granularity": spec.adc_granularity, "adc_range": frac.cpu().tolist(),
                          "adc_full_scale_uA": (frac * tile_current_uA).cpu().tolist()})
        out[name] = entry
    return out
