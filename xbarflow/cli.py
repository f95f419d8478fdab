"""One-line errors for command-line overrides that Hydra would reject with a multi-line report.

``run.py`` calls :func:`check_overrides` before Hydra starts, so that a typo in a config group
option, a key or a value's type ends like every other bad input here: one line naming the
key and what is allowed, exit status 2, nothing written. Range checks stay in
:func:`xbarflow.config.validate` (inside a sweep they reject that one job, not the sweep).
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Iterable, Optional

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ValueType
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from xbarflow.config import Config

__all__ = ["check_overrides"]

# With another config search path, groups and options outside conf/ may exist: leave it all to Hydra.
_SEARCH_PATH_FLAGS = ("-cd", "--config-dir", "-cp", "--config-path", "-cn", "--config-name",
                      "-sc", "--shell-completion")
_LISTED_SWEEPS = (ValueType.SIMPLE_CHOICE_SWEEP, ValueType.CHOICE_SWEEP, ValueType.RANGE_SWEEP)


def check_overrides(args: Iterable[str], conf_dir: Path) -> Optional[str]:
    """The first structural error among command-line overrides, as one line, or None.

    Args:
        args: the command line after the program name (flags are skipped).
        conf_dir: the primary config directory (its sub-folders are the config groups).

    Returns:
        ``"error: KEY=VALUE: ..."`` for an option missing from a config group, a key not
        in the schema, or a value the schema cannot hold (every value of a sweep is
        checked); None when all is well or when the override is one this check does not
        read (``+``/``~`` overrides, ``hydra.*``, globs, interpolations), which Hydra handles.
    """
    args = list(args)
    if any(a.split("=")[0] in _SEARCH_PATH_FLAGS for a in args):
        return None
    try:
        overrides = OverridesParser.create().parse_overrides([a for a in args if "=" in a and not a.startswith("-")])
    except Exception:  # Hydra reports its own syntax errors
        return None
    if any(o.key_or_group.startswith("hydra.searchpath") for o in overrides):
        return None
    schema = OmegaConf.structured(Config)
    for o in overrides:
        key = o.key_or_group
        if o.is_add() or o.is_delete() or o.is_force_add() or key.split("/")[0].split(".")[0] == "hydra":
            continue
        if o.is_sweep_override():
            if o.value_type not in _LISTED_SWEEPS:
                continue
            values = list(o.sweep_iterator())
        else:
            values = [o.value()]
        group = conf_dir / key if key and "." not in key else None
        for value in values:
            if isinstance(value, str) and "${" in value:
                continue
            if group is not None and group.is_dir() and (isinstance(value, str) or value is None):
                options = sorted(p.stem for p in group.glob("*.yaml"))
                if value is not None and value not in options:
                    return f"error: {key}={value}: no such option in config group '{key}' (allowed: {', '.join(options)})"
                continue
            problem = _check_value(schema, key, value)
            if problem:
                return f"error: {key}={_text(value)}: {problem}"
    return None


def _check_value(schema: DictConfig, key: str, value) -> Optional[str]:
    """Why ``key = value`` does not fit the schema (one line), or None."""
    node, parts = schema, key.split(".")
    for depth, part in enumerate(parts):
        if not isinstance(node, DictConfig) or OmegaConf.get_type(node) in (dict, None):
            return None  # a free-form node: any key may follow
        if part not in node:
            where = ".".join(parts[:depth]) or "the config"
            return f"no such key (keys of {where}: {', '.join(map(str, node.keys()))})"
        node = node._get_node(part)
    trial = copy.deepcopy(schema)
    try:
        OmegaConf.update(trial, key, value, merge=True)
    except OmegaConfBaseException as e:
        return str(e).splitlines()[0]
    return None


def _text(value) -> str:
    return "null" if value is None else str(value)
