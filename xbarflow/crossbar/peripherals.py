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
outputs. The full scale is ``adc_range`` times the largest differential current a
tile can produce, ``rows * (g_max - g_min) * v_read`` (every input at full scale,
every device pair at its extreme), in layer-output units ``adc_range * rows *
w_max * x_max``.
"""
from __future__ import annotations

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


def adc_quantize(y: torch.Tensor, bits: int, full_scale: torch.Tensor) -> torch.Tensor:
    """Output of a ``bits``-bit ADC on ``y`` (signed; same units as ``full_scale``).

    Mid-rise quantiser over ``[-full_scale, full_scale]``: ``2**bits`` values
    ``(k + 1/2) * step - full_scale``, ``step = 2 * full_scale / 2**bits``; inputs
    beyond the range saturate. A 1-bit ADC gives ``+-full_scale / 2``. STE gradient
    (identity; the saturation is not modelled in the gradient).
    """
    n = 2 ** int(bits)
    step = 2.0 * full_scale / n
    k = torch.floor((y + full_scale) / step).clamp(0, n - 1)
    return ste(y, (k + 0.5) * step - full_scale)
