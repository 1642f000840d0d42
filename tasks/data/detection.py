"""Detection data: COCO JSON (pycocotools) and PASCAL VOC readers, transforms v2, loaders.

Both readers turn their files into the same :class:`DetectionRecord` list, so training,
evaluation and prediction never care which layout the data came from:

* **COCO**: ``annotations/instances_<set>.json`` + an image folder (``images/<set>/`` or
  ``<set>/``, as the official 2017 release), read with ``pycocotools.coco.COCO``. Category ids
  (COCO's go 1..90 with holes) map to contiguous labels 1..K; 0 is background. ``iscrowd``
  boxes are not trained on and are ignored by the evaluation, as COCOeval does.
* **VOC**: ``VOCdevkit/VOC2007/{Annotations,JPEGImages,ImageSets/Main}``; a set is
  ``trainval`` (VOC2007 by default), ``VOC2012/trainval``, or several joined by ``+``
  (``VOC2007/trainval+VOC2012/trainval``, the "07+12" recipe). VOC's 1-based inclusive pixel
  boxes become 0-based continuous ``[xmin - 1, ymin - 1, xmax, ymax]``. ``difficult`` flags are
  kept: not trained on by default (as the paper's code) and ignored by the evaluation.

Boxes are clipped to the image; boxes that are degenerate or fall outside the image are
dropped with one counted warning per file. Unreadable images are skipped with a counted
warning (:mod:`tasks.images`); everything else that is wrong raises an error naming the file.
"""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from xml.etree import ElementTree as ET

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from tasks.images import (
    IMAGE_EXTENSIONS,
    BadImageError,
    SkippedSample,
    drop_skipped,
    list_images,
    output_names,
    read_image,
    warn_skipped,
)

__all__ = [
    "VOC_CLASSES",
    "DetectionBatch",
    "DetectionDataset",
    "DetectionRecord",
    "DetectionSplit",
    "ImageFolderDataset",
    "collate_detection",
    "detection_transforms",
    "find_coco_images",
    "read_coco",
    "read_voc",
]

#: PASCAL VOC's 20 classes, in the devkit's order (labels 1..20).
VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip

IMAGE_SUFFIXES = IMAGE_EXTENSIONS  # the old name


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
    format: Literal["coco", "voc"]
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


