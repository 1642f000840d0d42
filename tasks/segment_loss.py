"""The segmentation losses' parts: the Dice/Lovasz term of ``model.loss`` and ``model.class_weights``.

:class:`~tasks.segment.SegmentationTask` adds :func:`aux_loss`'s term to the (class-weighted)
cross-entropy; :func:`check_weights` checks a ``model.class_weights`` list.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from segmentation_models_pytorch.losses import DiceLoss
from torch import Tensor, nn

from tasks.data.masks import IGNORE_INDEX

__all__ = ["WeightedDiceLoss", "aux_loss", "check_weights"]


def check_weights(weights: Any, num_classes: int) -> list[float] | None:
    """``model.class_weights`` checked: ``None``/``median_frequency`` -> ``None`` (nothing known yet), a
    list -> floats, one per class, finite and >= 0, some > 0."""
    if weights is None or weights == "median_frequency":
        return None
    if isinstance(weights, str):
        raise ValueError(f"model.class_weights must be null, a list or median_frequency, got {weights!r}")
    values = np.asarray([float(w) for w in weights], dtype=np.float64)
    if len(values) != num_classes or not np.isfinite(values).all() or (values < 0).any() or not (values > 0).any():
        raise ValueError(
            f"model.class_weights needs {num_classes} finite weights >= 0 (one per class, some > 0), "
            f"got {list(weights)}"
        )
    return values.tolist()


class WeightedDiceLoss(DiceLoss):
    """smp's ``DiceLoss`` whose per-class losses are averaged with ``class_weight`` ``(K,)`` (set by
    the task before each call; ``None``: smp's plain mean). smp takes no class weights."""

    class_weight: Tensor | None = None

    def aggregate_loss(self, loss: Tensor) -> Tensor:
        w = self.class_weight
        return loss.mean() if w is None else (loss * w).sum() / w.sum()


def aux_loss(name: str, ignore_index: int = IGNORE_INDEX) -> nn.Module | None:
    """The term added to the cross-entropy by ``model.loss``: ``ce`` -> ``None``, ``ce+dice`` ->
    :class:`WeightedDiceLoss`, ``ce+lovasz`` -> smp's ``LovaszLoss`` (both ignore ``ignore_index``)."""
    from segmentation_models_pytorch.losses import LovaszLoss

    if name == "ce":
        return None
    if name == "ce+dice":
        return WeightedDiceLoss("multiclass", ignore_index=ignore_index)
    if name == "ce+lovasz":
        return LovaszLoss("multiclass", ignore_index=ignore_index)
    raise ValueError(f"unknown loss {name!r}; choose ce, ce+dice or ce+lovasz")
