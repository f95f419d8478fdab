"""How a network is trained: the Lightning module (standard, noise-aware and technology-aware steps)."""
from .module import TRAIN_CHIP_SEED_BASE, CrossbarClassifier

__all__ = ["CrossbarClassifier", "TRAIN_CHIP_SEED_BASE"]
