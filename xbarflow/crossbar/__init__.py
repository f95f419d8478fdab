"""The physics of memristive crossbars, in pure PyTorch (no framework imports).

See ``shared/docs/crossbar-model.md`` for the circuit, mapping and names.
"""
from .circuit import solve, transfer_matrix
from .devices import DeviceModel
from .effective import device_conductances, effective_weight, physical_arrays
from .mapping import conductance_pair, deinterleave_difference, interleave_columns
from .spec import CrossbarSpec
from .tiling import from_tiles, grid_shape, to_tiles
from .variation import Chip

__all__ = [
    "solve", "transfer_matrix", "effective_weight", "physical_arrays", "conductance_pair",
    "interleave_columns", "deinterleave_difference", "CrossbarSpec", "grid_shape", "to_tiles",
    "from_tiles", "Chip", "DeviceModel", "device_conductances",
]
