"""faster-coco-eval gives pycocotools' numbers: the 12 COCO stats and per-class APs on varied cases."""

from __future__ import annotations

import numpy as np
import pytest

from vggbackbone.metrics import COCO_STATS, coco_backend, coco_evaluate

pytest.importorskip("pycocotools")
pytest.importorskip("faster_coco_eval")


def make_case(
    seed: int,
    n_images: int = 40,
    n_classes: int = 12,
    crowd_rate: float = 0.1,
    empty_rate: float = 0.15,
    no_det_rate: float = 0.15,
    max_gt: int = 8,
    max_det: int = 30,
) -> tuple[dict, list[dict]]:
    """Ground truth with small/medium/large boxes (areas 32^2 / 96^2 split), crowd boxes, empty
    images; detections jittered from the objects plus false positives, some images without any,
    and up to ``max_det`` per image (more than maxDets=10 and 1, fewer or more than 100)."""
    rng = np.random.default_rng(seed)
    images, anns, dets = [], [], []
    cats = [{"id": 3 * c + 1, "name": f"class{c}"} for c in range(n_classes)]  # non-contiguous ids
    for i in range(n_images):
        w, h = int(rng.integers(200, 640)), int(rng.integers(200, 640))
        images.append({"id": 100 + i, "width": w, "height": h, "file_name": f"{i}.jpg"})
        objs = [] if rng.random() < empty_rate else range(int(rng.integers(1, max_gt + 1)))
        for _ in objs:
            side = float(rng.choice([rng.uniform(4, 31), rng.uniform(33, 95), rng.uniform(97, 190)]))
            bw, bh = side * rng.uniform(0.6, 1.4), side * rng.uniform(0.6, 1.4)
            x, y = rng.uniform(0, max(w - bw, 1)), rng.uniform(0, max(h - bh, 1))
            cat = cats[int(rng.integers(n_classes))]["id"]
            crowd = int(rng.random() < crowd_rate)
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": 100 + i,
                    "category_id": cat,
                    "bbox": [x, y, bw, bh],
                    "area": bw * bh * rng.uniform(0.7, 1.0),  # segment-like area, not the box's
                    "iscrowd": crowd,
                }
            )
            if rng.random() < 0.8:  # a detection near the object
                j = rng.normal(0, 0.15 * side, 4)
                dets.append(
                    {
                        "image_id": 100 + i,
                        "category_id": cat if rng.random() < 0.85 else cats[int(rng.integers(n_classes))]["id"],
                        "bbox": [x + j[0], y + j[1], max(bw + j[2], 1.0), max(bh + j[3], 1.0)],
                        "score": float(rng.uniform(0.05, 1.0)),
                    }
                )
        if rng.random() < no_det_rate:
            dets = [d for d in dets if d["image_id"] != 100 + i]
            continue
        for _ in range(int(rng.integers(0, max_det))):  # false positives
            side = float(rng.uniform(4, 200))
            dets.append(
                {
                    "image_id": 100 + i,
                    "category_id": cats[int(rng.integers(n_classes))]["id"],
                    "bbox": [rng.uniform(0, w - 4), rng.uniform(0, h - 4), side, side * rng.uniform(0.5, 2)],
                    "score": float(rng.uniform(0.0, 0.6)),
                }
            )
    gt = {"images": images, "annotations": anns, "categories": cats}
    return gt, dets


CASES = {
    "varied": dict(seed=0),
    "many_classes_many_dets": dict(seed=1, n_classes=40, max_gt=20, max_det=150),
    "crowd_heavy": dict(seed=2, crowd_rate=0.5),
    "mostly_empty": dict(seed=3, empty_rate=0.7, no_det_rate=0.5),
    "one_class": dict(seed=4, n_classes=1, max_gt=3),
}


