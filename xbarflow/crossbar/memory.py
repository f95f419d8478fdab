"""How much memory simulating a layer's arrays takes, before anything is allocated.

A crossbar layer is simulated as its padded tiles (section 5 of the model note): for
separate arrays two of them, ``2 * n_r * rows * n_c * cols`` device conductances. The
estimate counts the copies of that grid that exist at once, measured on the FCN
784-500-10 for tiles from 64x64 to 4096x4096 (float32, peak resident memory of one step
in a fresh process, minus the process's own):

* evaluation (no gradient): about 19 bytes per cell, i.e. the float32 conductances and
  a chip's float64 random draws;
* technology-aware training: about 25 bytes per cell, six float32 copies kept for the
  backward pass (mapping, tiles, chip factors, device conductances, transfer matrices,
  their gradients).

Layers add up in both cases (in training every layer's graph is alive at once; in
evaluation the C allocator keeps the blocks an earlier layer freed).

The constants below round those up. With wire resistance the sweep of
:mod:`.wire` keeps two ``n x n`` states per swept row of each tile for the backward pass
(``n = min(rows, cols)``, ``m = max(rows, cols)`` rows swept), or, when those would exceed
``wire.KEEP_ALL_BYTES``, a checkpoint every ``k = ceil(sqrt(m))`` rows and ``2 k`` states
of the segment being recomputed (:func:`.wire.checkpoint_every`); a few per tile in
evaluation. Where :func:`.circuit.transfer_matrix` takes nested dissection instead (tiles
of 256 and more), its stored levels, per cell of the tile padded to powers of two.
"""
from __future__ import annotations

from dataclasses import dataclass

from .spec import CrossbarSpec
from .tiling import grid_shape
from .wire import checkpoint_every

# float32 copies of the tile grid alive at the peak (see the module docstring)
EVAL_COPIES = 5.0
TRAIN_COPIES = 6.5


@dataclass(frozen=True)
class ArrayMemory:
    """The simulated arrays of one layer and the memory they take.

    Attributes:
        grid: tiles along fan-in and along fan-out ``(n_r, n_c)`` of one array.
        tile: ``(rows, cols)`` of one tile.
        arrays: physical arrays (2 for separate G+ / G-, 1 interleaved).
        cells: device conductances simulated, all arrays together.
        eval_bytes: peak bytes to evaluate the layer (one chip).
        train_bytes: bytes a technology-aware training step keeps for this layer.
    """

    grid: tuple
    tile: tuple
    arrays: int
    cells: int
    eval_bytes: float
    train_bytes: float


# floats per padded cell that nested dissection (wire_nd) adds: a training step (stored
# levels for the backward and one level's workspace, measured) and an evaluation (two
# levels' blocks alive at once, ~18 floats per cell each, by count)
ND_TRAIN_FLOATS = 165
ND_EVAL_FLOATS = 40


def _nested(spec: CrossbarSpec) -> bool:
    from . import circuit  # the solver transfer_matrix will pick for these tiles

    return circuit.uses_nested_dissection(spec.rows, spec.cols, circuit.WIRE_SOLVER)


def array_memory(fan_in: int, fan_out: int, spec: CrossbarSpec, itemsize: int = 4) -> ArrayMemory:
    """Memory to simulate a ``fan_in x fan_out`` weight matrix on ``spec``'s tiles.

    Args:
        fan_in, fan_out: the layer's weight matrix (a convolution's im2col view).
        spec: tiles, mapping and circuit.
        itemsize: bytes per element of the simulation's floating type (4: float32).

    Returns:
        An :class:`ArrayMemory`; bytes are estimates (see the module docstring).
    """
    interleaved = spec.mapping == "interleaved"
    out_cols = 2 * fan_out if interleaved else fan_out
    arrays = 1 if interleaved else 2
    n_r, n_c = grid_shape(fan_in, out_cols, spec.rows, spec.cols)
    tiles = arrays * n_r * n_c
    cells = tiles * spec.rows * spec.cols
    eval_bytes = EVAL_COPIES * cells * itemsize
    train_bytes = TRAIN_COPIES * cells * itemsize
    if spec.r_wire > 0 and _nested(spec):
        # nested dissection pads each tile to powers of two; measured (scripts/bench_wire.py
        # --memory, one TAT step of the FCN 784-500-10): about 640 B per padded cell on
        # 256x256 tiles and on one 784x500 array, stored levels and one level's workspace
        padded = tiles * (1 << (spec.rows - 1).bit_length()) * (1 << (spec.cols - 1).bit_length())
        eval_bytes += ND_EVAL_FLOATS * padded * itemsize
        train_bytes += ND_TRAIN_FLOATS * padded * itemsize
    elif spec.r_wire > 0:
        n, m = min(spec.rows, spec.cols), max(spec.rows, spec.cols)
        eval_bytes += tiles * (5 * n * n + m * n) * itemsize
        # one sweep per layer (all its tiles at once); past wire.KEEP_ALL_BYTES it keeps
        # checkpoints and one segment's states instead of every state
        state = tiles * n * n * itemsize
        every = checkpoint_every(m, state)
        kept = 2 * m if every == 1 else -(-m // every) + 2 * every
        train_bytes += kept * state
    return ArrayMemory((n_r, n_c), (spec.rows, spec.cols), arrays, cells, eval_bytes, train_bytes)
