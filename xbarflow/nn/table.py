"""The layer table of a converted model: what went on crossbars, on how many arrays.

One row per weight layer (``Linear``, ``Conv2d``, and their crossbar versions), in module
order. A crossbar layer's ``fan_in x fan_out`` matrix (``C_in * kh * kw`` rows for a
convolution) is cut into a grid of ``rows x cols`` tiles (:func:`~xbarflow.crossbar.grid_shape`);
the ``separate`` mapping puts G+ and G- in two arrays per tile, ``interleaved`` in neighbouring
columns of one array (twice the columns).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import List, Optional, Tuple

import torch.nn as nn

from ..crossbar.tiling import grid_shape
from .layers import _XbarMixin


@dataclass(frozen=True)
class LayerRow:
    name: str                 # qualified module name
    kind: str                 # Linear / Conv2d (the software layer)
    weight_shape: Tuple[int, ...]
    matrix: Tuple[int, int]   # (fan_in, fan_out) as programmed; for grouped convs per group
    placement: str            # "crossbar", "digital" or "digital (grouped)"
    tile_grid: Optional[Tuple[int, int]]   # tiles along (fan_in, fan_out); None when digital
    arrays: int               # physical arrays (0 when digital)

    def as_dict(self):
        return asdict(self)


def _kind(m: nn.Module) -> Optional[str]:
    if isinstance(m, nn.Conv2d):
        return "Conv2d"
    if isinstance(m, nn.Linear):
        return "Linear"
    return None


def layer_table(model: nn.Module) -> List[LayerRow]:
    """Every Linear / Conv2d layer of ``model`` (converted or not), in module order."""
    rows = []
    for name, m in model.named_modules():
        kind = _kind(m)
        if not name or kind is None:
            continue
        w = m.weight
        fan_out, fan_in = w.shape[0], w[0].numel()
        if kind == "Conv2d" and m.groups != 1:
            fan_out //= m.groups
        if isinstance(m, _XbarMixin):
            s = m.spec
            cols_needed = 2 * fan_out if s.mapping == "interleaved" else fan_out
            grid = grid_shape(fan_in, cols_needed, s.rows, s.cols)
            arrays = grid[0] * grid[1] * (2 if s.mapping == "separate" else 1)
            placement = "crossbar"
        else:
            grid, arrays = None, 0
            placement = "digital (grouped)" if kind == "Conv2d" and m.groups != 1 else "digital"
        rows.append(LayerRow(name, kind, tuple(w.shape), (fan_in, fan_out), placement, grid, arrays))
    return rows


def crossbar_array_count(model: nn.Module) -> int:
    """Physical arrays the crossbar layers of ``model`` occupy."""
    return sum(r.arrays for r in layer_table(model))


def format_layer_table(rows: List[LayerRow]) -> str:
    """The table as Markdown, with a total line."""
    lines = ["| layer | type | weight shape | matrix (fan-in x fan-out) | on | tile grid | arrays |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        grid = f"{r.tile_grid[0]}x{r.tile_grid[1]}" if r.tile_grid else "-"
        lines.append(f"| {r.name} | {r.kind} | {'x'.join(map(str, r.weight_shape))} | {r.matrix[0]}x{r.matrix[1]} "
                     f"| {r.placement} | {grid} | {r.arrays} |")
    n_x = sum(r.placement == "crossbar" for r in rows)
    lines.append(f"\n{n_x} of {len(rows)} weight layers on crossbars, {sum(r.arrays for r in rows)} arrays")
    return "\n".join(lines)
