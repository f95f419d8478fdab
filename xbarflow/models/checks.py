"""Checks of the model builders' arguments, by name, before anything is built.

A builder (function or class) of :mod:`xbarflow.models` carries its check as
``xbarflow_check_args``: a function of the builder's arguments (a dict: the config's keys
over the signature's defaults, without ``in_shape`` and ``num_classes``) that raises
``ValueError`` naming the argument, e.g. ``width must be >= 1 (got 0)``. Validation calls it
(:func:`xbarflow.builders.check_model_config`: ``model.width must be >= 1 (got 0)``, before
any data is read) and so does the builder itself, for callers from Python. What depends on
the images (too many poolings for their size) is checked when the network is built.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Callable, Mapping, TypeVar

Args = Mapping[str, Any]
B = TypeVar("B")


def with_check(check: Callable[[Args], None]) -> Callable[[B], B]:
    """Attach ``check`` to a builder as its ``xbarflow_check_args``."""
    def attach(builder: B) -> B:
        builder.xbarflow_check_args = check  # type: ignore[attr-defined]
        return builder
    return attach


def positive_int(key: str, value: Any) -> None:
    """``value`` is an integer >= 1 (a width, a channel count, a size)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{key} must be an integer >= 1 (got {value!r})")
    if value < 1:
        raise ValueError(f"{key} must be >= 1 (got {value})")


def positive_ints(key: str, values: Any) -> None:
    """``values`` is a list of integers >= 1 (hidden widths, channels per stage)."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise ValueError(f"{key} must be a list of integers >= 1 (got {values!r})")
    for i, v in enumerate(values):
        positive_int(f"{key}[{i}]", v)


def pooled_side(key: str, side: int, poolings: int) -> int:
    """The side of ``side x side`` images after ``poolings`` 2x2 max-pools; at least 1.

    Raises:
        ValueError: the images vanish before the classifier (``key`` names the argument to shorten).
    """
    out = side // 2 ** poolings
    if out < 1:
        raise ValueError(f"{key}: {poolings} 2x2 poolings leave nothing of {side}x{side} images "
                         f"(at most {side.bit_length() - 1})")
    return out
