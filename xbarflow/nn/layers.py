"""Crossbar-backed drop-in replacements for ``nn.Linear`` and ``nn.Conv2d``.

A layer runs in one of three modes:

* ``"ideal"``   - ordinary arithmetic with the software weights;
* ``"nominal"`` - the crossbar circuit with its parasitic resistances, nominal devices;
* ``"chip"``    - the circuit on a drawn :class:`~xbarflow.crossbar.Chip`.

The effective weight (:func:`~xbarflow.crossbar.effective_weight`) is computed once
per weight update or chip and cached; inside autograd (training) it is recomputed
at every forward so that gradients flow through the circuit model exactly, which
is what technology-aware training is.

Per-read effects break the cache: with read noise on the chip every forward pass
is a new read (numbered from 0 after each :meth:`set_mode`, so a chip's reads are
reproducible) and recomputes the effective weight; with a DAC or ADC the inputs
are quantised and, with an ADC, each tile row's partial output is converted before
the digital sum (:func:`~xbarflow.crossbar.effective.adc_apply`). Training and
evaluation run this same forward pass.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple, cast

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..crossbar.effective import adc_apply, adc_groups, adc_reads_per_chunk, effective_apply, effective_weight, fused_is_cheaper
from ..crossbar.mapping import weight_range
from ..crossbar.peripherals import dac_quantize, input_scale
from ..crossbar.spec import CrossbarSpec
from ..crossbar.variation import Chip

MODES = ("ideal", "nominal", "chip")

# Parameters a crossbar layer has beyond its software layer (digital periphery); a plain
# model's state_dict lacks them, and loading one leaves them at their initial values.
CROSSBAR_ONLY_PARAMS = ("log_column_gain", "log_adc_range", "dac_scale")


class _XbarMixin(nn.Module):
    """Mode, chip and effective-weight cache shared by the crossbar layers."""

    # set by the torch layer it is mixed into, and by _init_xbar
    weight: torch.Tensor
    log_column_gain: torch.Tensor
    log_adc_range: torch.Tensor
    dac_scale: torch.Tensor
    _cache_key: Optional[tuple]
    _keep_learned_range: bool

    def _init_xbar(self, spec: CrossbarSpec, name: str = ""):
        self.spec = spec
        self.xbar_name = name
        self.mode = "ideal"
        self.chip: Optional[Chip] = None
        self._cache_key = None
        self._cache_weight: Optional[torch.Tensor] = None
        self._reads = 0  # reads of the current chip so far (read noise)
        # Digital gain per output column (log scale, 0 = unity), applied after the array in
        # the non-ideal modes only: the periphery's way to undo the circuit's attenuation.
        # Technology-aware training calibrates and learns it; standard training leaves it at 1.
        self.log_column_gain = nn.Parameter(torch.zeros(self.weight.shape[0], device=self.weight.device,
                                                        dtype=self.weight.dtype))
        # The converters' ranges (see xbarflow.crossbar.peripherals): ADC full scale per tile row and
        # tile (or column pair) as a log fraction of a tile's largest differential current; a
        # parameter when it is learned, else a buffer that calibration sets. The DAC's input scale
        # when it is calibrated (input units).
        device, dtype = self.weight.device, self.weight.dtype
        log_adc_range = torch.full(adc_groups(self.weight[0].numel(), self.weight.shape[0], spec),
                                   math.log(spec.adc_range), device=device, dtype=dtype)
        if spec.adc_range_mode == "learned":
            self.log_adc_range = nn.Parameter(log_adc_range)
        else:
            self.register_buffer("log_adc_range", log_adc_range)
        self.register_buffer("dac_scale", torch.tensor(float(spec.dac_range or 1.0), device=device, dtype=dtype))

    def adc_range(self) -> Optional[torch.Tensor]:
        """Full scale of each ADC as a fraction of a tile's largest current, ``(n_r, n_groups)``;
        None for the fixed ``spec.adc_range`` shared by all."""
        return None if self.spec.adc_range_mode == "fixed" else self.log_adc_range.exp()

    def input_scale(self, x: torch.Tensor, sample_dims: int) -> torch.Tensor:
        """``x_max`` of the DAC: each sample's max |x|, the fixed ``dac_range`` or the calibrated scale."""
        mode = self.spec.dac_range_mode
        if mode == "calibrated":
            return self.dac_scale.detach()
        return input_scale(x, self.spec.dac_range if mode == "fixed" else None, sample_dims)

    def array_inputs(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """One row per read of the array and its input scale: ``(reads, fan_in)`` and
        ``(reads, 1)`` (or a scalar), after the DAC when there is one."""
        raise NotImplementedError

    def _digital(self, y: torch.Tensor, channel_dim: int) -> torch.Tensor:
        """Column gain and bias, both digital, on the array output ``y`` (channels at ``channel_dim``)."""
        shape = [1] * y.dim()
        shape[channel_dim] = -1
        y = y * self.log_column_gain.exp().reshape(shape)
        bias = cast(Optional[torch.Tensor], self.bias)  # the torch layer's (Linear, Conv2d)
        return y + bias.reshape(shape) if bias is not None else y

    def set_mode(self, mode: str, chip: Optional[Chip] = None):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES} (got {mode!r})")
        if mode == "chip" and chip is None:
            raise ValueError("mode 'chip' needs a chip")
        self.mode = mode
        self.chip = chip if mode == "chip" else None
        self._reads = 0

    def _chip(self) -> Optional[Chip]:
        return self.chip if self.mode == "chip" else None

    def _next_read(self) -> int:
        """Number of this read; advances only when reads differ (read noise)."""
        n = self._reads
        chip = self._chip()
        if chip is not None and chip.per_read:
            self._reads += 1
        return n

    def _weight_matrix(self) -> torch.Tensor:
        """Software weight as ``(fan_in, fan_out)``."""
        return self.weight.reshape(self.weight.shape[0], -1).t()

    def weight_range(self) -> torch.Tensor:
        """The mapping's clipping range (``spec.w_max``, else max |W|), scalar tensor, no gradient.

        Read from the stored weight: max |W| does not depend on the layout, and a reduction over
        the transposed view :meth:`_weight_matrix` reads strided memory (several times slower).
        """
        return weight_range(self.weight, self.spec.w_max)

    def _training_through_circuit(self) -> bool:
        """Gradients must flow through the circuit (recompute, never cache)."""
        return self.mode != "ideal" and torch.is_grad_enabled() and self.weight.requires_grad

    def effective_weight_matrix(self) -> torch.Tensor:
        """Effective weight ``(fan_in, fan_out)`` of the current mode (cached outside autograd)."""
        W = self._weight_matrix()
        if self.mode == "ideal":
            return W
        chip = self._chip()
        if self._training_through_circuit():
            return effective_weight(W, self.spec, chip, self.xbar_name, self._next_read())
        if chip is not None and chip.per_read:
            # every read differs: nothing to cache
            with torch.no_grad():
                return effective_weight(W, self.spec, chip, self.xbar_name, self._next_read())
        # An in-place optimizer step bumps the version counter, so the key changes
        # exactly when the weight does.
        key = (self.weight._version, self.weight.data_ptr(), self.weight.dtype, self.weight.device, self.spec, chip)
        if key != self._cache_key:
            with torch.no_grad():
                self._cache_weight = effective_weight(W, self.spec, chip, self.xbar_name)
            self._cache_key = key
        assert self._cache_weight is not None
        return self._cache_weight

    def extra_repr(self) -> str:
        s = self.spec
        return (
            super().extra_repr()
            + f", mode={self.mode}, tile={s.rows}x{s.cols}, r_source={s.r_source:g}, r_sink={s.r_sink:g}"
        )


