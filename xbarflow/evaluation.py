"""Section-8 evaluation: software, nominal crossbar and ``n_chips`` random chips.

With ``compensation`` other than ``none`` the digital periphery of the nominal crossbar
and of every chip at every read time is calibrated first (:mod:`xbarflow.nn.compensation`)
on a batch of *training* images, and the trained gains are put back afterwards. With
``bn_recalibration="chip"`` every BatchNorm's running statistics are then re-estimated on
training images read through that chip (:mod:`xbarflow.nn.batchnorm`), and the trained
statistics are put back afterwards too.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, Subset
from torchmetrics.classification import MulticlassAccuracy

from .crossbar.variation import Chip
from .nn.batchnorm import BN_RECALIBRATIONS, reestimate_batchnorm, saved_batchnorm_stats
from .nn.compensation import COMPENSATIONS, compensate, saved_column_gains
from .nn.convert import set_mode


@torch.no_grad()
def accuracy(model: nn.Module, loader: DataLoader, num_classes: int, device) -> float:
    """Top-1 accuracy in percent of ``model`` in its current mode."""
    metric = MulticlassAccuracy(num_classes=num_classes, average="micro").to(device)
    model.eval()
    for x, y in loader:
        metric.update(model(x.to(device)), y.to(device))
    return 100.0 * float(metric.compute())


def evaluate(
    model: nn.Module,
    loader: DataLoader,
    *,
    num_classes: int,
    n_chips: int,
    chip_seed: int,
    make_chip: Callable[[int], Optional[Chip]],
    device="cpu",
    prefix: str = "test/",
    times: Sequence[float] = (),
    compensation: str = "none",
    calibration_loader: Optional[DataLoader] = None,
    bn_recalibration: str = "none",
    bn_loader: Optional[DataLoader] = None,
) -> Tuple[Dict[str, float], List[float]]:
    """Accuracy (percent) three ways; chip ``i`` has seed ``chip_seed + i``.

    The nominal crossbar has every deterministic effect that is on (parasitic
    resistances, conductance levels, DAC, ADC) and none of the random ones. Chips
    are read just after programming (drift is the identity at ``t0``); with drift on
    the same chips are also read at each of ``times`` (seconds).

    Returns:
        ``(metrics, per_chip)``: ``{prefix}acc_software``, ``acc_xbar_nominal``,
        ``acc_xbar_mean``, ``acc_xbar_std`` (sample std over chips, 0 for one chip),
        ``acc_xbar_min``; with drift, ``acc_xbar_{mean,std,min}_at_<t>s`` per time
        (:func:`time_suffix`); and the accuracy of each chip (at ``t0``). Without
        random effects every chip is the nominal one, so it is evaluated once. With
        read noise every batch is a fresh read (reads numbered from 0 per chip).

    Compensation (``none``, ``global``, ``column``): before the nominal crossbar and each
    chip at each read time is measured, its digital gains are fitted on the images of
    ``calibration_loader`` (:func:`calibration_loader`: training images, never the test
    split), and restored to the trained ones right after, so nothing carries over to the
    next chip or time. With read noise, the calibration is the chip's first read(s).

    BatchNorm re-estimation (``none``, ``chip``): with ``chip``, after the compensation, every
    BatchNorm's running statistics are re-estimated on the images of ``bn_loader`` (training
    images, never the test split) read through the nominal crossbar, each chip and each read
    time, and restored to the trained ones right after. The software accuracy keeps the
    trained statistics.
    """
    if compensation not in COMPENSATIONS:
        raise ValueError(f"compensation must be one of {', '.join(COMPENSATIONS)} (got {compensation!r})")
    if bn_recalibration not in BN_RECALIBRATIONS:
        raise ValueError(f"bn_recalibration must be one of {', '.join(BN_RECALIBRATIONS)} (got {bn_recalibration!r})")
    x_cal = None
    if compensation != "none":
        if calibration_loader is None:
            raise ValueError(f"compensation {compensation!r} needs a calibration_loader of training images")
        x_cal = torch.cat([x for x, _ in calibration_loader]).to(device)
    x_bn: List[torch.Tensor] = []
    if bn_recalibration != "none":
        if bn_loader is None:
            raise ValueError(f"bn_recalibration {bn_recalibration!r} needs a bn_loader of training images")
        x_bn = [x.to(device) for x, _ in bn_loader]

    def measure() -> float:
        with saved_column_gains(model), saved_batchnorm_stats(model):
            model.eval()
            if x_cal is not None:
                compensate(model, compensation, x_cal)
            if x_bn:
                reestimate_batchnorm(model, x_bn)
            return accuracy(model, loader, num_classes, device)

    set_mode(model, "ideal")
    software = accuracy(model, loader, num_classes, device)
    set_mode(model, "nominal")
    nominal = measure()
    per_chip: List[float] = []
    at_time: Dict[float, List[float]] = {}
    for i in range(n_chips):
        chip = make_chip(chip_seed + i)
        if chip is None:
            per_chip = [nominal] * n_chips
            break
        set_mode(model, "chip", chip)
        per_chip.append(measure())
        if chip.device.has_drift:
            for t in times:
                set_mode(model, "chip", chip.at(t))
                at_time.setdefault(float(t), []).append(measure())
    set_mode(model, "ideal")
    metrics = {f"{prefix}acc_software": software, f"{prefix}acc_xbar_nominal": nominal}
    metrics.update(_stats(per_chip, f"{prefix}acc_xbar", ""))
    for t, accs in at_time.items():
        metrics.update(_stats(accs, f"{prefix}acc_xbar", time_suffix(t)))
    return metrics, per_chip


def calibration_loader(train: Dataset, n_samples: int, *, seed: int = 0, batch_size: int = 1000,
                       num_workers: int = 0) -> DataLoader:
    """``n_samples`` images of the training split, a draw seeded by ``seed``: the calibration batch.

    Args:
        train: the training images without augmentation (``build_datasets(...).calibration_images``);
            never the test split.
        n_samples: ``eval.calibration_samples`` (all of the split if it is smaller).
        seed: the run seed (the same draw as the converter calibration of ``xbar.calibration_samples``).
    """
    n = min(int(n_samples), len(train))
    pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(int(seed)))[:n]
    return DataLoader(Subset(train, pick.tolist()), batch_size=batch_size, shuffle=False, num_workers=num_workers)


def time_suffix(t: float) -> str:
    """Metric-name suffix for a read at ``t`` seconds: ``_at_3600s``.

    (The issue's ``@t=3600`` is not a valid MLflow metric name: MLflow allows only
    letters, digits, ``_ - . / :`` and spaces.)
    """
    text = f"{t:.0f}" if float(t).is_integer() else f"{t:f}".rstrip("0").rstrip(".")
    return f"_at_{text}s"


def _stats(accs: List[float], stem: str, suffix: str) -> Dict[str, float]:
    t = torch.tensor(accs, dtype=torch.float64)
    return {
        f"{stem}_mean{suffix}": float(t.mean()),
        f"{stem}_std{suffix}": float(t.std()) if len(accs) > 1 else 0.0,
        f"{stem}_min{suffix}": float(t.min()),
    }
