"""COCO instances files: the image folder of a set, the categories, and detection records.

* :func:`find_coco_images`: ``images/<set>/``, ``<set>/`` (COCO 2017) or ``images/``;
* :func:`read_coco_categories`: the ``categories`` of an instances JSON, sorted by id (the one
  reader of COCO class names, for detection and segmentation);
* :func:`read_coco`: an instances JSON read with pycocotools into a
  :class:`~tasks.data.records.DetectionSplit`. Category ids (COCO's go 1..90 with holes) map to
  contiguous labels 1..K; 0 is background. ``iscrowd`` boxes are not trained on and are ignored
  by the evaluation, as COCOeval does.
"""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from tasks.data.records import DetectionRecord, DetectionSplit, clean_boxes, warn_boxes

__all__ = ["find_coco_images", "read_coco", "read_coco_categories"]


def read_coco_categories(ann_file: str | Path) -> list[dict[str, Any]]:
    """``categories`` of the COCO JSON ``ann_file``, sorted by ``id``.

    Raises ``FileNotFoundError``/``ValueError`` naming the file when it is missing, not JSON, or
    lists no categories.
    """
    ann_file = Path(ann_file)
    if not ann_file.is_file():
        raise FileNotFoundError(f"{ann_file}: COCO annotation file not found")
    try:
        data = json.loads(ann_file.read_text())
        cats = data.get("categories") or []
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise ValueError(f"{ann_file}: cannot read the categories ({e})") from e
    if not cats:
        raise ValueError(f"{ann_file}: no categories listed")
    return sorted(cats, key=lambda c: c["id"])


def find_coco_images(root: Path, set_name: str) -> Path:
    """The image folder of a COCO set: ``images/<set>/``, ``<set>/`` (COCO 2017) or ``images/``."""
    for cand in (root / "images" / set_name, root / set_name, root / "images"):
        if cand.is_dir():
            return cand
    raise FileNotFoundError(
        f"{root}: no image folder for set {set_name!r} (looked for images/{set_name}/ and {set_name}/)"
    )


def read_coco(ann_file: str | Path, image_dir: str | Path) -> DetectionSplit:
    """Read a COCO instances JSON with pycocotools; boxes ``xywh`` become ``xyxy``.

    Raises ``FileNotFoundError``/``ValueError`` naming ``ann_file`` when it is missing, empty,
    not JSON, has no images or categories, or an annotation names an unknown category.
    """
    from pycocotools.coco import COCO

    ann_file, image_dir = Path(ann_file), Path(image_dir)
    if not ann_file.is_file():
        raise FileNotFoundError(f"{ann_file}: annotation file not found")
    if ann_file.stat().st_size == 0:
        raise ValueError(f"{ann_file}: annotation file is empty")
    try:
        data = json.loads(ann_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{ann_file}: not valid JSON ({e})") from e
    if not isinstance(data, dict) or not data.get("images"):
        raise ValueError(f"{ann_file}: no images listed (a COCO file needs 'images', 'annotations', 'categories')")
    if not data.get("categories"):
        raise ValueError(f"{ann_file}: no categories listed")
    data.setdefault("annotations", [])
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco.createIndex()
    cat_ids = sorted(coco.getCatIds())
    label_of = {cid: i + 1 for i, cid in enumerate(cat_ids)}
    classes = [coco.cats[c]["name"] for c in cat_ids]
    records: list[DetectionRecord] = []
    dropped: list[str] = []
    clipped_count = 0
    orphans = [a["id"] for a in data["annotations"] if a.get("image_id") not in coco.imgs]
    if orphans:
        warnings.warn(
            f"{ann_file}: ignored {len(orphans)} annotation(s) of images not listed: ids {orphans[:5]}", stacklevel=2
        )
    for img_id in sorted(coco.imgs):
        info = coco.imgs[img_id]
        anns = coco.imgToAnns.get(img_id, [])
        unknown = [a["id"] for a in anns if a.get("category_id") not in label_of]
        if unknown:
            raise ValueError(
                f"{ann_file}: annotation(s) {unknown[:5]} of image {img_id} have a category_id not in 'categories'"
            )
        boxes = np.array([a.get("bbox", [np.nan] * 4) for a in anns], np.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        w, h = int(info.get("width", 0) or 0), int(info.get("height", 0) or 0)
        if w <= 0 or h <= 0:
            raise ValueError(f"{ann_file}: image {img_id} ({info.get('file_name')}) has no valid width/height")
        cboxes, keep = clean_boxes(boxes, w, h)
        clipped_count += int(((cboxes != boxes).any(1) & keep).sum())
        dropped += [f"ann {a['id']} of image {img_id} {a.get('bbox')}" for a, k in zip(anns, keep) if not k]
        kept = [a for a, k in zip(anns, keep) if k]
        area = np.array([a.get("area") or 0.0 for a in kept], np.float32)
        box_area = (cboxes[keep, 2] - cboxes[keep, 0]) * (cboxes[keep, 3] - cboxes[keep, 1])
        area = np.where(area > 0, area, box_area).astype(np.float32)
        records.append(
            DetectionRecord(
                image_id=int(img_id),
                path=image_dir / info["file_name"],
                width=w,
                height=h,
                boxes=cboxes[keep].astype(np.float32),
                labels=np.array([label_of[a["category_id"]] for a in kept], np.int64),
                ignore=np.array([bool(a.get("iscrowd", 0)) for a in kept], bool),
                area=area,
            )
        )
    warn_boxes(str(ann_file), dropped, clipped_count)
    return DetectionSplit(records, classes, cat_ids, str(ann_file), "coco", len(dropped), clipped_count)
