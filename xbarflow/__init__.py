"""xbarflow: technology-aware training and evaluation of neural networks on non-ideal memristive crossbars."""
__version__ = "0.1.0"
