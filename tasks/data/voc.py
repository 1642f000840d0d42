"""PASCAL VOC constants shared by detection and segmentation: the class list and the palette.

* :data:`VOC_CLASSES`: the 20 object classes in the devkit's order (detection labels 1..20);
* :data:`VOC_SEGMENTATION_CLASSES`: ``("background", *VOC_CLASSES)``, the 21 labels of
  ``SegmentationClass`` PNGs (0 = background, 255 = void);
* :func:`voc_palette`: the devkit's 256-colour palette of those PNGs;
* :func:`read_voc`: ``VOCdevkit/VOC2007/{Annotations,JPEGImages,ImageSets/Main}`` XML boxes as a
  :class:`~tasks.data.records.DetectionSplit`. A set is ``trainval`` (VOC2007 by default),
  ``VOC2012/trainval``, or several joined by ``+`` (``VOC2007/trainval+VOC2012/trainval``, the
  "07+12" recipe). VOC's 1-based inclusive pixel boxes become 0-based continuous
  ``[xmin - 1, ymin - 1, xmax, ymax]``; ``difficult`` flags (``1``/``0`` or ``true``/``false``) are kept
  (``ignore``); :func:`read_image_set` reads a list, refusing an id listed twice.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from xml.etree import ElementTree as ET

import numpy as np

from tasks.data.records import DetectionRecord, DetectionSplit, clean_boxes, warn_boxes

__all__ = ["VOC_CLASSES", "VOC_SEGMENTATION_CLASSES", "read_image_set", "read_voc", "voc_palette"]

#: PASCAL VOC's 20 object classes, in the devkit's order (detection labels 1..20; 0 is background).
VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip

#: The 21 labels of VOC segmentation masks: background (0) then :data:`VOC_CLASSES` (1..20).
VOC_SEGMENTATION_CLASSES: tuple[str, ...] = ("background", *VOC_CLASSES)


def voc_palette() -> list[int]:
    """PASCAL VOC's 256-colour palette, flat ``[r0, g0, b0, r1, ...]`` (class k gets colour k; 255 is void).

    The devkit's ``labelcolormap``: the bits of k spread over the high bits of r, g, b.
    """
    palette = []
    for k in range(256):
        r = g = b = 0
        c = k
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette += [r, g, b]
    return palette


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


def _voc_number(node: ET.Element, tag: str, xml: Path, what: str) -> float:
    """The number in ``<tag>`` of ``node``; an error naming the XML file, ``what`` and the text otherwise."""
    text = _voc_text(node, tag, xml)
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{xml}: {what} <{tag}> is not a number: {text!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"{xml}: {what} <{tag}> is not a finite number: {text!r}")
    return value


def _voc_flag(node: ET.Element, tag: str, xml: Path, what: str) -> bool:
    """A VOC flag (``<difficult>``): ``1``/``0`` as the devkit writes it, or ``true``/``false`` as
    some tools do; absent is ``0``; anything else is an error naming the XML file."""
    found = node.find(tag)
    if found is None:
        return False
    text = (found.text or "").strip().lower()
    if text in ("1", "true"):
        return True
    if text in ("0", "false"):
        return False
    raise ValueError(f"{xml}: {what} <{tag}> must be 1/0 (or true/false), got {found.text!r}")


def read_image_set(listing: str | Path) -> list[str]:
    """The image ids of a VOC image-set list (first column of each line; blank lines skipped).

    Refused, naming the file (and the lines): a missing or empty list, and an id listed twice,
    which would count its image twice (and, with VOC's numeric ids, change every image id).
    Not de-duplicated silently: a repeated line is a mistake in the list, which the user fixes.
    """
    listing = Path(listing)
    if not listing.is_file():
        raise FileNotFoundError(f"{listing}: VOC image set list not found")
    ids, first, again = [], {}, []
    for n, line in enumerate(listing.read_text().splitlines(), 1):
        if not line.strip():
            continue
        sid = line.split()[0]
        if sid in first:
            again.append(f"{sid!r} on lines {first[sid]} and {n}")
        first.setdefault(sid, n)
        ids.append(sid)
    if not ids:
        raise ValueError(f"{listing}: image set list is empty")
    if again:
        raise ValueError(
            f"{listing}: {len(again)} image id(s) listed twice: {'; '.join(again[:5])}"
            f"{' ...' if len(again) > 5 else ''}: list each image once"
        )
    return ids


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
        items += [(year_dir, i) for i in read_image_set(listing)]
    again = [f"{year_dir.name}/{i}" for (year_dir, i), n in Counter(items).items() if n > 1]
    if again:  # the same list twice in ``sets`` (a duplicate inside one list is refused by read_image_set)
        raise ValueError(f"{root} ({sets}): image(s) {again[:5]} listed by more than one of the joined sets")
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
        w, h = (int(_voc_number(size, t, xml, f"image {file_id}: <size>")) for t in ("width", "height"))
        if w < 1 or h < 1:
            raise ValueError(f"{xml}: image {file_id}: <size> is {w}x{h}, not a positive width and height")
        boxes, labels, difficult = [], [], []
        for k, obj in enumerate(tree.iter("object")):
            name = _voc_text(obj, "name", xml)
            if name not in label_of:
                raise ValueError(
                    f"{xml}: object class {name!r} is not one of the {len(classes)} classes {list(classes)}"
                )
            bb = obj.find("bndbox")
            if bb is None:
                raise ValueError(f"{xml}: object {name!r} has no <bndbox>")
            what = f"image {file_id}: object {k} ({name}) <bndbox>"
            x0, y0, x1, y1 = (_voc_number(bb, t, xml, what) for t in ("xmin", "ymin", "xmax", "ymax"))
            boxes.append([x0 - 1, y0 - 1, x1, y1])  # 1-based inclusive -> 0-based continuous
            labels.append(label_of[name])
            difficult.append(_voc_flag(obj, "difficult", xml, f"image {file_id}: object {k} ({name})"))
        arr = np.array(boxes, np.float32).reshape(-1, 4)
        cboxes, keep = clean_boxes(arr, w, h)
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
    warn_boxes(f"{root} ({sets})", dropped, clipped_count)
    category_ids = list(range(1, len(classes) + 1))
    return DetectionSplit(records, list(classes), category_ids, f"{root} ({sets})", "voc", len(dropped), clipped_count)
