"""Which ``_target_`` a config that xbarflow did not compose itself may name.

A ``_target_`` is a callable that Hydra imports and calls. In the user's own config it is the
user's choice; in a *stored* config (the model card of a logged model, a source run's params)
it is the choice of whoever wrote that run, so ``xbarflow.load_model`` of a colleague's model
would call whatever the card names (``_target_: os.system`` and its arguments). A stored
target is therefore instantiated only when it lies in the project's builders
(:data:`BUILTIN`: ``xbarflow.models``, ``xbarflow.data``, ``torchvision.models``) or in a
module the user trusts by name (the ``trusted_targets`` setting, ``trusted_targets=[mypkg.nets]``,
or ``xbarflow.load_model(..., trusted_targets=[...])``); anything else is refused with one line
that names the target and that setting, before anything is imported or called.

Every ``_target_`` of the stored node counts, nested ones included (Hydra instantiates those
first). The check is on the name and then on the object it resolves to, whose ``__module__``
must lie under a trusted module too: ``xbarflow.models.paper.torch.load`` names a trusted
module but resolves to ``torch.load``. Names with a part starting with ``_`` (``__builtins__``,
``__class__``) and OmegaConf interpolations (``${...}``: a stored card is written resolved) are
refused as well.
"""
from __future__ import annotations

from typing import Any, Iterable, List, Sequence, Tuple

from .config import ConfigError

BUILTIN = ("xbarflow.models", "xbarflow.data", "torchvision.models")
SETTING = "trusted_targets"


def _under(name: str, modules: Iterable[str]) -> bool:
    return any(m and (name == m or name.startswith(m + ".")) for m in modules)


def stored_targets(node: Any, prefix: str) -> List[Tuple[str, Any]]:
    """Every ``(key, value)`` of a ``_target_`` in ``node``, nested dicts and lists included."""
    out: List[Tuple[str, Any]] = []
    if isinstance(node, dict) or hasattr(node, "items"):
        for k, v in node.items():
            key = f"{prefix}.{k}" if prefix else str(k)
            if k == "_target_":
                out.append((key, v))
            else:
                out.extend(stored_targets(v, key))
    elif isinstance(node, (list, tuple)):
        for i, v in enumerate(node):
            out.extend(stored_targets(v, f"{prefix}[{i}]"))
    return out


def _interpolations(node: Any, prefix: str) -> List[str]:
    if isinstance(node, str):
        return [prefix] if "${" in node else []
    if isinstance(node, dict) or hasattr(node, "items"):
        return [k for key, v in node.items() for k in _interpolations(v, f"{prefix}.{key}" if prefix else str(key))]
    if isinstance(node, (list, tuple)):
        return [k for i, v in enumerate(node) for k in _interpolations(v, f"{prefix}[{i}]")]
    return []


def _refuse(key: str, target: Any, where: str, why: str = "") -> ConfigError:
    module = str(target).rsplit(".", 1)[0] if isinstance(target, str) and "." in target else str(target)
    return ConfigError(f"{key}={target} ({where}) is not a trusted target{why}: a stored config may name only "
                       f"{', '.join(m + '.*' for m in BUILTIN)} and the modules in {SETTING}; "
                       f"set {SETTING}=[{module}] if you trust whoever wrote it")


def check_target(target: Any, key: str, where: str, trusted: Sequence[str] = (), exact: Sequence[str] = ()) -> None:
    """Refuse a stored ``_target_`` outside the trusted modules.

    Args:
        target: the value of the ``_target_`` key.
        key: its key, for the message (``model._target_``).
        where: what it was read from (``model card of runs:/<id>/model``).
        trusted: modules trusted besides :data:`BUILTIN` (the ``trusted_targets`` setting).
        exact: targets trusted as they are (those the user's own config names).

    Raises:
        ConfigError: one line naming the target and the ``trusted_targets`` setting.
    """
    if isinstance(target, str) and target in exact:
        return
    modules = (*BUILTIN, *trusted)
    if not isinstance(target, str) or not target or any(not p or p.startswith("_") for p in target.split(".")):
        raise _refuse(key, target, where)
    if not _under(target, modules):
        raise _refuse(key, target, where)
    from hydra._internal.utils import _locate  # imports the trusted module only

    try:
        obj = _locate(target)
    except Exception as e:
        raise ConfigError(f"{key}={target} ({where}) cannot be imported ({type(e).__name__})") from None
    home = getattr(obj, "__module__", None)
    if not callable(obj) or not isinstance(home, str) or not _under(home, modules):
        raise _refuse(key, target, where, f" (it is {home or type(obj).__name__}.{getattr(obj, '__name__', '?')})")


def check_stored(node: Any, prefix: str, where: str, trusted: Sequence[str] = (), exact: Sequence[str] = ()) -> None:
    """Refuse a stored config node whose ``_target_`` (any of them) is not trusted, or that holds
    an interpolation; nothing of it is imported beyond trusted modules, nothing is called.

    Raises:
        ConfigError: one line.
    """
    found = _interpolations(node, prefix)
    if found:
        raise ConfigError(f"{found[0]} ({where}) holds an interpolation (${{...}}); a stored config is written "
                          "resolved, so xbarflow does not resolve one")
    for key, target in stored_targets(node, prefix):
        check_target(target, key, where, trusted, exact)


def own_targets(typed) -> List[str]:
    """The targets the user's own config names (model and dataset): trusted as they are."""
    from dataclasses import asdict, is_dataclass

    dataset = asdict(typed.dataset) if is_dataclass(typed.dataset) else dict(typed.dataset)
    return [t for _, t in stored_targets(typed.model, "model") + stored_targets(dataset, "dataset")
            if isinstance(t, str)]
