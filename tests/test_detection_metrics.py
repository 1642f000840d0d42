"""COCO and VOC detection metrics against answers worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from vggbackbone.metrics import coco_evaluate, detections_to_coco, voc_ap, voc_evaluate


def _gt_dict(images: dict[int, tuple[list[list[float]], list[int]]], num_classes: int = 2) -> dict:
    anns = []
    for iid, (boxes, labels) in images.items():
        for (x0, y0, x1, y1), lab in zip(boxes, labels):
            anns.append({"id": len(anns) + 1, "image_id": iid, "category_id": lab, "bbox": [x0, y0, x1 - x0, y1 - y0],
                         "area": (x1 - x0) * (y1 - y0), "iscrowd": 0})  # fmt: skip
    return {
        "images": [{"id": i, "width": 200, "height": 200, "file_name": f"{i}.jpg"} for i in images],
        "annotations": anns,
        "categories": [{"id": c, "name": f"c{c}"} for c in range(1, num_classes + 1)],
    }


GT = {
    1: ([[10, 10, 60, 60], [100, 100, 180, 190]], [1, 2]),
    2: ([[20, 30, 90, 80]], [1]),
    3: ([[5, 5, 40, 40], [50, 50, 150, 150], [150, 10, 195, 60]], [2, 2, 1]),
}


def _perfect() -> dict[int, dict[str, np.ndarray]]:
    return {
        i: {"boxes": np.array(b, np.float32), "scores": np.linspace(0.9, 0.8, len(b)), "labels": np.array(lab)}
        for i, (b, lab) in GT.items()
    }


def test_perfect_predictions_give_ap_one() -> None:
    gt = _gt_dict(GT)
    stats = coco_evaluate(gt, detections_to_coco(_perfect(), [1, 2]), per_class=True)
    for k in ("AP", "AP50", "AP75", "AR100", "AP/c1", "AP/c2"):
        assert stats[k] == pytest.approx(1.0), k
    gt_voc = {i: {"boxes": np.array(b), "labels": np.array(lab)} for i, (b, lab) in GT.items()}
    voc = voc_evaluate(gt_voc, _perfect(), 2)
    assert voc["mAP_07"] == pytest.approx(1.0) and voc["mAP"] == pytest.approx(1.0)


def _one(boxes: list[list[float]], scores: list[float], labels: list[int] | None = None) -> dict:
    return {
        "boxes": np.array(boxes, np.float32),
        "scores": np.array(scores),
        "labels": np.array(labels or [1] * len(boxes)),
    }


def test_coco_false_positive_ranked_first_gives_ap_half() -> None:
    """One object; FP (0.9) then the exact box (0.8): precision 1/2 at recall 1 at every IoU threshold.

    COCO's interpolated precision at each of the 101 recall points is the best precision at that
    recall or beyond, 1/2 everywhere, so AP = AP50 = AP75 = 0.5 exactly; recall is 1.
    """
    gt = _gt_dict({1: ([[10, 10, 60, 60]], [1])}, num_classes=1)
    preds = {1: _one([[100, 100, 150, 150], [10, 10, 60, 60]], [0.9, 0.8])}
    stats = coco_evaluate(gt, detections_to_coco(preds, [1]))
    assert (stats["AP"], stats["AP50"], stats["AP75"], stats["AR100"]) == pytest.approx((0.5, 0.5, 0.5, 1.0))
    # ranked the other way round it is a perfect detector again
    preds[1]["scores"] = np.array([0.8, 0.9])
    assert coco_evaluate(gt, detections_to_coco(preds, [1]))["AP"] == pytest.approx(1.0)


def test_coco_iou_thresholds_by_hand() -> None:
    """A box with IoU 0.625 with its object matches at IoU .50, .55, .60 only: AP = 3/10, AP75 = 0."""
    gt = _gt_dict({1: ([[0, 0, 100, 100]], [1])}, num_classes=1)
    stats = coco_evaluate(gt, detections_to_coco({1: _one([[0, 0, 62.5, 100]], [0.9])}, [1]))
    assert stats["AP50"] == pytest.approx(1.0) and stats["AP75"] == 0.0
    assert stats["AP"] == pytest.approx(3 / 10) and stats["AR100"] == pytest.approx(3 / 10)


def test_wrong_class_scores_zero_for_both_classes() -> None:
    """Exact boxes, swapped labels: no true positive anywhere (COCO AP 0, VOC AP 0)."""
    gt = _gt_dict({1: ([[10, 10, 60, 60], [100, 100, 180, 190]], [1, 2])})
    preds = {1: _one([[10, 10, 60, 60], [100, 100, 180, 190]], [0.9, 0.8], [2, 1])}
    stats = coco_evaluate(gt, detections_to_coco(preds, [1, 2]), per_class=True)
    assert (stats["AP"], stats["AP/c1"], stats["AP/c2"], stats["AR100"]) == (0.0, 0.0, 0.0, 0.0)
    gt_voc = {1: {"boxes": np.array([[10, 10, 60, 60], [100, 100, 180, 190]]), "labels": np.array([1, 2])}}
    assert voc_evaluate(gt_voc, preds, 2)["mAP"] == 0.0


def test_coco_known_answer_half_recall() -> None:
    """Two objects, one found exactly: precision 1 up to recall 0.5 -> 51 of COCO's 101 recall points."""
    gt = _gt_dict({1: ([[10, 10, 60, 60]], [1]), 2: ([[20, 20, 90, 90]], [1])}, num_classes=1)
    res = detections_to_coco({1: {"boxes": [[10, 10, 60, 60]], "scores": [0.9], "labels": [1]}}, [1])
    stats = coco_evaluate(gt, res)
    assert stats["AP50"] == pytest.approx(51 / 101)
    assert stats["AR100"] == pytest.approx(0.5)
    none = coco_evaluate(gt, [])
    assert none["AP"] == 0.0 and none["AR100"] == 0.0


