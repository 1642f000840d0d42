"""The per-task halves of ``python -m tasks.data check``: each reads the splits of a built data
module with the readers training uses and fills a :class:`~tasks.data.check_report.SplitReport`.

* detection: the split's records (``DetectionDataModule.split``; a YOLO tree through
  :func:`~tasks.data.yolo.read_yolo` collecting every refused line instead of stopping at the
  first), then every image header (pixels with ``decode``) against the annotated size;
* segmentation: the data module's datasets item by item (image and mask, as training reads
  them, so any layout is covered): masks are decoded to count pixels per class, which needs the
  image's size, so segmentation images are always decoded;
* ReID: ``read_split`` of ``train``/``query``/``gallery``, every image header, identities and
  cameras, and the query identities without a gallery image;
* classification: the ``(path, label)`` samples of the data module's datasets (any layout) and
  every image header.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from tasks.data.check_report import SplitReport
from tasks.data.headers import header_size
from tasks.data.masks import IGNORE_INDEX, BadMaskError
from tasks.images import BadImageError, SkippedSample, max_image_pixels, read_image

__all__ = ["check_classification", "check_detection", "check_reid", "check_segmentation", "image_size"]


def image_size(path: str | Path, decode: bool) -> tuple[int, int]:
    """``(width, height)`` of an image: from its header, or by decoding it (``decode``), as training reads it.

    An image above the pixel limit (:func:`tasks.images.max_image_pixels`) is unreadable, as training skips it.
    """
    if decode:
        h, w = read_image(path).shape[-2:]
        return int(w), int(h)
    w, h = header_size(path)
    if w * h > max_image_pixels():
        raise BadImageError(path, f"image is {w}x{h} = {w * h} pixels, above the limit of {max_image_pixels()}")
    return w, h


@contextmanager
def _notes(report: SplitReport) -> Iterator[None]:
    """Keep the readers' warnings as notes of the report (printed once, with the split they concern)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    report.notes += list(dict.fromkeys(str(w.message) for w in caught))


def _read(report: SplitReport, fn: Callable[[], Any]) -> Any:
    """``fn()``, or ``None`` with the reader's refusal as the split's error."""
    try:
        with _notes(report):
            return fn()
    except (OSError, ValueError, KeyError) as e:
        report.error = f"{type(e).__name__}: {e}"
        return None


def _duplicates(report: SplitReport, values: list[Any], what: str) -> None:
    for value, n in Counter(values).items():
        if n > 1:
            report.add("duplicate ids", f"{what} {value} x{n}")


def _stages(dm: Any) -> list[tuple[str, str]]:
    """``(stage, split name)`` of train, val and test; test left out when it is the validation split."""
    names = {s: getattr(dm, "splits", {}).get(s) or getattr(dm, f"{s}_split", None) for s in ("train", "val", "test")}
    return [(s, str(n)) for s, n in names.items() if n is not None and not (s == "test" and n == names["val"])]


# ---------------------------------------------------------------------------- detection
def check_detection(dm: Any, decode: bool) -> list[SplitReport]:
    from tasks.data.yolo import read_yolo

    reports = []
    for stage, name in _stages(dm):
        report = SplitReport("detect", f"{stage} ({name})", source=str(dm.root))
        report.touch("unreadable files", "labels outside the classes", "images without labels",
                     "boxes dropped (zero/negative size or outside the image)", "duplicate ids")  # fmt: skip
        problems: list[Any] = []
        if dm.layout == "yolo":
            split = _read(report, lambda name=name, problems=problems: read_yolo(dm.yolo_config(), name, problems))
        else:
            split = _read(report, lambda stage=stage: dm.read_split(stage))
        for p in problems:
            kind = {"class": "labels outside the classes", "unreadable": "unreadable files"}.get(
                p.kind, "bad label lines"
            )
            report.add(kind, str(p))
        reports.append(report)
        if split is not None:
            _detection_records(report, split, decode)
    return reports


def _detection_records(report: SplitReport, split: Any, decode: bool) -> None:
    report.source = split.source
    report.images = len(split.records) + report.counts["unreadable files"]
    labels = np.concatenate([r.labels for r in split.records]) if split.records else np.zeros(0, np.int64)
    report.per_class = {c: int((labels == k + 1).sum()) for k, c in enumerate(split.classes)}
    report.info["ignored boxes (crowd/difficult)"] = int(sum(int(r.ignore.sum()) for r in split.records))
    report.counts["boxes dropped (zero/negative size or outside the image)"] += split.dropped_boxes
    report.info["boxes clipped to their image"] = split.clipped_boxes
    for r in split.records:
        if not len(r.boxes):
            report.add("images without labels", str(r.path))
        try:
            w, h = image_size(r.path, decode)
        except BadImageError as e:
            report.add("unreadable files", str(e))
            continue
        if (w, h) != (r.width, r.height):
            report.add("image/annotation size mismatches", f"{r.path}: {w}x{h}, annotated {r.width}x{r.height}")
    _duplicates(report, [r.image_id for r in split.records], "image id")
    _duplicates(report, [str(r.path) for r in split.records], "image")
    if not any(len(r.boxes) for r in split.records):  # training and evaluation refuse it (check_has_boxes)
        report.add("splits without any box", split.source)


