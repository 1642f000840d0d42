"""COCO instances files: the image folder of a set, the categories, and detection records.

* :func:`find_coco_images`: ``images/<set>/``, ``<set>/`` (COCO 2017) or ``images/``;
* :func:`read_coco_categories`: the ``categories`` of an instances JSON, sorted by id (the one
  reader of COCO class names, for detection and segmentation);
* :func:`load_coco_json`: an instances JSON read and checked (the one reader of COCO files, for
  detection and segmentation): duplicate image, annotation or category ids, two categories of
  one name, a missing ``file_name``, sizes or boxes that are not numbers, a ``category_id``
  that is not an integer (a JSON ``true``) are refused with an error naming the file and the ids;
* :func:`read_coco`: an instances JSON read with pycocotools into a
  :class:`~tasks.data.records.DetectionSplit`. Category ids (COCO's go 1..90 with holes) map to
  contiguous labels 1..K; 0 is background. ``iscrowd`` boxes are not trained on and are ignored
  by the evaluation, as COCOeval does.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import warnings
from collections import Counter
from numbers import Real
from pathlib import Path
from typing import Any

import numpy as np

from tasks.data.records import DetectionRecord, DetectionSplit, clean_boxes, warn_boxes

__all__ = ["check_categories", "find_coco_images", "load_coco_json", "read_coco", "read_coco_categories"]


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
    check_categories(ann_file, cats)
    return sorted(cats, key=lambda c: c["id"])


def check_categories(ann_file: str | Path, cats: Any) -> None:
    """Refuse ``categories`` that do not say which class a label is: entries without an integer
    ``id`` or a string ``name``, two categories with one id (pycocotools would keep the last, and
    labels would no longer match the class list), or two with one name (class names map labels
    between a checkpoint and the data, :mod:`tasks.classes`). Errors name ``ann_file``."""
    if not isinstance(cats, list):
        raise ValueError(f"{ann_file}: 'categories' must be a list, got {type(cats).__name__}")
    bad = [
        c for c in cats
        if not isinstance(c, dict) or not _is_int(c.get("id")) or not isinstance(c.get("name"), str) or not c["name"]
    ]  # fmt: skip
    if bad:
        raise ValueError(f"{ann_file}: categories need an integer 'id' and a 'name', got {bad[:3]}")
    dup = _duplicates([c["id"] for c in cats])
    if dup:
        names = [f"{c['id']}: {c['name']!r}" for c in cats if c["id"] in set(dup)]
        raise ValueError(
            f"{ann_file}: category id(s) {_listed(dup)} listed more than once ({', '.join(names[:10])}): "
            "each category needs its own id"
        )
    dup = _duplicates([c["name"] for c in cats])
    if dup:
        ids = [f"{c['name']!r}: {c['id']}" for c in cats if c["name"] in set(dup)]
        raise ValueError(
            f"{ann_file}: category name(s) {_listed(dup)} listed more than once ({', '.join(ids[:10])}): "
            "a class name must say which category it is (merge them into one category)"
        )


def find_coco_images(root: Path, set_name: str) -> Path:
    """The image folder of a COCO set: ``images/<set>/``, ``<set>/`` (COCO 2017) or ``images/``."""
    for cand in (root / "images" / set_name, root / set_name, root / "images"):
        if cand.is_dir():
            return cand
    raise FileNotFoundError(
        f"{root}: no image folder for set {set_name!r} (looked for images/{set_name}/ and {set_name}/)"
    )


def _is_number(v: Any) -> bool:
    return isinstance(v, Real) and not isinstance(v, bool)


def _is_int(v: Any) -> bool:
    """An integer (a JSON ``true`` is not one)."""
    return isinstance(v, int) and not isinstance(v, bool)


def _duplicates(values: list[Any]) -> list[Any]:
    return sorted((v for v, n in Counter(values).items() if n > 1), key=str)


def _listed(values: list[Any]) -> str:
    return f"{values[:10]}" + (f" and {len(values) - 10} more" if len(values) > 10 else "")


def load_coco_json(ann_file: str | Path) -> dict[str, Any]:
    """The COCO instances JSON ``ann_file`` as a dict, checked so that nothing is lost silently.

    Raises ``FileNotFoundError``/``ValueError`` naming ``ann_file`` (and the image or annotation
    id) when the file is missing, empty or not JSON; lists no images or no categories; two
    images or two annotations share an id (pycocotools would let the second overwrite the
    first); an image has no ``file_name`` or a ``width``/``height`` that is not a positive
    number; an annotation has no ``image_id``/``category_id``, or a ``bbox`` that is not 4
    numbers. ``annotations`` defaults to an empty list.
    """
    ann_file = Path(ann_file)
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
    check_categories(ann_file, data["categories"])
    data.setdefault("annotations", [])
    images, anns = data["images"], data["annotations"]
    if not isinstance(images, list) or not isinstance(anns, list):
        raise ValueError(f"{ann_file}: 'images' and 'annotations' must be lists")
    for k, img in enumerate(images):
        if not isinstance(img, dict) or not isinstance(img.get("id"), (int, str)) or isinstance(img.get("id"), bool):
            raise ValueError(f"{ann_file}: images[{k}] has no 'id' (an integer)")
        where = f"{ann_file}: image {img['id']!r}"
        if not isinstance(img.get("file_name"), str) or not img["file_name"]:
            raise ValueError(f"{where} has no 'file_name'")
        for key in ("width", "height"):
            v = img.get(key)
            if not _is_number(v) or not math.isfinite(v) or v < 1:
                raise ValueError(f"{where} ({img['file_name']}): '{key}' must be a positive number, got {v!r}")
    dup = _duplicates([img["id"] for img in images])
    if dup:
        names = [img["file_name"] for img in images if img["id"] in set(dup)]
        raise ValueError(
            f"{ann_file}: duplicate image ids {_listed(dup)} ({_listed(names)}): each image needs its own id "
            "(pycocotools would give the later image the first one's annotations)"
        )
    for k, ann in enumerate(anns):
        if not isinstance(ann, dict) or not isinstance(ann.get("id"), (int, str)) or isinstance(ann.get("id"), bool):
            raise ValueError(f"{ann_file}: annotations[{k}] has no 'id' (an integer)")
        where = f"{ann_file}: annotation {ann['id']!r}"
        for key in ("image_id", "category_id"):
            if key not in ann:
                raise ValueError(f"{where} has no '{key}'")
        if not _is_int(ann["category_id"]):  # a JSON true would be read as category 1
            raise ValueError(f"{where}: 'category_id' must be an integer, got {ann['category_id']!r}")
        if isinstance(ann["image_id"], bool) or not isinstance(ann["image_id"], (int, str)):
            raise ValueError(f"{where}: 'image_id' must be an image's id, got {ann['image_id']!r}")
        box = ann.get("bbox")
        if box is not None and not (isinstance(box, list) and len(box) == 4 and all(_is_number(v) for v in box)):
            raise ValueError(
                f"{where} of image {ann['image_id']!r}: 'bbox' must be 4 numbers [x, y, w, h], got {box!r}"
            )
    dup = _duplicates([ann["id"] for ann in anns])
    if dup:
        raise ValueError(f"{ann_file}: duplicate annotation ids {_listed(dup)}: each annotation needs its own id")
    return data


def read_coco(ann_file: str | Path, image_dir: str | Path) -> DetectionSplit:
    """Read a COCO instances JSON with pycocotools; boxes ``xywh`` become ``xyxy``.

    Raises ``FileNotFoundError``/``ValueError`` naming ``ann_file`` when it is missing, empty,
    not JSON, has no images or categories, fails the checks of :func:`load_coco_json`
    (duplicate ids, missing ``file_name``, boxes that are not 4 numbers...), an image id is not
    an integer, or an annotation names an unknown category.
    """
    from pycocotools.coco import COCO

    ann_file, image_dir = Path(ann_file), Path(image_dir)
    data = load_coco_json(ann_file)
    bad = [img["id"] for img in data["images"] if not isinstance(img["id"], int)]
    if bad:
        raise ValueError(f"{ann_file}: detection needs integer image ids, got {_listed(bad)}")
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
        w, h = int(info["width"]), int(info["height"])  # checked by load_coco_json
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
