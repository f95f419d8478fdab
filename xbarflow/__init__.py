"""xbarflow: technology-aware training and evaluation of neural networks on non-ideal memristive crossbars."""
__version__ = "0.1.0"


def load_model(uri: str, *, tracking_uri=None, trusted_targets=()):
    """A model logged by xbarflow (``runs:/<run id>/model``, a run id, a ``models:/`` URI or a folder),
    rebuilt from its model card with its weights: nothing is unpickled and no stored code runs.

    See :func:`xbarflow.logged_model.load_model`. Imported on first use, and by name: ``import
    xbarflow`` (which every ``xbarflow.*`` import runs) stays light for the command line's early
    checks, and type checkers of the physics and the layers do not follow it up the floors.
    """
    import importlib

    loader = importlib.import_module("xbarflow.logged_model")
    return loader.load_model(uri, tracking_uri=tracking_uri, trusted_targets=trusted_targets)
