"""Segmentation scores against hand-computed answers (the matrix itself is torchmetrics')."""

from __future__ import annotations

import math

import pytest
import torch
from torchmetrics.classification import MulticlassConfusionMatrix

from vggbackbone.metrics import segmentation_scores

# 3 classes, one ignored pixel (255). Ground truth / prediction, pixel by pixel:
TARGET = torch.tensor([[0, 0, 0, 1], [1, 1, 2, 255]])
PRED = torch.tensor([[0, 0, 1, 1], [1, 2, 2, 0]])
# counted pairs (gt, pred): (0,0) x2, (0,1) x1, (1,1) x2, (1,2) x1, (2,2) x1; the 255 pixel is skipped
HAND = torch.tensor([[2, 1, 0], [0, 2, 1], [0, 0, 1]])


def _confmat(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """What the segmentation task accumulates: torchmetrics' matrix (rows = ground truth)."""
    tm = MulticlassConfusionMatrix(num_classes, ignore_index=255)
    tm.update(pred, target)
    return tm.compute()


def test_confusion_matrix_by_hand() -> None:
    assert torch.equal(_confmat(PRED, TARGET, 3), HAND)


def test_scores_by_hand() -> None:
    s = segmentation_scores(HAND)
    # IoU = TP / (TP + FP + FN): class 0: 2/(2+0+1), class 1: 2/(2+1+1), class 2: 1/(1+1+0)
    iou = [2 / 3, 2 / 4, 1 / 2]
    assert s.iou.tolist() == pytest.approx(iou)
    assert s.miou == pytest.approx(sum(iou) / 3)
    assert s.pixel_acc == pytest.approx(5 / 7)
    assert s.acc.tolist() == pytest.approx([2 / 3, 2 / 3, 1.0])
    assert s.mean_acc == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)
    d = s.as_dict(["bg", "a", "b"], prefix="val/")
    assert d["val/IoU/a"] == pytest.approx(0.5) and d["val/mIoU"] == pytest.approx(s.miou)


def test_absent_class_is_left_out_of_the_means() -> None:
    conf = torch.tensor([[3, 0, 0], [1, 2, 0], [0, 0, 0]])  # class 2 never occurs nor is predicted
    s = segmentation_scores(conf)
    assert math.isnan(s.iou[2]) and math.isnan(s.acc[2])
    assert s.miou == pytest.approx((3 / 4 + 2 / 3) / 2)
    # predicted but absent from the ground truth: IoU 0 (counted), accuracy undefined
    s2 = segmentation_scores(torch.tensor([[3, 0, 1], [0, 2, 0], [0, 0, 0]]))
    assert s2.iou[2] == 0 and math.isnan(s2.acc[2])
    assert s2.miou == pytest.approx((3 / 4 + 1 + 0) / 3)


def test_accumulating_batches_equals_whole_set() -> None:
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 4, (6, 9, 11), generator=g)
    target[:, 0] = 255
    pred = torch.randint(0, 4, (6, 9, 11), generator=g)
    tm = MulticlassConfusionMatrix(4, ignore_index=255)
    for i in range(0, 6, 4):  # uneven batches
        tm.update(pred[i : i + 4], target[i : i + 4])
    kept = target != 255
    by_count = torch.bincount(target[kept] * 4 + pred[kept], minlength=16).reshape(4, 4)
    assert torch.equal(tm.compute(), by_count)
    assert segmentation_scores(tm.compute()).pixel_acc == pytest.approx(float((pred == target)[kept].double().mean()))
