"""The Ultralytics YOLO detection layout as a :class:`~tasks.data.records.DetectionSplit`.

A ``data.yaml`` names the splits and the classes::

    path: .               # dataset root (relative: to data.yaml's folder)
    train: images/train   # a folder of images, a text file of image paths, or a list of them
    val: images/val
    test: images/test     # optional
    names: [cat, dog]     # or {0: cat, 1: dog}

Each image ``.../images/<split>/x.jpg`` has its labels in ``.../labels/<split>/x.txt`` (the last
``images`` folder of the path becomes ``labels``, as Ultralytics' ``img2label_paths`` does), one
object a line: ``class cx cy w h`` normalised to ``[0, 1]``, or a polygon ``class x1 y1 x2 y2
...`` (segmentation exports), turned into its bounding box. An image without a label file, or
with an empty one, has no objects (a background image; counted in one warning).

Refused with an error naming ``file:line``: a class index that is not one of ``names``, a
coordinate outside ``[0, 1]`` or not a number, a line with a wrong number of values. Image sizes
(to turn normalised boxes into pixels) come from the image headers (:mod:`tasks.data.headers`),
never from decoding; an unreadable image header is an error naming the file.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from tasks.data.headers import header_size
from tasks.data.records import DetectionRecord, DetectionSplit, clean_boxes, warn_boxes
from tasks.images import BadImageError, list_images

__all__ = ["YoloConfig", "YoloLabelError", "parse_yolo_line", "read_yolo", "read_yolo_config", "yolo_label_path"]


class YoloLabelError(ValueError):
    """A label line (or an image) the reader refuses; ``kind``: ``class`` (an index not in ``names``),
    ``value`` (a coordinate outside ``[0, 1]``), ``format`` (not a box or polygon line), ``unreadable``
    (the image header or the label file cannot be read)."""

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class YoloConfig:
    """A ``data.yaml`` read: its file, the dataset root, each split's image sources, the class names."""

    source: Path
    root: Path
    splits: dict[str, list[Path]]
    names: list[str]


def _names(source: Path, names: Any) -> list[str]:
    """``names`` as a list (a list, or a dict ``{0: a, 1: b}`` whose keys are exactly ``0..K-1``)."""
    if isinstance(names, dict):
        keys = sorted(names, key=lambda k: (not isinstance(k, int), str(k)))
        if not all(isinstance(k, int) and not isinstance(k, bool) for k in keys) or keys != list(range(len(keys))):
            raise ValueError(f"{source}: the keys of 'names' must be the class indices 0..{len(keys) - 1}, got {keys}")
        names = [names[k] for k in keys]
    if not isinstance(names, list) or not names:
        raise ValueError(f"{source}: 'names' must be a non-empty list or a dict {{index: name}}, got {names!r}")
    bad = [n for n in names if not isinstance(n, (str, int)) or isinstance(n, bool) or str(n) == ""]
    if bad:
        raise ValueError(f"{source}: class names must be non-empty strings, got {bad[:5]}")
    names = [str(n) for n in names]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"{source}: class name(s) {dup} listed more than once in 'names'")
    return names