# ---------------------------------------------------------------------------- box hygiene
def _clean_boxes(boxes: np.ndarray, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """Clip ``(K, 4)`` xyxy boxes to the image; return ``(clipped, keep)``, keep = at least 1 px each side."""
    clipped = boxes.copy()
    clipped[:, 0::2] = clipped[:, 0::2].clip(0, width)
    clipped[:, 1::2] = clipped[:, 1::2].clip(0, height)
    keep = ((clipped[:, 2] - clipped[:, 0]) >= 1) & ((clipped[:, 3] - clipped[:, 1]) >= 1) & np.isfinite(boxes).all(1)
    return clipped, keep


def _warn_boxes(source: str, dropped: list[str], clipped: int) -> None:
    if dropped:
        listed = ", ".join(dropped[:5]) + (f" and {len(dropped) - 5} more" if len(dropped) > 5 else "")
        warnings.warn(f"{source}: dropped {len(dropped)} degenerate or out-of-image box(es): {listed}", stacklevel=3)
    if clipped:
        warnings.warn(f"{source}: clipped {clipped} box(es) that crossed the image border", stacklevel=3)


# ---------------------------------------------------------------------------- COCO
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
        cboxes, keep = _clean_boxes(boxes, w, h)
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
    _warn_boxes(str(ann_file), dropped, clipped_count)
    return DetectionSplit(records, classes, cat_ids, str(ann_file), "coco", len(dropped), clipped_count)


# ---------------------------------------------------------------------------- VOC
def _voc_sets(root: Path, spec: str, default_year: str) -> list[tuple[Path, str]]:
    """``"trainval"`` / ``"VOC2012/trainval"`` / ``"a+b"`` -> ``[(VOCdevkit/VOCyyyy, split), ...]``."""
    devkit = root / "VOCdevkit" if (root / "VOCdevkit").is_dir() else root
    out = []
    for part in spec.split("+"):
        year, _, split = part.strip().rpartition("/")
        out.append((devkit / (year or default_year), split))
    return out


def _voc_text(node: ET.Element, tag: str, xml: Path) -> str:
    found = node.find(tag)
    if found is None or found.text is None:
        raise ValueError(f"{xml}: missing <{tag}>")
    return found.text.strip()


def read_voc(
    root: str | Path,
    sets: str,
    classes: Sequence[str] = VOC_CLASSES,
    *,
    default_year: str = "VOC2007",
) -> DetectionSplit:
    """Read PASCAL VOC sets (see the module docstring for ``sets``), keeping ``difficult`` flags.

    Image ids are the file ids as integers when they all are (VOC's ``000005``), else their
    position in the list. Raises errors naming the list or XML file for anything unreadable,
    and for object names not in ``classes``.
    """
    root = Path(root)
    label_of = {name: i + 1 for i, name in enumerate(classes)}
    items: list[tuple[Path, str]] = []
    for year_dir, split in _voc_sets(root, sets, default_year):
        listing = year_dir / "ImageSets" / "Main" / f"{split}.txt"
        if not listing.is_file():
            raise FileNotFoundError(f"{listing}: VOC image set list not found")
        ids = [line.split()[0] for line in listing.read_text().splitlines() if line.strip()]
        if not ids:
            raise ValueError(f"{listing}: image set list is empty")
        items += [(year_dir, i) for i in ids]
    numeric = all(i.isdigit() for _, i in items) and len({int(i) for _, i in items}) == len(items)
    records: list[DetectionRecord] = []
    dropped: list[str] = []
    clipped_count = 0
    for pos, (year_dir, file_id) in enumerate(items):
        xml = year_dir / "Annotations" / f"{file_id}.xml"
        if not xml.is_file():
            raise FileNotFoundError(f"{xml}: annotation file not found")
        try:
            tree = ET.parse(xml).getroot()
        except ET.ParseError as e:
            raise ValueError(f"{xml}: not valid XML ({e})") from e
        size = tree.find("size")
        if size is None:
            raise ValueError(f"{xml}: missing <size>")
        w, h = int(float(_voc_text(size, "width", xml))), int(float(_voc_text(size, "height", xml)))
        boxes, labels, difficult = [], [], []
        for obj in tree.iter("object"):
            name = _voc_text(obj, "name", xml)
            if name not in label_of:
                raise ValueError(
                    f"{xml}: object class {name!r} is not one of the {len(classes)} classes {list(classes)}"
                )
            bb = obj.find("bndbox")
            if bb is None:
                raise ValueError(f"{xml}: object {name!r} has no <bndbox>")
            x0, y0, x1, y1 = (float(_voc_text(bb, t, xml)) for t in ("xmin", "ymin", "xmax", "ymax"))
            boxes.append([x0 - 1, y0 - 1, x1, y1])  # 1-based inclusive -> 0-based continuous
            labels.append(label_of[name])
            d = obj.find("difficult")
            difficult.append(d is not None and d.text is not None and d.text.strip() == "1")
        arr = np.array(boxes, np.float32).reshape(-1, 4)
        cboxes, keep = _clean_boxes(arr, w, h)
        clipped_count += int(((cboxes != arr).any(1) & keep).sum())
        dropped += [f"{xml.name} object {k} {boxes[k]}" for k in np.flatnonzero(~keep)]
        cboxes = cboxes[keep]
        records.append(
            DetectionRecord(
                image_id=int(file_id) if numeric else pos,
                path=year_dir / "JPEGImages" / f"{file_id}.jpg",
                width=w,
                height=h,
                boxes=cboxes.astype(np.float32),
                labels=np.array(labels, np.int64)[keep],
                ignore=np.array(difficult, bool)[keep],
                area=((cboxes[:, 2] - cboxes[:, 0]) * (cboxes[:, 3] - cboxes[:, 1])).astype(np.float32),
            )
        )
    _warn_boxes(f"{root} ({sets})", dropped, clipped_count)
    category_ids = list(range(1, len(classes) + 1))
    return DetectionSplit(records, list(classes), category_ids, f"{root} ({sets})", "voc", len(dropped), clipped_count)


# ---------------------------------------------------------------------------- datasets
def detection_transforms(train: bool, hflip: float = 0.5, photometric: float = 0.5) -> v2.Compose:
    """transforms v2 on ``(tv_tensors.Image, {"boxes": BoundingBoxes, "labels": ...})``.

    Training: horizontal flip and photometric distortion (SSD's brightness/contrast/saturation/
    hue jitter), boxes flipped with the image; then float ``[0, 1]`` and a sanity pass that
    drops boxes a transform made degenerate. Resizing to ``min_size``/``max_size`` is the
    model's job (torchvision's ``GeneralizedRCNNTransform``), so predictions come back in the
    coordinates of the file.
    """
    ops: list[Any] = []
    if train:
        if hflip > 0:
            ops.append(v2.RandomHorizontalFlip(hflip))
        if photometric > 0:
            ops.append(v2.RandomPhotometricDistort(p=photometric))
    ops.append(v2.ToDtype(torch.float32, scale=True))
    if train:
        ops.append(v2.SanitizeBoundingBoxes())
    return v2.Compose(ops)


class DetectionDataset(Dataset):
    """Samples of a :class:`DetectionSplit`: ``(image (3, H, W) float in [0, 1], target)``.

    Training targets hold ``boxes`` (``BoundingBoxes`` xyxy), ``labels`` and ``image_id``;
    ``ignore`` boxes are left out unless ``keep_ignored``. Evaluation targets hold only
    ``image_id`` and ``size`` (the ground truth for metrics comes from :attr:`split`).
    An unreadable image, or one whose size differs from its annotation, yields a
    :class:`~tasks.images.SkippedSample` that the collate drops with a counted warning.
    """

    def __init__(self, split: DetectionSplit, train: bool, transforms: Any = None, keep_ignored: bool = False) -> None:
        self.split = split
        self.train = train
        self.transforms = transforms if transforms is not None else detection_transforms(train)
        self.keep_ignored = keep_ignored

    def __len__(self) -> int:
        return len(self.split.records)

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, dict[str, Any]] | SkippedSample:
        rec = self.split.records[idx]
        try:
            raw = read_image(rec.path)
        except BadImageError as e:
            return SkippedSample(e.path, e.reason)
        h, w = raw.shape[-2:]
        if (w, h) != (rec.width, rec.height):
            return SkippedSample(str(rec.path), f"image is {w}x{h} but its annotation says {rec.width}x{rec.height}")
        image = tv_tensors.Image(raw)
        if not self.train:
            return self.transforms(image), {"image_id": rec.image_id, "size": (h, w)}
        keep = np.ones(len(rec.labels), bool) if self.keep_ignored else ~rec.ignore
        target = {
            "boxes": tv_tensors.BoundingBoxes(torch.from_numpy(rec.boxes[keep]), format="XYXY", canvas_size=(h, w)),
            "labels": torch.from_numpy(rec.labels[keep]),
            "image_id": rec.image_id,
        }
        image, target = self.transforms(image, target)
        return image, target


