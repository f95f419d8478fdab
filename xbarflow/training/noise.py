"""Weight noise of noise-injection training (``training=noise_aware``).

Hardware-aware training as IBM aihwkit does it (v1.1.0,
``aihwkit.simulator.parameters.inference.WeightModifierParameter`` applied by
``aihwkit.simulator.tiles.torch_tile.TorchSimulatorTile.modify_weight``): every
training step perturbs the weights of the analog layers with a fresh random draw
and runs an otherwise ideal forward pass, with no circuit model. The noise is drawn
outside autograd and added to the weight, so the gradient reaches the stored
(clean) weight unchanged and the optimizer updates the clean weight.

The options (:class:`xbarflow.config.WeightNoiseConfig`), applied in this order:

* ``mult_std``: each weight times ``exp(mult_std * z)``, a lognormal factor of
  median 1 like a chip's ``d2d`` device factor (aihwkit's ``MULT_NORMAL`` draws
  ``1 + std_dev * z`` instead; the two agree to first order in the sigma);
* ``add_std``: plus ``add_std * w_max * z``, with ``w_max`` the layer's mapping range
  (``xbar.w_max``, else max |W| of the layer at this step): aihwkit's ``ADD_NORMAL``
  with ``rel_to_actual_wmax=True`` (or ``assumed_wmax = xbar.w_max`` when it is set);
* ``pdrop``: each weight is 0 for the step with this probability (aihwkit's ``pdrop``,
  drop connect).

Biases and the digital column gains are digital: they get no noise (aihwkit's torch
tile also keeps the bias digital). Evaluation never sees the noise: it is applied
only inside the training step, through :func:`torch.func.functional_call`.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn as nn

from ..crossbar.mapping import weight_range
from ..crossbar.rng import layer_generator
from ..nn.layers import _XbarMixin


def perturb_weight(weight: torch.Tensor, *, mult_std: float = 0.0, add_std: float = 0.0, pdrop: float = 0.0,
                   w_max: Optional[torch.Tensor] = None, generator: torch.Generator) -> torch.Tensor:
    """``weight`` plus one draw of noise; the gradient w.r.t. ``weight`` is the identity.

    Args:
        weight: any shape (dimensionless weights).
        mult_std: sigma of the log of the multiplicative factor.
        add_std: std of the additive noise in units of ``w_max``.
        pdrop: drop-connect probability in ``[0, 1)``.
        w_max: the layer's weight range (scalar); needed when ``add_std > 0``.
        generator: CPU generator of this draw; the noise is drawn in float64 on the CPU
            so that a seed gives the same noise on every machine.

    Returns:
        The noisy weight, same shape, dtype and device as ``weight``.
    """
    with torch.no_grad():
        w = weight.detach().to(device="cpu", dtype=torch.float64)
        noisy = w
        if mult_std > 0.0:
            noisy = noisy * torch.exp(mult_std * torch.randn(w.shape, generator=generator, dtype=torch.float64))
        if add_std > 0.0:
            if w_max is None:
                raise ValueError("add_std > 0 needs the layer's w_max")
            scale = add_std * float(w_max)
            noisy = noisy + scale * torch.randn(w.shape, generator=generator, dtype=torch.float64)
        if pdrop > 0.0:
            keep = torch.rand(w.shape, generator=generator, dtype=torch.float64) >= pdrop
            noisy = noisy * keep
        delta = (noisy - w).to(dtype=weight.dtype, device=weight.device)
    return weight + delta


def noisy_weights(model: nn.Module, noise, seed: int) -> Dict[str, torch.Tensor]:
    """One step's noisy weight of every crossbar layer of ``model``.

    Args:
        model: a converted model (:func:`xbarflow.nn.convert`).
        noise: the noise options (``mult_std``, ``add_std``, ``pdrop``; a
            :class:`xbarflow.config.WeightNoiseConfig`).
        seed: the step's seed; each layer draws from its own stream of it (salted
            with the layer's name), so a step's noise is reproducible.

    Returns:
        ``{qualified parameter name: noisy weight}``, for :func:`torch.func.functional_call`.
    """
    out: Dict[str, torch.Tensor] = {}
    for name, layer in model.named_modules():
        if not isinstance(layer, _XbarMixin):
            continue
        W = layer.weight
        out[f"{name}.weight" if name else "weight"] = perturb_weight(
            W, mult_std=noise.mult_std, add_std=noise.add_std, pdrop=noise.pdrop,
            w_max=weight_range(W, layer.spec.w_max) if noise.add_std > 0.0 else None,
            generator=layer_generator(seed, layer.xbar_name, "weight_noise"),
        )
    return out


def forward_with_weight_noise(model: nn.Module, x: torch.Tensor, noise, seed: int) -> torch.Tensor:
    """``model(x)`` with the step's noisy weights in place of the stored ones (which stay untouched)."""
    return torch.func.functional_call(model, noisy_weights(model, noise, seed), (x,))