def read_yolo_config(path: str | Path) -> YoloConfig:
    """Read ``data.yaml`` (``path`` is the file, or a folder holding ``data.yaml``).

    ``path`` in the file is the dataset root (absolute, or relative to the file's folder; absent:
    that folder); split entries are relative to it. ``nc``, when given, must equal the number of
    ``names``. Pose files (``kpt_shape``) are refused: their lines are not boxes or polygons.
    """
    source = Path(path)
    if source.is_dir():
        source = source / "data.yaml"
    if not source.is_file():
        raise FileNotFoundError(f"{source}: YOLO data.yaml not found")
    try:
        data = yaml.safe_load(source.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ValueError(f"{source}: not valid YAML ({e})") from e
    if not isinstance(data, dict) or "names" not in data:
        raise ValueError(f"{source}: a YOLO data.yaml needs 'names' (and 'train'/'val')")
    if "kpt_shape" in data:
        raise ValueError(f"{source}: a pose dataset (kpt_shape): its label lines are keypoints, not detection boxes")
    names = _names(source, data["names"])
    if "nc" in data and data["nc"] != len(names):
        raise ValueError(f"{source}: nc is {data['nc']} but 'names' lists {len(names)} classes")
    root = Path(data.get("path") or ".")
    root = root if root.is_absolute() else source.parent / root
    splits: dict[str, list[Path]] = {}
    for key, value in data.items():
        if key in ("path", "names", "nc", "download") or value is None:
            continue
        entries = value if isinstance(value, list) else [value]
        if all(isinstance(e, str) for e in entries):
            splits[str(key)] = [Path(e) if Path(e).is_absolute() else root / e for e in entries]
    return YoloConfig(source, root, splits, names)


def yolo_label_path(image: Path) -> Path:
    """``.../images/<split>/x.jpg`` -> ``.../labels/<split>/x.txt`` (the last ``images`` folder)."""
    parts = image.parts
    idx = max((i for i, part in enumerate(parts[:-1]) if part == "images"), default=None)
    if idx is None:
        raise ValueError(f"{image}: a YOLO image must lie under an 'images' folder (its labels are in 'labels')")
    return Path(*parts[:idx], "labels", *parts[idx + 1 : -1], image.stem + ".txt")


def parse_yolo_line(line: str, where: str, num_classes: int) -> tuple[int, np.ndarray]:
    """One label line -> ``(class index 0..K-1, normalised xyxy (4,))``; errors name ``where`` (``file:line``)."""
    fields = line.split()
    try:
        values = [float(v) for v in fields]
    except ValueError:
        raise YoloLabelError(f"{where}: not numbers: {line.strip()!r}", "format") from None
    n = len(values)
    if n != 5 and (n < 7 or n % 2 == 0):
        raise YoloLabelError(
            f"{where}: {n} values; a line is 'class cx cy w h' (5) or a polygon 'class x1 y1 x2 y2 ...' "
            f"(an odd number, at least 7): {line.strip()!r}",
            "format",
        )
    cls = values[0]
    if not cls.is_integer() or not 0 <= cls < num_classes:
        raise YoloLabelError(
            f"{where}: class {fields[0]!r} is not one of the {num_classes} class indices 0..{num_classes - 1}", "class"
        )
    coords = np.array(values[1:], np.float64)
    bad = [fields[i + 1] for i, v in enumerate(coords) if not (math.isfinite(v) and 0.0 <= v <= 1.0)]
    if bad:
        raise YoloLabelError(
            f"{where}: value(s) {bad[:4]} outside [0, 1] (coordinates are normalised by the image size)", "value"
        )
    if n == 5:
        cx, cy, w, h = coords
        box = np.array([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])
    else:  # a polygon: its bounding box
        xs, ys = coords[0::2], coords[1::2]
        box = np.array([xs.min(), ys.min(), xs.max(), ys.max()])
    return int(cls), box


def read_label_file(
    label_file: Path, num_classes: int, problems: list[YoloLabelError] | None = None
) -> tuple[np.ndarray, np.ndarray, list[int]] | None:
    """``(labels 0-based (K,), normalised xyxy (K, 4), line numbers)`` of a label file, ``None`` when there is none.

    ``problems``: collect refused lines there and skip them (``python -m tasks.data check``) instead of raising.
    """
    if not label_file.is_file():
        return None
    try:
        text = label_file.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise YoloLabelError(f"{label_file}: cannot read the label file ({e})", "unreadable") from e
    labels, boxes, lines = [], [], []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                cls, box = parse_yolo_line(line, f"{label_file}:{n}", num_classes)
            except YoloLabelError as e:
                if problems is None:
                    raise
                problems.append(e)
                continue
            labels.append(cls)
            boxes.append(box)
            lines.append(n)
    return np.array(labels, np.int64), np.array(boxes, np.float64).reshape(-1, 4), lines


def read_yolo(
    config: YoloConfig | str | Path, split: str, problems: list[YoloLabelError] | None = None
) -> DetectionSplit:
    """The images of ``split`` (a key of ``data.yaml``) with their boxes in pixels, labels ``1..K``.

    Image ids are positions in the split's image list (folders listed recursively, sorted).
    ``problems``: collect what would be refused (bad lines, unreadable images or label files) and
    skip it, instead of raising (``python -m tasks.data check`` counts them all).
    """
    cfg = config if isinstance(config, YoloConfig) else read_yolo_config(config)
    if split not in cfg.splits:
        raise ValueError(f"{cfg.source}: no split {split!r} (it lists {sorted(cfg.splits)})")
    images = [p for src in cfg.splits[split] for p in list_images(src)[1]]
    source = f"{cfg.source} ({split})"
    records, dropped, clipped, unlabelled, empty = [], [], 0, 0, 0
    for pos, image in enumerate(images):
        label_file = yolo_label_path(image)
        try:
            read = read_label_file(label_file, len(cfg.names), problems)
            w, h = _size(image, source)
        except YoloLabelError as e:
            if problems is None:
                raise
            problems.append(e)
            continue
        if read is None or not len(read[0]):
            unlabelled += read is None
            empty += read is not None
        labels, norm, lines = read if read is not None else (np.zeros(0, np.int64), np.zeros((0, 4)), [])
        boxes = (norm * np.array([w, h, w, h])).astype(np.float32)
        cboxes, keep = clean_boxes(boxes, w, h)
        clipped += int(((cboxes != boxes).any(1) & keep).sum())
        dropped += [f"{label_file}:{lines[k]}" for k in np.flatnonzero(~keep)]
        cboxes = cboxes[keep]
        records.append(
            DetectionRecord(
                image_id=pos,
                path=image,
                width=w,
                height=h,
                boxes=cboxes,
                labels=labels[keep] + 1,
                ignore=np.zeros(int(keep.sum()), bool),
                area=((cboxes[:, 2] - cboxes[:, 0]) * (cboxes[:, 3] - cboxes[:, 1])).astype(np.float32),
            )
        )
    if (unlabelled or empty) and problems is None:  # the check reports them in its table
        warnings.warn(
            f"{source}: {unlabelled} image(s) without a label file and {empty} with an empty one: "
            "they have no objects (background images)",
            stacklevel=2,
        )
    warn_boxes(source, dropped, clipped)
    ids = list(range(1, len(cfg.names) + 1))
    return DetectionSplit(records, list(cfg.names), ids, source, "yolo", len(dropped), clipped)


def _size(image: Path, source: str) -> tuple[int, int]:
    try:
        return header_size(image)
    except BadImageError as e:
        raise YoloLabelError(
            f"{source}: {e} (its size is needed to turn normalised boxes into pixels)", "unreadable"
        ) from e
