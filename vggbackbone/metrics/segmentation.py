"""Semantic-segmentation metrics from a confusion matrix (plain PyTorch, no Lightning).

Everything is derived from one ``(K, K)`` integer confusion matrix (rows = ground truth,
columns = prediction, ``ignore_index`` pixels left out). Confusion matrices are additive, so a
dataset split over batches or processes is scored by summing their matrices first
(:meth:`ConfusionMatrix.sync` does it with ``torch.distributed``); averaging per-batch IoUs
would be wrong.

* IoU of class k = ``TP / (TP + FP + FN)``; a class absent from both the ground truth and the
  predictions has no IoU (NaN) and is left out of the mean, as in mmseg and the VOC devkit;
* pixel accuracy = ``trace / total``; class accuracy = ``TP / (TP + FN)``; mean accuracy over
  classes that occur in the ground truth.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["ConfusionMatrix", "SegmentationScores", "confusion_matrix", "segmentation_scores"]


def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int, ignore_index: int | None = 255) -> Tensor:
    """``(K, K)`` int64 counts of (ground truth, prediction) pairs.

    Args:
        pred: predicted class indices, any shape (e.g. ``(N, H, W)``), values in ``[0, K)``.
        target: ground-truth indices of the same shape; ``ignore_index`` pixels are skipped.
        num_classes: ``K``.
        ignore_index: label to skip (``None``: none).

    Raises ``ValueError`` for shape mismatches or labels outside ``[0, K)`` (other than ignore).
    """
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
    pred, target = pred.reshape(-1).long(), target.reshape(-1).long()
    if ignore_index is not None:
        keep = target != ignore_index
        pred, target = pred[keep], target[keep]
    for name, t in (("target", target), ("prediction", pred)):
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_classes):
            bad = torch.unique(t[(t < 0) | (t >= num_classes)])[:10].tolist()
            raise ValueError(f"{name} has labels {bad} outside [0, {num_classes}) (ignore_index={ignore_index})")
    return torch.bincount(target * num_classes + pred, minlength=num_classes**2).reshape(num_classes, num_classes)


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


class ConfusionMatrix:
    """Accumulates a confusion matrix over batches (and processes, with :meth:`sync`).

    >>> cm = ConfusionMatrix(num_classes=21)
    >>> cm.update(logits.argmax(1), masks)   # (N, H, W) each, any number of times
    >>> cm.sync()                            # sum over torch.distributed ranks, if any
    >>> cm.compute().miou
    """

    def __init__(self, num_classes: int, ignore_index: int | None = 255) -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def reset(self) -> None:
        self.matrix.zero_()

    def update(self, pred: Tensor, target: Tensor) -> None:
        """Add ``pred``/``target`` class-index maps of the same shape."""
        conf = confusion_matrix(pred, target, self.num_classes, self.ignore_index)
        self.matrix += conf.to(self.matrix.device)

    def sync(self) -> None:
        """Sum the matrices of every ``torch.distributed`` rank (a collective: call it on all ranks)."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            matrix = self.matrix.cuda() if dist.get_backend() == "nccl" else self.matrix
            dist.all_reduce(matrix, op=dist.ReduceOp.SUM)
            self.matrix.copy_(matrix)

    def compute(self) -> SegmentationScores:
        return segmentation_scores(self.matrix)
