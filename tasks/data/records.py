"""Detection records: what every detection reader (COCO, VOC) produces, and box hygiene.

* :class:`DetectionRecord`: one image and its boxes (0-based continuous ``xyxy`` pixels);
* :class:`DetectionSplit`: the records of a set, its class names and COCO category ids;
* :func:`clean_boxes` / :func:`warn_boxes`: clip boxes to the image, drop degenerate ones, one
  counted warning per file.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

__all__ = ["DetectionRecord", "DetectionSplit", "check_has_boxes", "clean_boxes", "warn_boxes"]


@dataclass
class DetectionRecord:
    """One image and its boxes, in 0-based continuous ``xyxy`` pixel coordinates.

    ``ignore`` marks boxes that are neither trained on nor counted by the evaluation
    (COCO ``iscrowd``, VOC ``difficult``); ``area`` is COCO's (mask) area when the file gives
    it, else the box area (COCOeval's small/medium/large split uses it).
    """

    image_id: int
    path: Path
    width: int
    height: int
    boxes: np.ndarray  # (K, 4) float32
    labels: np.ndarray  # (K,) int64, 1..num_classes
    ignore: np.ndarray  # (K,) bool
    area: np.ndarray  # (K,) float32


@dataclass
class DetectionSplit:
    """Everything a reader found: records, class names and the COCO category id of each label."""

    records: list[DetectionRecord]
    classes: list[str]
    category_ids: list[int]  # category_ids[label - 1] is the COCO category id of that label
    source: str
    layout: Literal["coco", "voc", "yolo"]
    dropped_boxes: int = 0
    clipped_boxes: int = 0

    def coco_gt(self, image_ids: Sequence[int] | None = None) -> dict[str, Any]:
        """The split as a COCO ground-truth dict (for ``pycocotools.coco.COCO``), cleaned boxes only.

        ``ignore`` boxes become ``iscrowd=1``: COCOeval then neither rewards nor penalises
        detections on them (for VOC ``difficult`` this is the closest COCOeval has).
        """
        keep = None if image_ids is None else set(int(i) for i in image_ids)
        images, anns = [], []
        for r in self.records:
            if keep is not None and r.image_id not in keep:
                continue
            images.append({"id": r.image_id, "file_name": r.path.name, "width": r.width, "height": r.height})
            for b, lab, ign, area in zip(r.boxes, r.labels, r.ignore, r.area):
                x0, y0, x1, y1 = (float(v) for v in b)
                anns.append(
                    {
                        "id": len(anns) + 1,
                        "image_id": r.image_id,
                        "category_id": self.category_ids[int(lab) - 1],
                        "bbox": [x0, y0, x1 - x0, y1 - y0],
                        "area": float(area),
                        "iscrowd": int(ign),
                    }
                )
        cats = [{"id": cid, "name": name} for cid, name in zip(self.category_ids, self.classes)]
        return {"images": images, "annotations": anns, "categories": cats}

    def relabelled(self, index: Sequence[int], classes: Sequence[str], category_ids: Sequence[int]) -> DetectionSplit:
        """The same boxes with label ``k`` (1-based) turned into ``index[k - 1] + 1``, and ``classes``/``category_ids``
        in that new label order (a :class:`tasks.classes.ClassMap` applied: the model's labels, by name)."""
        table = np.concatenate([[0], np.asarray(index, np.int64) + 1])
        records = [replace(r, labels=table[r.labels] if r.labels.size else r.labels) for r in self.records]
        return replace(self, records=records, classes=list(classes), category_ids=[int(i) for i in category_ids])

    @property
    def format(self) -> str:
        """The old name of :attr:`layout`."""
        return self.layout


# ---------------------------------------------------------------------------- box hygiene
def clean_boxes(boxes: np.ndarray, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """Clip ``(K, 4)`` xyxy boxes to the image; return ``(clipped, keep)``, keep = at least 1 px each side."""
    clipped = boxes.copy()
    clipped[:, 0::2] = clipped[:, 0::2].clip(0, width)
    clipped[:, 1::2] = clipped[:, 1::2].clip(0, height)
    keep = ((clipped[:, 2] - clipped[:, 0]) >= 1) & ((clipped[:, 3] - clipped[:, 1]) >= 1) & np.isfinite(boxes).all(1)
    return clipped, keep


def check_has_boxes(split: DetectionSplit, stage: str) -> None:
    """Refuse a split to train on or evaluate (``stage``) that has no box: an empty ``annotations``
    list would train on nothing and publish AP -1; all boxes dropped (degenerate or outside
    their image) would train on background only. The error names the file and the drop count."""
    if any(len(r.boxes) for r in split.records):
        return
    use = "train on" if stage == "train" else "evaluate"
    if split.dropped_boxes:
        raise ValueError(
            f"{split.source}: the {stage} split has no usable box: all {split.dropped_boxes} were dropped as "
            f"degenerate or outside their image (listed in the warning above); nothing to {use}"
        )
    raise ValueError(
        f"{split.source}: the {stage} split has no annotations ({len(split.records)} image(s), no box): nothing to "
        f"{use}{' (COCO AP would be -1)' if stage != 'train' else ''}; predict needs no annotations"
    )


def warn_boxes(source: str, dropped: list[str], clipped: int) -> None:
    if dropped:
        listed = ", ".join(dropped[:5]) + (f" and {len(dropped) - 5} more" if len(dropped) > 5 else "")
        warnings.warn(f"{source}: dropped {len(dropped)} degenerate or out-of-image box(es): {listed}", stacklevel=3)
    if clipped:
        warnings.warn(f"{source}: clipped {clipped} box(es) that crossed the image border", stacklevel=3)
