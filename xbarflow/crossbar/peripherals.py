"""Row DACs and column ADCs: finite resolution at the array's edges.

Both are uniform quantisers whose rounding has no useful gradient; training passes
the gradient straight through (STE, identity inside the range, as in quantisation-
aware training).

Input scale: a layer's inputs are scaled digitally by ``x_max`` before the DAC
(``V = v_read * x / x_max``, section 3 of the model note): ``x_max`` is the DAC
range ``dac_range`` if set, else the largest ``|x|`` of each sample (a per-vector
digital scale, exact and cheap), so the DAC always uses its full range.

ADC: one converter per differential column pair sees ``I+ - I-`` (the pair's
currents are subtracted in analog, e.g. by a current mirror, before conversion;
this halves the converters and gives a symmetric signed range). Each tile's
partial output is converted *before* the digital sum over the tiles that share
outputs. A converter's full scale is a fraction ``adc_range`` of the largest
differential current a tile can produce, ``rows * (g_max - g_min) * v_read`` (every
input at full scale, every device pair at its extreme), in layer-output units
``adc_range * rows * w_max * x_max``. The fraction is one number for every converter
(``fixed``), or one per tile or per column pair, set from the outputs the array
actually delivers (``calibrated``: a percentile over a calibration batch) or trained
with the weights (``learned``): a large array with source and sink resistance, or a
low-resistance technology, delivers a few percent of that largest current, and a
fixed fraction would leave it a handful of the converter's codes.
"""
from __future__ import annotations

from typing import Union

import torch

from .devices import ste

# an all-zero input vector still needs a finite scale
_TINY_X = 1e-12


def input_scale(x: torch.Tensor, dac_range, sample_dims: int) -> torch.Tensor:
    """``x_max`` per sample, shape broadcastable to ``x`` (no gradient).

    Args:
        x: inputs, shape ``(batch, *sample)``.
        dac_range: fixed full scale, or ``None`` for each sample's max ``|x|``.
        sample_dims: number of trailing dimensions that form one sample.
    """
    if dac_range is not None:
        return torch.as_tensor(float(dac_range), dtype=x.dtype, device=x.device)
    dims = tuple(range(x.dim() - sample_dims, x.dim()))
    return x.detach().abs().amax(dim=dims, keepdim=True).clamp_min(_TINY_X)


def dac_quantize(x: torch.Tensor, bits: int, x_max: torch.Tensor) -> torch.Tensor:
    """Drive voltages of a ``bits``-bit DAC, in input units.

    The magnitude ``|x| / x_max`` is clipped to ``[0, 1]`` and rounded to ``2**bits - 1``
    equal steps; the sign is kept (the driver applies either polarity). For the
    non-negative inputs of the usual networks this is a plain unsigned DAC with
    ``2**bits`` values, 0 and ``x_max`` included (1 bit: binary inputs). STE gradient.
    """
    n = 2 ** int(bits) - 1
    q = torch.sign(x) * torch.round((x.abs() / x_max).clamp(max=1.0) * n) / n * x_max
    return ste(x, q)


def _mid_rise(y: torch.Tensor, bits: int, fs: torch.Tensor, inside: bool = False):
    """``q = (clamp(floor((y + r) / step), 0, n - 1) + 1/2) step - r``, ``step = 2 r / n``, with
    ``fs`` (the range ``r``) broadcast to ``y``'s shape; or ``(q, inside)``, ``inside`` where the
    converter does not saturate.

    One elementwise operation per step, in place where it can be, and no fused ones: a fused
    multiply-add rounds differently in vectorised and scalar code, so the result would depend
    on the tensor's size (the conversion itself must not depend on how an evaluation is chunked;
    the partial outputs it converts are equal across chunkings to float32 rounding only).
    """
    n = 2 ** int(bits)
    step = fs * (2.0 / n)  # exact: n is a power of two
    k = (y + fs).div_(step).floor_()
    kc = k.clamp(0, n - 1)
    mask = torch.eq(kc, k) if inside else None
    q = kc.add_(0.5).mul_(step).sub_(fs)
    return (q, mask) if inside else q


