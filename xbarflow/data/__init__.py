"""Datasets and transforms; each ``dataset`` config names its builder by ``_target_``."""
from .datasets import DatasetUnavailable, DataSplits, EpochShuffleSampler, build_datasets, tensor_splits
from .images import image_folder_splits, torchvision_splits

__all__ = ["build_datasets", "DataSplits", "DatasetUnavailable", "EpochShuffleSampler", "tensor_splits",
           "torchvision_splits", "image_folder_splits"]