@pytest.mark.parametrize("case", list(CASES))
def test_faster_coco_eval_equals_pycocotools(case: str) -> None:
    gt, dets = make_case(**CASES[case])
    ref = coco_evaluate(gt, dets, per_class=True, backend="pycocotools")
    fast = coco_evaluate(gt, dets, per_class=True, backend="faster_coco_eval")
    assert list(fast) == list(ref)
    assert len(ref) == len(COCO_STATS) + len(gt["categories"])
    for k in ref:
        assert fast[k] == pytest.approx(ref[k], abs=1e-12), k
    # the cases exercise what they claim: several area ranges, some maxDets effects, real APs
    assert min(ref[k] for k in ("APs", "APm", "APl")) > 0.0
    assert ref["AR1"] < ref["AR10"] <= ref["AR100"]
    assert 0.0 < ref["AP"] < 1.0


def test_subset_of_images_and_no_results() -> None:
    gt, dets = make_case(seed=5)
    ids = [im["id"] for im in gt["images"][::3]]
    for results in (dets, []):
        ref = coco_evaluate(gt, results, ids, per_class=True, backend="pycocotools")
        fast = coco_evaluate(gt, results, ids, per_class=True, backend="faster_coco_eval")
        assert list(fast) == list(ref)
        for k in ref:
            assert fast[k] == pytest.approx(ref[k], abs=1e-12), k
    assert all(ref[k] in (0.0, -1.0) for k in COCO_STATS)  # no results: zero (or -1 without such objects)


def test_known_answer_on_both_backends() -> None:
    # One image, two objects; one exact detection and one false positive on a third spot: every
    # object of class "a" found at rank 1 (AP 1), class "b" missed (AP 0) -> AP 0.5.
    gt = {
        "images": [{"id": 1, "width": 100, "height": 100}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 50, 50], "area": 2500, "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 2, "bbox": [60, 60, 30, 30], "area": 900, "iscrowd": 0},
        ],
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
    }
    dets = [
        {"image_id": 1, "category_id": 1, "bbox": [10, 10, 50, 50], "score": 0.9},
        {"image_id": 1, "category_id": 2, "bbox": [0, 0, 10, 10], "score": 0.8},
    ]
    for backend in ("pycocotools", "faster_coco_eval"):
        out = coco_evaluate(gt, dets, per_class=True, backend=backend)
        assert out["AP"] == pytest.approx(0.5, abs=1e-12) and out["AP/a"] == pytest.approx(1.0, abs=1e-12), backend
        assert out["AP/b"] == 0.0, backend
        # "a" (area 2500) is medium, "b" (900 < 32^2) small; no large objects
        assert out["APs"] == 0.0 and out["APm"] == pytest.approx(1.0, abs=1e-12) and out["APl"] == -1.0, backend


def test_backend_choice(monkeypatch) -> None:
    assert coco_backend("auto") == "faster_coco_eval"
    assert coco_backend("pycocotools") == "pycocotools"
    with pytest.raises(ValueError, match="backend must be"):
        coco_backend("cocoapi")  # type: ignore[arg-type]
    import sys

    monkeypatch.setitem(sys.modules, "faster_coco_eval", None)  # as if not installed
    assert coco_backend("auto") == "pycocotools"
    with pytest.raises(ImportError, match="pip install faster-coco-eval"):
        coco_backend("faster_coco_eval")


def test_coco_evaluate_restores_the_garbage_collector_state() -> None:
    """The cyclic collector is paused during evaluation only: its state comes back, errors included."""
    import gc

    gt = {
        "images": [{"id": 1, "width": 10, "height": 10}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 5, 5], "area": 25, "iscrowd": 0}],
        "categories": [{"id": 1, "name": "a"}],
    }
    dets = [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 5, 5], "score": 0.9}]
    was = gc.isenabled()
    try:
        for backend in ("pycocotools", "faster_coco_eval"):
            gc.enable()
            assert coco_evaluate(gt, dets, backend=backend)["AP"] == pytest.approx(1.0)
            assert gc.isenabled()
            with pytest.raises(Exception):  # noqa: B017 (each backend raises its own error for a result on no image)
                coco_evaluate(gt, [{**dets[0], "image_id": 7}], backend=backend)
            assert gc.isenabled()
            gc.disable()
            coco_evaluate(gt, dets, backend=backend)
            assert not gc.isenabled()
    finally:
        (gc.enable if was else gc.disable)()
