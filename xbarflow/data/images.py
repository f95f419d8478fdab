"""Image datasets that stream from disk (CIFAR-10/100, any image folder) and the transforms of the config.

These do not load the data as one tensor: each split is a torchvision dataset read
sample by sample through the DataLoader (``dataset.num_workers`` worker processes).
Transforms, from the ``dataset`` config:

* size: ``image_size`` (square side) reached by zero-padding (``resize_mode: pad``, centred;
  0 V rows on the crossbar) or by resizing (``resize``, bilinear with antialiasing);
* augmentation, training split only: random crop of ``image_size`` after ``crop_padding``
  zero pixels on each side, random horizontal flip (``hflip``);
* normalisation: ``(x - mean) / std`` per channel (``normalize_mean``, ``normalize_std``);
  without it images stay in [0, 1].
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset, TensorDataset

from ..errors import DatasetUnavailable
from .splits import DataSplits


def fit_size(x: torch.Tensor, size: Optional[int], mode: str) -> torch.Tensor:
    """Images ``(N, C, H, W)`` brought to ``size x size`` (None: unchanged) by centred zero padding or resizing."""
    if size is None or (x.shape[-2] == size and x.shape[-1] == size):
        return x
    from ..runtime import memory_limit_bytes

    need, have = x.shape[0] * x.shape[1] * size * size * x.element_size(), memory_limit_bytes("cpu")
    if need > have / 2:  # the split is held whole, and a training step needs the other half
        side = int((have / 2 / (x.shape[0] * x.shape[1] * x.element_size())) ** 0.5)
        raise DatasetUnavailable(f"dataset.image_size={size}: {x.shape[0]} images of {size}x{size} take "
                                 f"{need / 1e9:.3g} GB, more than half this machine's {have / 1e9:.3g} GB; "
                                 f"allowed here: 1 to {side}")
    if mode == "pad":
        dh, dw = size - x.shape[-2], size - x.shape[-1]
        if dh < 0 or dw < 0:
            raise DatasetUnavailable(f"dataset.image_size={size} is smaller than the images "
                                     f"({x.shape[-2]}x{x.shape[-1]}); use dataset.resize_mode=resize")
        return F.pad(x, (dw // 2, dw - dw // 2, dh // 2, dh - dh // 2))
    from torchvision.transforms.v2 import functional as TF

    return TF.resize(x, [size, size], antialias=True)


def normalise(x: torch.Tensor, cfg) -> torch.Tensor:
    """``(x - mean) / std`` per channel when the config sets them."""
    if not cfg.normalize_mean:
        return x
    mean = torch.tensor(cfg.normalize_mean, dtype=x.dtype).reshape(1, -1, 1, 1)
    std = torch.tensor(cfg.normalize_std, dtype=x.dtype).reshape(1, -1, 1, 1)
    return (x - mean) / std


class _RandomCropSameSize(torch.nn.Module):
    """Random crop back to the input's own size after zero padding (torchvision needs the size up front)."""

    def __init__(self, padding: int):
        super().__init__()
        self.padding = padding

    def forward(self, x):
        from torchvision.transforms.v2 import RandomCrop

        return RandomCrop((x.shape[-2], x.shape[-1]), padding=self.padding)(x)


def _augment_list(cfg) -> List:
    from torchvision.transforms import v2

    out = []
    if cfg.crop_padding > 0:
        out.append(_RandomCropSameSize(cfg.crop_padding))
    if cfg.hflip:
        out.append(v2.RandomHorizontalFlip())
    return out