def test_coco_evaluates_only_the_listed_images() -> None:
    gt = _gt_dict(GT)
    preds = {1: _perfect()[1]}
    assert coco_evaluate(gt, detections_to_coco(preds, [1, 2]), image_ids=[1])["AP"] == pytest.approx(1.0)
    # over every image: image 1's two objects are 1 of 3 per class; precision 1 up to recall 1/3,
    # i.e. 34 of the 101 recall points (0, .01, ..., .33), for both classes
    whole = coco_evaluate(gt, detections_to_coco(preds, [1, 2]))
    assert whole["AR100"] == pytest.approx(1 / 3) and whole["AP"] == pytest.approx(34 / 101)


def test_voc_known_answer_and_difficult_objects() -> None:
    """TP(0.9), FP(0.8), TP(0.7) on 2 objects: recall .5 .5 1, precision 1 .5 .667.

    Area AP = .5 * 1 + .5 * 2/3; 11-point AP = (6 * 1 + 5 * 2/3) / 11.
    """
    gt = {1: {"boxes": np.array([[0, 0, 10, 10], [20, 20, 30, 30], [50, 50, 60, 60]]), "labels": np.array([1, 1, 1]),
              "ignore": np.array([False, False, True])}}  # fmt: skip
    preds = {1: {"boxes": np.array([[0, 0, 10, 10], [80, 80, 90, 90], [20, 20, 30, 30]]),
                 "scores": np.array([0.9, 0.8, 0.7]), "labels": np.array([1, 1, 1])}}  # fmt: skip
    out = voc_evaluate(gt, preds, 1, class_names=["thing"])
    assert out["AP"]["thing"] == pytest.approx(0.5 + 0.5 * 2 / 3)
    assert out["mAP_07"] == pytest.approx((6 + 5 * 2 / 3) / 11)
    # a confident detection on the difficult object is neither a true nor a false positive
    on_difficult = {"boxes": [50, 50, 60, 60], "scores": 0.95, "labels": 1}
    with_difficult = {1: {k: np.concatenate([[on_difficult[k]], v]) for k, v in preds[1].items()}}
    assert voc_evaluate(gt, with_difficult, 1)["mAP"] == pytest.approx(out["mAP"])
    # a duplicate (0.85) of a found object is a false positive: TP, FP, FP, TP -> recall .5 .5 .5 1,
    # precision 1 .5 .333 .5; area AP = .5 * 1 + .5 * .5, 11-point AP = (6 * 1 + 5 * .5) / 11
    dup = {1: {"boxes": np.array([[0, 0, 10, 10], [0, 0, 10, 10], [80, 80, 90, 90], [20, 20, 30, 30]]),
               "scores": np.array([0.9, 0.85, 0.8, 0.7]), "labels": np.array([1, 1, 1, 1])}}  # fmt: skip
    out_dup = voc_evaluate(gt, dup, 1)
    assert out_dup["mAP"] == pytest.approx(0.75) and out_dup["mAP_07"] == pytest.approx((6 + 2.5) / 11)


def test_voc_ap_interpolations() -> None:
    rec, prec = np.array([0.2, 0.4, 0.4, 1.0]), np.array([1.0, 1.0, 0.5, 0.4])
    assert voc_ap(rec, prec) == pytest.approx(0.4 * 1.0 + 0.6 * 0.4)
    assert voc_ap(rec, prec, use_07_metric=True) == pytest.approx((5 * 1.0 + 6 * 0.4) / 11)
