"""The two kinds of bad input, in a module of their own that imports nothing: every floor can
raise them (the model builders, the datasets, the config checks, the tracking store) without
importing the modules above it, and an entry point can catch both without importing torch.
:mod:`xbarflow.config` re-exports them, so ``from xbarflow.config import ConfigError`` still works.
"""


class ConfigError(ValueError):
    """A configuration value outside its allowed range."""


class DatasetUnavailable(RuntimeError):
    """The dataset cannot be had (offline, missing or corrupt files); the message says how to get it.

    Beside :class:`ConfigError` (the other kind of bad input), so that an entry point can catch
    both without importing torch.
    """
