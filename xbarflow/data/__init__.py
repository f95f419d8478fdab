"""Datasets and transforms; each ``dataset`` config names its builder by ``_target_``."""
from ..errors import DatasetUnavailable
from .datasets import build_datasets, tensor_splits
from .draws import EpochShuffleSampler, ResumableLoader, SeededDraws
from .images import image_folder_splits, torchvision_splits
from .splits import DataSplits

__all__ = ["build_datasets", "DataSplits", "DatasetUnavailable", "EpochShuffleSampler", "ResumableLoader", "SeededDraws",
           "tensor_splits", "torchvision_splits", "image_folder_splits"]
