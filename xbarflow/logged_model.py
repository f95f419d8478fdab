"""The trained network as an MLflow PyTorch model: ``mlflow.pytorch.load_model("runs:/<id>/model")``.

The logged object is the converted network itself (crossbar layers included, each holding
its frozen :class:`~xbarflow.crossbar.spec.CrossbarSpec`), pickled in ``ideal`` mode with no
chip and no cached effective weights, so it is as small as its weights. Loading it needs
``xbarflow`` importable (``make install``); ``xbarflow.nn.convert.set_mode(model, "nominal")``
then runs it on the nominal crossbar it was trained for.
"""
from __future__ import annotations

import copy
import sys
from typing import Dict, Optional

import torch

from .nn.convert import set_mode, xbar_layers

MODEL_NAME = "model"


def portable_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A CPU copy of ``model`` in ``ideal`` mode with no chip and no cached effective weight.

    The cache is keyed by the weight's storage address, meaningless in another process, and a
    chip holds per-device tensors as large as the arrays: neither belongs in a saved model.
    """
    saved = [(layer, layer.chip, layer._cache_key, layer._cache_weight) for layer in xbar_layers(model)]
    for layer, *_ in saved:  # detach the heavy state before copying, so it is never copied
        layer.chip, layer._cache_key, layer._cache_weight = None, None, None
    try:
        out = copy.deepcopy(model).cpu().eval()
    finally:
        for layer, chip, key, weight in saved:
            layer.chip, layer._cache_key, layer._cache_weight = chip, key, weight
    set_mode(out, "ideal")
    return out


def model_card(typed) -> Dict[str, str]:
    """Tags of the logged model: what it was trained for (hardware, crossbar, non-idealities)."""
    x, hw, ni = typed.xbar, typed.hardware, typed.nonideality
    rows, cols = x.rows or x.size, x.cols or x.size
    effects = [k for k in ("r_source", "r_sink", "r_wire", "c2c", "d2d", "levels", "stuck", "read_noise", "drift",
                           "dac", "adc") if getattr(ni, k)]
    return {
        "training": typed.training.mode, "model": str(typed.model["_target_"]).rsplit(".", 1)[-1], "dataset": typed.dataset.name,
        "hardware": hw.name, "r_on_ohm": f"{hw.r_on:g}", "r_off_ohm": f"{hw.r_off:g}",
        "crossbar": f"{rows}x{cols} tiles, r_source={x.r_source:g} ohm, r_sink={x.r_sink:g} ohm, "
                    f"r_wire={x.r_wire:g} ohm, v_read={x.v_read:g} V, mapping={x.mapping}",
        "nonideality": f"{ni.name}: {', '.join(effects) or 'none'}",
    }


def describe(card: Dict[str, str]) -> str:
    """One paragraph for the model's description (markdown)."""
    return (f"{card['model']} trained ({card['training']}) on {card['dataset']} for {card['hardware']} "
            f"(R_on {card['r_on_ohm']} ohm, R_off {card['r_off_ohm']} ohm); crossbar: {card['crossbar']}; "
            f"non-idealities: {card['nonideality']}. Load with mlflow.pytorch.load_model (xbarflow must be "
            f"importable); xbarflow.nn.convert.set_mode(model, 'nominal') runs it on the crossbar.")


def log_model(run, typed, model: torch.nn.Module, example: torch.Tensor) -> Optional[str]:
    """Log ``model`` as ``runs:/<run id>/model`` with a signature, an input example and its card.

    Args:
        run: the :class:`~xbarflow.tracking.TrackedRun`.
        typed: the run's typed config.
        model: the trained converted network.
        example: a few input images, ``(n, *in_shape)``.

    Returns:
        The model URI.
    """
    import logging

    import mlflow
    import mlflow.pytorch
    from mlflow.models import infer_signature

    portable = portable_copy(model)
    x = example[:2].detach().cpu().float()
    with torch.no_grad():
        y = portable(x)
    signature = infer_signature(x.numpy(), y.numpy())
    card = model_card(typed)
    if run.record.offline:  # the store went away during the run: the weights are kept on disk
        print("warning: the tracking store is lost: model not logged (weights.pt is kept)", file=sys.stderr, flush=True)
        return None
    from .tracking import redacted_stdout

    try:
        with redacted_stdout():  # MLflow prints "View run ... at: <tracking URI>", credentials included
            mlflow.set_tracking_uri(run.uri)
            pytorch_log = logging.getLogger("mlflow.pytorch")
            level = pytorch_log.level
            # its warning about pickles is for models from strangers; this one is the run's own
            pytorch_log.setLevel(logging.ERROR)
            try:
                with mlflow.start_run(run_id=run.run_id):
                    mlflow.pytorch.log_model(
                        portable, name=MODEL_NAME, signature=signature, input_example=x.numpy(),
                        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
                        # pt2 (the default) would export a graph of the ideal mode only: no crossbar layers
                        serialization_format="pickle",
                        tags=card, metadata={"description": describe(card), **card})
            finally:
                pytorch_log.setLevel(level)
            # leaving the fluent run ends it; the pipeline's open_run decides how the run terminates
            run.client.update_run(run.run_id, "RUNNING")
            run.client.set_tag(run.run_id, "mlflow.note.content", describe(card))
            from .sweep_view import set_model_training_kind

            set_model_training_kind(run.client, run.client.get_run(run.run_id).info.experiment_id)
    except Exception as e:  # the store failed while logging the model: the run goes on
        print(f"warning: model not logged ({type(e).__name__}); weights.pt is kept", file=sys.stderr, flush=True)
        return None
    return f"runs:/{run.run_id}/{MODEL_NAME}"
