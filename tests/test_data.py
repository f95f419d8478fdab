"""Datasets by `_target_`: CIFAR-10 offline from files in CIFAR's own format, an image folder,
resizing / padding to 32x32, augmentation and normalisation; and the end-to-end runs."""
import pickle
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compose, run_cli

from xbarflow.config import ConfigError, validate
from xbarflow.data import DatasetUnavailable, build_datasets

FASHION = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")


def write_cifar10(root: Path, n_train_per_batch=20, n_test=30, seed=0) -> np.ndarray:
    """A tiny CIFAR-10 in the official python format (cifar-10-batches-py/: pickled dicts, rows of
    3072 uint8 = R plane, G plane, B plane). Returns the test images as (N, 32, 32, 3)."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)

    def batch(name, n):
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=n)]
        labels[:10] = list(range(10))
        with open(folder / name, "wb") as f:
            pickle.dump({"batch_label": name, "labels": labels, "data": data, "filenames": [f"{i}.png" for i in range(n)]}, f)
        return data

    for i in range(1, 6):
        batch(f"data_batch_{i}", n_train_per_batch)
    test = batch("test_batch", n_test)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                                     "ship", "truck"], "num_cases_per_batch": n_train_per_batch}, f)
    return test.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


def write_image_folder(root: Path, classes=("cat", "dog", "eel"), per_class=8, size=(20, 14)) -> Path:
    from PIL import Image

    rng = np.random.default_rng(1)
    for split in ("train", "test"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(per_class if split == "train" else 3):
                Image.fromarray(rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")
    return root


@pytest.mark.numerics
def test_cifar10_offline_from_its_own_format(tmp_path):
    test_images = write_cifar10(tmp_path)
    cfg = validate(compose(["dataset=cifar10", f"dataset.root={tmp_path}", "dataset.download=false"])).dataset
    data = build_datasets(cfg)
    assert data.in_shape == (3, 32, 32) and data.num_classes == 10
    assert len(data.train) + len(data.val) == 100 and len(data.val) == 10 and len(data.test) == 30
    # the test image is the file's pixels, scaled to [0, 1] and normalised per channel (no augmentation)
    x, y = data.test[3]
    mean, std = torch.tensor(cfg.normalize_mean).reshape(3, 1, 1), torch.tensor(cfg.normalize_std).reshape(3, 1, 1)
    expected = (torch.as_tensor(test_images[3]).permute(2, 0, 1).float() / 255 - mean) / std
    assert torch.allclose(x, expected, atol=1e-6)
    # training images are augmented: two reads of the same index differ (crop / flip), validation ones do not
    torch.manual_seed(0)
    reads = [data.train[0][0] for _ in range(6)]
    assert any(not torch.equal(reads[0], r) for r in reads[1:])
    assert torch.equal(data.val[0][0], data.val[0][0])


@pytest.mark.parametrize("builder", ["tensors", "stream"])
def test_calibration_images_are_the_training_images_without_augmentation(builder, tmp_path):
    """What calibrates a chip (converter ranges, compensation, BatchNorm re-estimation) reads the
    training images as they are: the same images as the augmented training split, index for index,
    and the same on every read whatever the global generator's state (an evaluation-only run then
    calibrates exactly as its source run did after training)."""
    aug = ["dataset.crop_padding=2", "dataset.hflip=true"]
    if builder == "tensors":
        overrides, plain_overrides = ["dataset=digits", *aug], ["dataset=digits"]
    else:
        write_cifar10(tmp_path)
        overrides = ["dataset=cifar10", f"dataset.root={tmp_path}", "dataset.download=false"]
        overrides, plain_overrides = overrides + aug, overrides + ["dataset.crop_padding=0", "dataset.hflip=false"]
    data = build_datasets(validate(compose(overrides)).dataset)
    plain = build_datasets(validate(compose(plain_overrides)).dataset)
    assert len(data.calibration_images) == len(data.train) == len(plain.train)
    torch.manual_seed(0)
    differs = 0
    for i in range(8):
        x, y = data.calibration_images[i]
        torch.manual_seed(100 + i)  # another generator state: must not matter
        x_again, _ = data.calibration_images[i]
        assert torch.equal(x, x_again) and torch.equal(x, plain.train[i][0]) and int(y) == int(plain.train[i][1])
        differs += not torch.equal(data.train[i][0], x)  # the training split itself is augmented
    assert differs > 0
    if builder == "tensors":
        assert plain.calibration_images is plain.train  # nothing augmented: the split itself


def test_cifar10_missing_is_one_line(tmp_path):
    cfg = validate(compose(["dataset=cifar10", f"dataset.root={tmp_path / 'none'}", "dataset.download=false"])).dataset
    with pytest.raises(DatasetUnavailable) as info:
        build_datasets(cfg)
    assert "dataset.download=true" in str(info.value) and "\n" not in str(info.value)


def test_image_folder(tmp_path):
    write_image_folder(tmp_path / "imgs")
    cfg = validate(compose(["dataset=image_folder", f"dataset.path={tmp_path / 'imgs'}"])).dataset
    data = build_datasets(cfg)
    assert data.in_shape == (3, 32, 32) and data.num_classes == 3
    assert len(data.train) + len(data.val) == 24 and len(data.test) == 9
    assert 0.0 <= float(data.test[0][0].min()) and float(data.test[0][0].max()) <= 1.0
    bad = validate(compose(["dataset=image_folder", f"dataset.path={tmp_path / 'nowhere'}"])).dataset
    with pytest.raises(DatasetUnavailable, match="is not a folder"):
        build_datasets(bad)


@pytest.mark.numerics
def test_pad_and_resize_to_32():
    plain = build_datasets(validate(compose(["dataset=digits"])).dataset)
    padded = build_datasets(validate(compose(["dataset=digits", "dataset.image_size=32"])).dataset)
    resized = build_datasets(validate(compose(["dataset=digits", "dataset.image_size=32", "dataset.resize_mode=resize"])).dataset)
    x = plain.test[0][0]
    assert padded.in_shape == resized.in_shape == (1, 32, 32)
    # exact: the digits are multiples of 1/16, so their sums are exact in float32 in any order
    assert torch.equal(padded.test[0][0][:, 12:20, 12:20], x) and padded.test[0][0].sum() == x.sum()
    assert resized.test[0][0].sum() > 10 * x.sum()   # 16x the area, same range


def test_normalisation_needs_matching_std():
    with pytest.raises(ConfigError, match="dataset.normalize_std must have one value per"):
        validate(compose(["dataset=digits", "dataset.normalize_mean=[0.5]", "dataset.normalize_std=[0.2,0.3]"]))


def _finished_runs(workdir):
    db = sqlite3.connect(workdir / "mlflow.db")
    return db.execute("select status from runs").fetchall()


def _params(workdir):
    db = sqlite3.connect(workdir / "mlflow.db")
    return dict(db.execute("select key, value from params").fetchall())


@pytest.mark.slow  # ~4 min on the shared 2 cores: tech-aware steps and 7 test passes of the width-16 ResNet
@pytest.mark.skipif(not FASHION.exists(), reason="Debian's dataset-fashion-mnist is not installed")
def test_resnet20_fashion_mnist_smoke(workdir):
    proc = run_cli(["model=resnet20", "dataset=fashion_mnist", "experiment=smoke"], cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| layer3.2.conv2 | Conv2d | 64x64x3x3 | 576x64 | crossbar | 9x1 | 18 |" in proc.stdout
    assert _finished_runs(workdir) == [("FINISHED",)]
    assert int(_params(workdir)["n_crossbar_arrays"]) > 0


def test_user_model_from_outside_the_repo(workdir, tmp_path_factory):
    pkg = tmp_path_factory.mktemp("userpkg")
    (pkg / "mynets.py").write_text(
        "import torch.nn as nn\n\n"
        "class Tiny(nn.Module):\n"
        "    def __init__(self, in_shape, num_classes, hidden=12):\n"
        "        super().__init__()\n"
        "        self.body = nn.Sequential(nn.Conv2d(in_shape[0], 4, 3, padding=1), nn.ReLU(), nn.Flatten(),\n"
        "                                  nn.Linear(4 * in_shape[1] * in_shape[2], hidden), nn.ReLU(),\n"
        "                                  nn.Linear(hidden, num_classes))\n\n"
        "    def forward(self, x):\n"
        "        return self.body(x)\n")
    proc = run_cli(["experiment=smoke", "dataset=digits", "model=user", "model._target_=mynets.Tiny", "model.hidden=9",
                    "xbar.layers.first_last_digital=true"], cwd=workdir, env_extra={"PYTHONPATH": str(pkg)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| body.3 | Linear | 9x256 | 256x9 | crossbar | 4x1 | 8 |" in proc.stdout
    assert "| body.0 | Conv2d | 4x1x3x3 | 9x4 | digital | - | 0 |" in proc.stdout
    assert _params(workdir)["n_crossbar_arrays"] == "8"


def test_cifar10_offline_run(workdir):
    write_cifar10(workdir / "cifar")
    proc = run_cli(["experiment=smoke", "dataset=cifar10", f"dataset.root={workdir / 'cifar'}", "dataset.download=false",
                    "dataset.num_workers=0", "model=lenet5", "training=standard"], cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _finished_runs(workdir) == [("FINISHED",)]


def test_image_folder_run(workdir):
    write_image_folder(workdir / "imgs")
    proc = run_cli(["experiment=smoke", "dataset=image_folder", f"dataset.path={workdir / 'imgs'}",
                    "dataset.num_workers=1", "model=vgg", "model.width=2", "training=standard"], cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _finished_runs(workdir) == [("FINISHED",)]