class ImageFolderDataset(Dataset):
    """Images to predict on: whatever :func:`tasks.images.list_images` takes (a folder searched
    recursively, one image file, a text file of paths, or a list of paths), with their ``ids``
    (default: positions in that list).

    Items are ``(image, {"image_id", "size": (H, W), "path", "out_name"})``; ``out_name`` is
    :func:`tasks.images.output_names`' stem (the file stem, or ``sub__stem`` where stems collide).
    """

    def __init__(self, source: str | Path | Sequence[str | Path], ids: Sequence[int] | None = None) -> None:
        names, self.paths = list_images(source)
        self.ids = list(ids) if ids is not None else list(range(len(self.paths)))
        if len(self.ids) != len(self.paths):
            raise ValueError(f"{len(self.ids)} ids for {len(self.paths)} images")
        self.out_names = output_names(names)
        self.to_float = v2.ToDtype(torch.float32, scale=True)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, dict[str, Any]] | SkippedSample:
        path = self.paths[idx]
        try:
            raw = read_image(path)
        except BadImageError as e:
            return SkippedSample(e.path, e.reason)
        target = {
            "image_id": self.ids[idx],
            "size": tuple(raw.shape[-2:]),
            "path": str(path),
            "out_name": self.out_names[idx],
        }
        return self.to_float(tv_tensors.Image(raw)), target


@dataclass
class DetectionBatch:
    """A collated batch: lists of images and targets, plus ``(path, reason)`` of skipped samples.

    (Plain tuples, not :class:`~tasks.images.SkippedSample`: Lightning's device transfer
    rebuilds dataclasses and refuses frozen ones.)
    """

    images: list[torch.Tensor]
    targets: list[dict[str, Any]]
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.images)


def collate_detection(samples: Sequence[Any]) -> DetectionBatch:
    """Detection models take lists (images differ in size); unreadable samples are dropped with a warning."""
    kept, skipped = drop_skipped(samples)
    warn_skipped(skipped, "detection data")
    return DetectionBatch([s[0] for s in kept], [s[1] for s in kept], [(s.path, s.reason) for s in skipped])
