"""One-line errors for command-line overrides that Hydra would reject with a multi-line report.

``run.py`` calls :func:`check_overrides` before Hydra starts, so that a typo in a config group
option, a key or a value's type ends like every other bad input here: one line naming the
key and what is allowed, exit status 2, nothing written. Range checks stay in
:func:`xbarflow.config.validate` (inside a sweep they reject that one job, not the sweep).
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Iterable, List, Optional, Tuple

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, ValueType
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from xbarflow.config import Config

__all__ = ["check_overrides", "check_composition"]

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


def check_composition(args: Iterable[str], conf_dir: Path, config_name: str = "config") -> Optional[str]:
    """Compose the config as each job will, once per value of every sweep; the first failure as one line.

    This catches what only composition shows, before Hydra starts: a YAML syntax error in a config
    file (a device file of the user's, through ``hydra.searchpath``), an unknown key inside a file,
    an option missing from a user's search path. Values are checked one sweep at a time (every
    other sweep at its first value), so the cost is linear in the number of values.

    Args:
        args: the command line after the program name.
        conf_dir: the primary config directory.

    Returns:
        ``"error: OVERRIDE: ..."`` (or ``"error: ..."`` when no single override is to blame), or None.
        None too when the command names another config directory (``-cd``, ``-cp``, ``-cn``): left to Hydra.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from xbarflow.config import register_configs

    register_configs()
    args = list(args)
    if any(a.split("=")[0] in _SEARCH_PATH_FLAGS for a in args):
        return None
    parser = OverridesParser.create()
    base: List[str] = []
    sweeps: List[Tuple[int, List[str]]] = []
    for arg in (a for a in args if "=" in a and not a.startswith("-")):
        try:
            (o,) = parser.parse_overrides([arg])
        except Exception:  # Hydra reports its own syntax errors
            return None
        if not o.is_sweep_override():
            base.append(arg)
            continue
        if o.value_type not in _LISTED_SWEEPS:
            continue  # glob sweeps need Hydra's config loader: left to Hydra
        key = o.get_key_element()
        values = [f"{key}={Override._get_value_element_as_str(v)}" for v in o.sweep_iterator()]
        if values:
            sweeps.append((len(base), values))
            base.append(values[0])
    variants = [list(base)]
    for position, values in sweeps:
        for value in values[1:]:
            variant = list(base)
            variant[position] = value
            variants.append(variant)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir.resolve()), version_base="1.3"):
            for i, variant in enumerate(variants):
                try:
                    compose(config_name=config_name, overrides=variant)
                except Exception as e:  # every composition failure becomes one line
                    # a sweep's other values are blamed by name; the base case's message names its file or key
                    blamed = [v for v in variant if v not in base] if i else []
                    return f"error: {' '.join(blamed)}: {_one_line(e)}" if blamed else f"error: {_one_line(e)}"
    finally:
        GlobalHydra.instance().clear()
    return None


def _one_line(e: BaseException) -> str:
    """A composition error in one line: a YAML error as file, line and problem; else the first line."""
    import yaml

    if isinstance(e, yaml.MarkedYAMLError) and e.problem_mark is not None:
        mark = e.problem_mark
        return f"YAML syntax error in {mark.name}, line {mark.line + 1}: {e.problem}"
    cause = e.__cause__ or e.__context__
    if isinstance(cause, yaml.MarkedYAMLError):
        return _one_line(cause)
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[0] if lines else type(e).__name__


def _check_value(schema: DictConfig, key: str, value) -> Optional[str]:
    """Why ``key = value`` does not fit the schema (one line), or None."""
    node, parts = schema, key.split(".")
    for depth, part in enumerate(parts):
        if not isinstance(node, DictConfig) or OmegaConf.get_type(node) in (dict, None):
            return None  # a free-form node: any key may follow
        # `part in node` is False for a key whose value is MISSING (a device number with no
        # schema default): ask for the key itself
        if part not in node.keys():
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