class _AdcQuantize(torch.autograd.Function):
    """Mid-rise ADC with the LSQ gradient for its full scale (Esser et al., "Learned Step Size
    Quantization", ICLR 2020, adapted to a symmetric mid-rise converter of range ``r``).

    Forward: ``q = (clamp(floor((y + r) / step), 0, n - 1) + 1/2) step - r``, ``step = 2 r / n``,
    with ``r = full_scale * scale`` (``scale`` has no gradient: e.g. each sample's input scale).
    Backward, treating ``floor`` as the identity (STE) as LSQ does:

    * ``dq/dy = 1`` inside the range and 0 where the converter saturates (the clipping is in
      the gradient, as in PACT and LSQ), so outputs beyond the range stop pulling on the weights;
    * ``dq/dr = (q - y) / r`` inside (the rounding error: LSQ's ``round(v/s) - v/s``) and
      ``q / r = +-(1 - 1/n)`` where it saturates (LSQ's ``-Q_n`` / ``Q_p``): a larger range
      lowers the clipping error and raises the rounding error, and the gradient weighs both.
      Through ``r = full_scale * scale``: ``dq/dfull_scale = (dq/dr) r / full_scale``, so the
      sum over the broadcast dimensions is formed before the one division by ``full_scale``.
    """

    @staticmethod
    def forward(ctx, y, full_scale, scale, bits):
        fs = (full_scale * scale).expand_as(y)
        q, inside = _mid_rise(y, bits, fs, inside=True)
        ctx.save_for_backward(y, q, full_scale, inside)
        return q

    @staticmethod
    def backward(ctx, grad):
        y, q, full_scale, inside = ctx.saved_tensors
        grad_y = grad * inside if ctx.needs_input_grad[0] else None
        grad_r = None
        if ctx.needs_input_grad[1]:
            # dq/dr r = q - y inside, q outside; the r of dq/dr and of r = full_scale * scale cancel
            grad_r = _sum_to(grad * torch.where(inside, q - y, q), full_scale.shape) / full_scale
        return grad_y, grad_r, None, None


class _AdcSte(torch.autograd.Function):
    """The ADC's output with the straight-through gradient (identity in ``y``, also beyond the range)."""

    @staticmethod
    def forward(ctx, y, fs, bits):
        return _mid_rise(y, bits, fs)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


def _sum_to(t: torch.Tensor, shape) -> torch.Tensor:
    """Sum a broadcast gradient back to ``shape``."""
    lead = t.dim() - len(shape)
    t = t.sum(dim=tuple(range(lead))) if lead > 0 else t
    dims = tuple(i for i, s in enumerate(shape) if s == 1 and t.shape[i] != 1)
    return t.sum(dim=dims, keepdim=True) if dims else t


def adc_quantize(y: torch.Tensor, bits: int, full_scale: Union[torch.Tensor, float],
                 scale: Union[torch.Tensor, float] = 1.0) -> torch.Tensor:
    """Output of a ``bits``-bit ADC on ``y`` (signed; same units as ``full_scale * scale``).

    Mid-rise quantiser over ``[-r, r]``, ``r = full_scale * scale``: ``2**bits`` values
    ``(k + 1/2) * step - r``, ``step = 2 * r / 2**bits``; inputs beyond the range saturate.
    A 1-bit ADC gives ``+-r / 2``.

    Gradient: with a fixed (or calibrated) range, the straight-through estimator (identity
    in ``y``, as in quantisation-aware training). When ``full_scale`` requires a gradient
    (a learned range), the LSQ gradient of :class:`_AdcQuantize`: ``y`` passes inside the
    range only, and the range gets the gradient of the rounding and the clipping error.

    Args:
        y: converter inputs, any shape.
        full_scale: the range, broadcastable to ``y`` (e.g. one per tile and column).
        scale: a factor of the range without gradient, broadcastable to ``y`` (e.g. each
            sample's input scale); kept apart so that a learned range's gradient is summed
            over the samples before it is scaled.
    """
    if isinstance(full_scale, torch.Tensor) and full_scale.requires_grad:
        scale = torch.as_tensor(scale, dtype=y.dtype, device=y.device)
        return _AdcQuantize.apply(y, full_scale, scale.detach(), bits)
    fs = full_scale * scale
    fs = fs.expand_as(y) if isinstance(fs, torch.Tensor) else torch.full_like(y, float(fs))
    if y.requires_grad and torch.is_grad_enabled():
        return _AdcSte.apply(y, fs, bits)
    return _mid_rise(y.detach(), bits, fs)