# ---------------------------------------------------------------------------- segmentation
def _segmentation_dataset(dm: Any, stage: str, name: str) -> Any:
    """The split as training reads it, without augmentation: ``dm.dataset(name)`` where the module has it,
    else its ``build_dataset(stage)`` with the dataset's ``transforms`` removed."""
    if callable(getattr(dm, "dataset", None)):
        return dm.dataset(name)
    ds = dm.build_dataset(stage)
    if hasattr(ds, "transforms"):
        ds.transforms = None
    return ds


def _mask_problem(message: str) -> str:
    if "mask file not found" in message:
        return "images without labels"
    if "but its image is" in message:
        return "mask/image size mismatches"
    if "outside" in message and "label" in message:
        return "labels outside the classes"
    return "unreadable masks"


def check_segmentation(dm: Any, decode: bool) -> list[SplitReport]:
    """Every item of every configured split (images decoded: a mask is checked against its image)."""
    names = list(getattr(dm, "class_names", None) or getattr(dm, "classes", None) or [])
    ignore = int(getattr(dm, "ignore_index", IGNORE_INDEX))
    reports = []
    for stage, name in _stages(dm):
        report = SplitReport("segment", f"{stage} ({name})", source=str(getattr(dm, "root", "")))
        report.touch("unreadable files", "labels outside the classes", "images without labels",
                     "mask/image size mismatches", "duplicate ids")  # fmt: skip
        reports.append(report)
        ds = _read(report, lambda stage=stage, name=name: _segmentation_dataset(dm, stage, name))
        if ds is None:
            continue
        report.images = len(ds)
        pixels = np.zeros(max(len(names), 1), np.int64)
        ignored, ids = 0, []
        for i in range(len(ds)):
            try:
                with _notes(report):
                    sample = ds[i]
            except BadMaskError as e:
                report.add(_mask_problem(str(e)), str(e))
                continue
            if isinstance(sample, SkippedSample):
                report.add("unreadable files", f"{sample.path}: {sample.reason}")
                continue
            mask = np.asarray(sample["mask"]).reshape(-1)
            ids.append(sample.get("id", i))
            ignored += int((mask == ignore).sum())
            counted = np.bincount(mask[(mask >= 0) & (mask < len(pixels))], minlength=len(pixels))
            pixels += counted[: len(pixels)]
        report.per_class = {str(n): int(pixels[k]) for k, n in enumerate(names)}
        report.info[f"ignored pixels (value {ignore})"] = ignored
        _duplicates(report, ids, "sample id")
    return reports


# ---------------------------------------------------------------------------- ReID
def check_reid(dm: Any, decode: bool) -> list[SplitReport]:
    """``train``, ``query``, ``gallery``: images, identities, cameras, unreadable files, duplicates,
    and (on ``query``) the identities no gallery image has."""
    from tasks.data.reid import unmatched_query_ids

    read: dict[str, Any] = {}
    reports = []
    for split in ("train", "query", "gallery"):
        report = SplitReport("reid", split, source=str(dm.root if dm.layout != "csv" else dm.csvs[split]))
        report.touch("unreadable files", "duplicate ids")
        reports.append(report)
        samples = read[split] = _read(report, lambda split=split: dm.read_split(split))
        if samples is None:
            continue
        report.images = len(samples)
        report.info["identities"] = len({s.pid for s in samples})
        cams = sorted({s.camid for s in samples})
        report.info["cameras (0-based)"] = f"{len(cams)}: {cams[:20]}{' ...' if len(cams) > 20 else ''}"
        for s in samples:
            try:
                image_size(s.path, decode)
            except BadImageError as e:
                report.add("unreadable files", str(e))
        _duplicates(report, [s.path for s in samples], "image")
    if read.get("query") is not None and read.get("gallery") is not None:
        missing = unmatched_query_ids(read["query"], read["gallery"])
        query = reports[1]
        query.counts["query identities without a gallery image"] += len(missing)
        if missing:
            query.examples["query identities without a gallery image"] = [str(list(missing)[:20])]
    return reports


# ---------------------------------------------------------------------------- classification
def check_classification(dm: Any, decode: bool) -> list[SplitReport]:
    """Every configured split's ``(path, label)`` samples (the data module's datasets, any layout):
    images per class, unreadable files, labels outside the classes, duplicate paths."""
    names = list(getattr(dm, "class_names", None) or [])
    reports = []
    for stage, name in _stages(dm):
        report = SplitReport("classify", f"{stage} ({name})", source=str(getattr(dm, "root", "")))
        report.touch("unreadable files", "labels outside the classes", "images without labels", "duplicate ids")
        reports.append(report)
        ds = _read(report, lambda stage=stage: dm.build_dataset(stage))
        if ds is None:
            continue
        samples = ds.samples
        samples = [samples[i] for i in getattr(ds, "indices", range(len(samples)))]
        report.images = len(samples)
        per_class = Counter()
        for path, label in samples:
            if label < 0:
                report.add("images without labels", str(path))
            elif label >= len(names):
                report.add("labels outside the classes", f"{path}: label {label}")
            else:
                per_class[names[label]] += 1
            try:
                image_size(path, decode)
            except BadImageError as e:
                report.add("unreadable files", str(e))
        report.per_class = {n: per_class[n] for n in names}
        _duplicates(report, [str(p) for p, _ in samples], "image")
    return reports
