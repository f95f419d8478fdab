"""Crossbar layers and model conversion (wraps :mod:`xbarflow.crossbar`)."""
from .convert import convert, set_mode, xbar_layers, xbar_mode
from .calibration import calibrate_column_gains, calibrate_converters, reset_column_gains
from .layers import MODES, XbarConv2d, XbarLinear

__all__ = ["XbarLinear", "XbarConv2d", "convert", "set_mode", "xbar_mode", "xbar_layers", "MODES", "calibrate_column_gains", "calibrate_converters", "reset_column_gains"]
