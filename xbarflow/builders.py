"""From ``_target_`` configs to objects: the network of the ``model`` group.

A model config is a ``_target_`` (a class or function, in xbarflow or any importable
package) and its keyword arguments. The dataset decides two arguments, which the pipeline
passes at instantiation: ``in_shape = (C, H, W)`` and ``num_classes``; a target receives
those of them that its signature names (or both when it takes ``**kwargs``).
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Dict, Mapping, Tuple

import torch.nn as nn

from .errors import ConfigError  # not from .config: config imports this module (check_model_config)

DATASET_ARGS = ("in_shape", "num_classes")


def model_target(model_cfg: Mapping[str, Any]) -> Callable:
    """The callable named by ``model._target_``.

    Raises:
        ConfigError: no ``_target_``, or it cannot be imported.
    """
    from hydra._internal.utils import _locate  # get_object without its error log on stderr

    target = model_cfg.get("_target_") if model_cfg is not None else None
    if not target or not isinstance(target, str):
        raise ConfigError("model._target_ is missing: name a class or function, e.g. model=resnet20 "
                          "or model._target_=mypkg.nets.MyNet")
    try:
        obj = _locate(target)
    except Exception as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        raise ConfigError(f"model._target_={target} cannot be imported ({_reason(lines, e)})") from None
    if not callable(obj):
        raise ConfigError(f"model._target_={target} is not a class or function")
    return obj


def _reason(lines, e) -> str:
    """The informative line of Hydra's multi-line locate error (the inner ImportError / AttributeError)."""
    for ln in lines:
        if "Error(" in ln:
            return ln
    return lines[0] if lines else type(e).__name__


def _signature(obj: Callable):
    try:
        return inspect.signature(obj)
    except (TypeError, ValueError):
        return None


def check_model_config(model_cfg: Mapping[str, Any]) -> None:
    """Reject a model config whose target is missing, whose keys it does not take, or whose
    values its ``xbarflow_check_args`` refuses (:mod:`xbarflow.models.checks`), in one line.

    Raises:
        ConfigError: naming the key and the target's arguments, or the value and its range.
    """
    obj = model_target(model_cfg)
    sig = _signature(obj)
    if sig is None or any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
        return
    allowed = [n for n, p in sig.parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
               and n not in DATASET_ARGS]
    for key in model_cfg:
        if key.startswith("_") and key.endswith("_"):
            continue  # Hydra's own keys: _target_, _partial_, _convert_, _recursive_, _args_
        if key in DATASET_ARGS:
            raise ConfigError(f"model.{key} is set from the dataset; remove it from the model config")
        if key not in allowed:
            raise ConfigError(f"model.{key}: no such argument of {model_cfg['_target_']} "
                              f"(arguments: {', '.join(allowed) or 'none'})")
    check = getattr(obj, "xbarflow_check_args", None)
    if callable(check):  # the builder's own checks of its values (widths >= 1, ...)
        args = {n: p.default for n, p in sig.parameters.items() if p.default is not p.empty}
        args.update({k: v for k, v in model_cfg.items() if not (k.startswith("_") and k.endswith("_"))})
        try:
            check(args)
        except ValueError as e:
            raise ConfigError(f"model.{e}") from None


def build_model(model_cfg: Mapping[str, Any], in_shape: Tuple[int, int, int], num_classes: int) -> nn.Module:
    """Instantiate the ``model`` config for inputs ``in_shape = (C, H, W)`` and ``num_classes`` classes.

    Raises:
        ConfigError: the config does not fit its target, or the target rejects a value
            (one line naming the key where the target says which).
    """
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate
    from omegaconf import DictConfig, OmegaConf

    check_model_config(model_cfg)
    obj = model_target(model_cfg)
    sig = _signature(obj)
    extra: Dict[str, Any] = {"in_shape": tuple(in_shape), "num_classes": int(num_classes)}
    if sig is not None and not any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
        extra = {k: v for k, v in extra.items() if k in sig.parameters}
    cfg = model_cfg if isinstance(model_cfg, DictConfig) else OmegaConf.create(dict(model_cfg))
    try:
        # _convert_=all: the target sees plain lists and dicts, not OmegaConf containers
        model = instantiate(cfg, _convert_="all", **extra)
    except InstantiationException as e:
        cause = e.__cause__ or e
        msg = str(cause).splitlines()[0] if str(cause) else type(cause).__name__
        # a builder of xbarflow.models names the key itself (model.channels: ...)
        raise ConfigError(msg if msg.startswith("model.") else f"model ({cfg['_target_']}): {msg}") from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model._target_={cfg['_target_']} returned {type(model).__name__}, not a torch.nn.Module")
    return model
