"""Section-8 evaluation: software, nominal crossbar and ``n_chips`` random chips."""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from torch.utils.data import DataLoader
from torchmetrics.classification import MulticlassAccuracy

from .crossbar.variation import Chip
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
) -> Tuple[Dict[str, float], List[float]]:
    """Accuracy (percent) three ways; chip ``i`` has seed ``chip_seed + i``.

    Returns:
        ``(metrics, per_chip)``: ``{prefix}acc_software``, ``acc_xbar_nominal``,
        ``acc_xbar_mean``, ``acc_xbar_std`` (sample std over chips, 0 for one chip),
        ``acc_xbar_min``; and the accuracy of each chip. Without random effects every
        chip is the nominal one, so it is evaluated once.
    """
    set_mode(model, "ideal")
    software = accuracy(model, loader, num_classes, device)
    set_mode(model, "nominal")
    nominal = accuracy(model, loader, num_classes, device)
    per_chip = []
    for i in range(n_chips):
        chip = make_chip(chip_seed + i)
        if chip is None:
            per_chip = [nominal] * n_chips
            break
        set_mode(model, "chip", chip)
        per_chip.append(accuracy(model, loader, num_classes, device))
    set_mode(model, "ideal")
    t = torch.tensor(per_chip, dtype=torch.float64)
    metrics = {
        f"{prefix}acc_software": software,
        f"{prefix}acc_xbar_nominal": nominal,
        f"{prefix}acc_xbar_mean": float(t.mean()),
        f"{prefix}acc_xbar_std": float(t.std()) if len(per_chip) > 1 else 0.0,
        f"{prefix}acc_xbar_min": float(t.min()),
    }
    return metrics, per_chip