class XbarLinear(_XbarMixin, nn.Linear):
    """``nn.Linear`` whose product runs on crossbar tiles. Input ``(*, in_features)``."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, spec: CrossbarSpec,
                 name: str = "", device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_xbar(spec, name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "ideal":
            return F.linear(x, self.weight, self.bias)
        spec = self.spec
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        x_max = None
        if spec.has_peripherals:
            x2, x_max = self.array_inputs(x2)
        # bias is added digitally, after the array
        if self._training_through_circuit() and not spec.has_adc:
            batch = x2.shape[0]
            if batch > 0 and fused_is_cheaper(batch, spec, self.out_features):
                # Training on large tiles with a small batch: apply the circuit to x
                # directly (exact, cheaper than forming the effective weight).
                y = effective_apply(x2, self._weight_matrix(), spec, self._chip(), self.xbar_name,
                                    self._next_read())
                return self._digital(y.reshape(*lead, self.out_features), -1)
        W_eff = self.effective_weight_matrix()
        if spec.has_adc:
            assert x_max is not None  # set above: an ADC is a peripheral
            y = adc_apply(x2, W_eff, spec, self.weight_range(), x_max, self.adc_range())
            return self._digital(y.reshape(*lead, self.out_features), -1)
        return self._digital(F.linear(x2.reshape(*lead, self.in_features), W_eff.t()), -1)


    def array_inputs(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        x2 = x.reshape(-1, self.in_features)
        x_max = self.input_scale(x2, 1)                                      # (batch, 1) or scalar
        if self.spec.dac_bits is not None:
            x2 = dac_quantize(x2, self.spec.dac_bits, x_max)
        return x2, x_max


class XbarConv2d(_XbarMixin, nn.Conv2d):
    """``nn.Conv2d`` (groups=1) on crossbar tiles, in the im2col view.

    Fan-in is ``C_in * kh * kw`` (one row per input channel and kernel tap), fan-out
    ``C_out``. Zero padding of the image is 0 V on those rows.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 bias: bool = True, *, spec: CrossbarSpec, name: str = "", device=None, dtype=None):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                         dilation=dilation, groups=1, bias=bias, device=device, dtype=dtype)
        if self.padding_mode != "zeros":
            raise ValueError("XbarConv2d supports padding_mode='zeros' only")
        self._init_xbar(spec, name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` of shape ``(N, C_in, H, W)``; the DAC scale ``x_max`` is per image."""
        if self.mode == "ideal":
            return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, 1)
        spec = self.spec
        W_eff = self.effective_weight_matrix()
        if not spec.has_adc:
            if spec.dac_bits is not None:
                x = dac_quantize(x, spec.dac_bits, self.input_scale(x, 3))     # x_max per image
            weight = W_eff.t().reshape(self.weight.shape)
            return self._digital(F.conv2d(x, weight, None, self.stride, self.padding, self.dilation, 1), 1)
        # ADC: the im2col view, one read per output position, tile rows converted separately
        N = x.shape[0]
        h_out, w_out = self._output_size(x)
        w_range, adc_range = self.weight_range(), self.adc_range()

        def convert_images(xc: torch.Tensor) -> torch.Tensor:
            x2, xm = self.array_inputs(xc)
            y = adc_apply(x2, W_eff, spec, w_range, xm, adc_range)
            n = xc.shape[0]
            y = y.reshape(n, h_out * w_out, self.out_channels).transpose(1, 2)
            return self._digital(y.reshape(n, self.out_channels, h_out, w_out), 1)

        # without a gradient, images go through in chunks (their im2col view is as large as their
        # partial outputs), with one effective weight: one read of the arrays, the same result to
        # rounding (a product of another shape may round a partial output's float32 sum differently
        # in the last bit, and so move it across an ADC code boundary)
        per_chunk = max(1, adc_reads_per_chunk(W_eff.shape[0], self.out_channels, spec) // (h_out * w_out))
        if torch.is_grad_enabled() or per_chunk >= N:
            return convert_images(x)
        out = x.new_empty(N, self.out_channels, h_out, w_out)
        for i in range(0, N, per_chunk):
            out[i:i + per_chunk] = convert_images(x[i:i + per_chunk])
        return out

    def _int_padding(self) -> Tuple[int, ...]:
        """The padding as numbers (``padding="same"`` / ``"valid"`` strings resolved by torch at init)."""
        if isinstance(self.padding, str):
            raise ValueError(f"XbarConv2d needs a numeric padding (got {self.padding!r})")
        return tuple(self.padding)

    def _output_size(self, x: torch.Tensor) -> Tuple[int, int]:
        size = []
        for d in (0, 1):
            span = self.dilation[d] * (self.kernel_size[d] - 1) + 1
            size.append((x.shape[-2 + d] + 2 * self._int_padding()[d] - span) // self.stride[d] + 1)
        return size[0], size[1]

    def array_inputs(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``x`` of shape ``(N, C_in, H, W)``: one read per output position, ``(N * L, fan_in)``;
        the DAC scale is per image."""
        x_max = self.input_scale(x, 3)                                        # (N, 1, 1, 1) or scalar
        if self.spec.dac_bits is not None:
            x = dac_quantize(x, self.spec.dac_bits, x_max)
        cols = F.unfold(x, self.kernel_size, dilation=self.dilation, padding=self._int_padding(), stride=self.stride)
        N, L = x.shape[0], cols.shape[-1]
        x2 = cols.transpose(1, 2).reshape(N * L, -1)
        xm = x_max.reshape(-1, 1).repeat_interleave(L, dim=0) if x_max.dim() else x_max
        return x2, xm
