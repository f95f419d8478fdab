"""Crossbar layers and model conversion (wraps :mod:`xbarflow.crossbar`)."""
from .calibration import calibrate_column_gains, calibrate_converters, reset_column_gains
from .compensation import COMPENSATIONS, calibrate_global_gains, compensate, global_gain, saved_column_gains
from .convert import LayerSelection, convert, convertible_layers, set_mode, xbar_layers, xbar_mode
from .layers import MODES, XbarConv2d, XbarLinear
from .table import LayerRow, crossbar_array_count, format_layer_table, layer_table

__all__ = ["XbarLinear", "XbarConv2d", "convert", "set_mode", "xbar_mode", "xbar_layers", "MODES",
           "calibrate_column_gains", "calibrate_converters", "reset_column_gains", "LayerSelection", "convertible_layers",
           "LayerRow", "layer_table", "format_layer_table", "crossbar_array_count",
           "COMPENSATIONS", "calibrate_global_gains", "compensate", "global_gain", "saved_column_gains"]
