"""Semantic-segmentation scores from a confusion matrix (plain PyTorch, no Lightning).

Everything is derived from one ``(K, K)`` integer confusion matrix (rows = ground truth,
columns = prediction, ``ignore_index`` pixels left out), as torchmetrics'
``MulticlassConfusionMatrix(K, ignore_index=255)`` accumulates it over batches and processes
(the segmentation task uses that one). Confusion matrices are additive, so a dataset split over
batches or processes is scored by summing their matrices first; averaging per-batch IoUs would
be wrong.

* IoU of class k = ``TP / (TP + FP + FN)``; a class absent from both the ground truth and the
  predictions has no IoU (NaN) and is left out of the mean, as in mmseg and the VOC devkit;
* pixel accuracy = ``trace / total``; class accuracy = ``TP / (TP + FN)``; mean accuracy over
  classes that occur in the ground truth.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["SegmentationScores", "segmentation_scores"]


@dataclass
class SegmentationScores:
    """Scores of one confusion matrix. ``iou``/``acc`` are ``(K,)`` float64 with NaN for absent classes."""

    miou: float
    pixel_acc: float
    mean_acc: float
    iou: Tensor
    acc: Tensor

    def as_dict(self, class_names: list[str] | None = None, prefix: str = "") -> dict[str, float]:
        """Flat ``{"mIoU", "pixel_acc", "mean_acc", "IoU/<class>"...}`` for loggers and JSON."""
        names = class_names or [str(k) for k in range(len(self.iou))]
        out = {f"{prefix}mIoU": self.miou, f"{prefix}pixel_acc": self.pixel_acc, f"{prefix}mean_acc": self.mean_acc}
        out.update({f"{prefix}IoU/{n}": float(v) for n, v in zip(names, self.iou.tolist())})
        return out


def segmentation_scores(conf: Tensor) -> SegmentationScores:
    """mIoU, per-class IoU, pixel accuracy and mean class accuracy of a ``(K, K)`` confusion matrix."""
    conf = conf.double()
    tp = conf.diag()
    gt = conf.sum(1)  # TP + FN
    predicted = conf.sum(0)  # TP + FP
    union = gt + predicted - tp
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    iou = torch.where(union > 0, tp / union.clamp(min=1), nan)
    acc = torch.where(gt > 0, tp / gt.clamp(min=1), nan)
    total = conf.sum()
    return SegmentationScores(
        miou=float(iou.nanmean()) if (union > 0).any() else float("nan"),
        pixel_acc=float(tp.sum() / total) if total > 0 else float("nan"),
        mean_acc=float(acc.nanmean()) if (gt > 0).any() else float("nan"),
        iou=iou,
        acc=acc,
    )