class TransformedTensorDataset(Dataset):
    """A ``TensorDataset`` whose images pass through a (random) transform at every read."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, transform):
        self.x, self.y, self.transform = x, y, transform

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.transform(self.x[i]), self.y[i]


def augmented_tensor_dataset(x: torch.Tensor, y: torch.Tensor, cfg) -> Dataset:
    """The training split: plain tensors, or with the config's random crop / flip applied per read.

    Augmentation runs after normalisation here (the tensors are normalised once), so the
    crop's padding is the normalised value of black only when no normalisation is set;
    for padding with true zeros use the streaming datasets.
    """
    aug = _augment_list(cfg)
    if not aug:
        return TensorDataset(x, y)
    from torchvision.transforms import v2

    return TransformedTensorDataset(x, y, v2.Compose(aug))


def image_transform(cfg, train: bool, size_hint: Optional[int] = None):
    """PIL / uint8 image -> float tensor in [0, 1], sized, (train: augmented), normalised."""
    from torchvision.transforms import v2

    steps = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]
    size = cfg.image_size or size_hint
    if size is not None:
        steps.append(v2.Resize([size, size], antialias=True) if cfg.resize_mode == "resize"
                     else v2.Lambda(lambda x: fit_size(x[None], size, "pad")[0]))
    if train:
        steps += _augment_list(cfg)
    if cfg.normalize_mean:
        steps.append(v2.Normalize(list(cfg.normalize_mean), list(cfg.normalize_std)))
    return v2.Compose(steps)


def _split_indices(n: int, val_fraction: float, seed: int):
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = int(round(val_fraction * n))
    return perm[n_val:], perm[:n_val]


def _splits(train_aug: Dataset, train_plain: Dataset, test: Dataset, classes, cfg) -> DataSplits:
    train_idx, val_idx = _split_indices(len(train_plain), cfg.val_fraction, cfg.split_seed)
    if cfg.subset is not None:
        train_idx = train_idx[: cfg.subset]
    if cfg.test_subset is not None:
        test = Subset(test, list(range(min(cfg.test_subset, len(test)))))
    try:
        in_shape = tuple(test[0][0].shape)
    except Exception as e:
        raise DatasetUnavailable(f"dataset {cfg.name}: cannot read an image ({type(e).__name__}: {e})") from None
    return DataSplits(Subset(train_aug, train_idx), Subset(train_plain, val_idx), test, in_shape, len(classes),
                      train_plain=Subset(train_plain, train_idx))


class _NoMd5:
    """torchvision's CIFAR datasets check each file's MD5 against the official archive; files that exist
    are read as they are (a corrupt one fails when unpickled, reported as unavailable)."""

    def _check_integrity(self) -> bool:
        root = Path(self.root) / self.base_folder
        return all((root / name).exists() for name, _ in self.train_list + self.test_list)

    def _load_meta(self) -> None:
        import pickle

        with open(Path(self.root) / self.base_folder / self.meta["filename"], "rb") as f:
            self.classes = pickle.load(f, encoding="latin1")[self.meta["key"]]
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}


def torchvision_splits(cfg) -> DataSplits:
    """CIFAR-10 / CIFAR-100 (``dataset.name``) from ``dataset.root`` (torchvision's on-disk format,
    downloaded there when ``dataset.download`` and online)."""
    import torchvision

    base = {"cifar10": torchvision.datasets.CIFAR10, "cifar100": torchvision.datasets.CIFAR100}.get(cfg.name)
    if base is None:
        raise DatasetUnavailable(f"dataset.name must be cifar10 or cifar100 for {cfg._target_} (got {cfg.name!r})")
    cls = type(base.__name__, (_NoMd5, base), {})
    try:
        if cfg.download:
            base(cfg.root, train=True, download=True)
            base(cfg.root, train=False, download=True)
        train_aug = cls(cfg.root, train=True, transform=image_transform(cfg, train=True))
        train_plain = cls(cfg.root, train=True, transform=image_transform(cfg, train=False))
        test = cls(cfg.root, train=False, transform=image_transform(cfg, train=False))
    except Exception as e:
        raise DatasetUnavailable(
            f"dataset {cfg.name} is not available in {os.path.abspath(cfg.root)} ({type(e).__name__}); run once with "
            f"network access and dataset.download=true, or use dataset=mnist5k (no network needed)") from None
    return _splits(train_aug, train_plain, test, train_plain.classes, cfg)


def image_folder_splits(cfg) -> DataSplits:
    """Any folder of images, one sub-folder per class (``torchvision.datasets.ImageFolder``).

    ``dataset.path`` holds either ``train/`` and ``test/`` (each with the class folders) or the
    class folders directly, then split into test / train by ``test_fraction`` (``split_seed``).
    Images are read as RGB and brought to ``image_size`` (default 32) square.
    """
    from torchvision.datasets import ImageFolder

    if not cfg.path:
        raise DatasetUnavailable("dataset.path must name a folder of images (one sub-folder per class)")
    root = Path(cfg.path)
    if not root.is_dir():
        raise DatasetUnavailable(f"dataset.path {root} is not a folder")
    size = cfg.image_size or 32

    def folder(p, train):
        return ImageFolder(str(p), transform=image_transform(cfg, train=train, size_hint=size))

    try:
        if (root / "train").is_dir() and (root / "test").is_dir():
            train_aug, train_plain = folder(root / "train", True), folder(root / "train", False)
            test = folder(root / "test", False)
            if train_plain.classes != test.classes:
                raise DatasetUnavailable(f"dataset.path {root}: train/ and test/ have different class folders")
        else:
            train_aug, train_plain, whole_test = folder(root, True), folder(root, False), folder(root, False)
            rest, test_idx = _split_indices(len(train_plain), cfg.test_fraction, cfg.split_seed)
            train_aug, train_plain, test = Subset(train_aug, rest), Subset(train_plain, rest), Subset(whole_test, test_idx)
            train_aug.classes = train_plain.classes = whole_test.classes
    except DatasetUnavailable:
        raise
    except Exception as e:
        raise DatasetUnavailable(f"dataset.path {root}: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    return _splits(train_aug, train_plain, test, train_plain.classes, cfg)
