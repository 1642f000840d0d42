"""Classification ``layout: csv``: per split a CSV file of ``path,label`` rows beside the images.

::

    <root>/train.csv        path,label             (a header row naming the columns; others are not read)
                            images/cat_001.jpg,cat
                            images/dog_007.jpg,dog
    <root>/images/...

``path`` is relative to ``data.root`` (or absolute). ``label`` is a class name, or a class index
when ``data.classes`` is set: a label among ``data.classes`` is that class, else an integer label
is an index into them (out of range: an error). Without ``data.classes`` the classes are the
sorted distinct names of the training CSV (as ImageFolder sorts its folders), and an integer
label is an error (is ``3`` a name or an index? ``data.classes`` says). Read with Python's
``csv`` module; a missing image, an unknown label or a row without ``path``/``label`` is an
error naming ``file:line``.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tasks.images import ImageListDataset

__all__ = ["csv_class_names", "csv_split", "read_label_csv"]

_COLUMNS = ("path", "label")


def _rows(csv_file: Path) -> list[tuple[int, str, str]]:
    """``(line, path, label)`` of every data row; the header must name ``path`` and ``label``."""
    if not csv_file.is_file():
        raise FileNotFoundError(f"{csv_file}: label CSV not found (data.csv_file)")
    with open(csv_file, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in _COLUMNS if c not in (reader.fieldnames or ())]
        if missing:
            raise ValueError(
                f"{csv_file}:1: the header row must name the columns path and label, got {reader.fieldnames}"
            )
        rows = []
        for row in reader:
            line = reader.line_num
            path, label = (row.get(c) for c in _COLUMNS)
            if not path or label is None or not label.strip():
                raise ValueError(f"{csv_file}:{line}: a row needs a path and a label, got {row}")
            rows.append((line, path.strip(), label.strip()))
    if not rows:
        raise ValueError(f"{csv_file}: no row below the header")
    return rows


def _is_index(label: str) -> bool:
    return label.lstrip("-").isdigit()


def csv_class_names(csv_file: str | Path) -> list[str]:
    """The sorted distinct labels of ``csv_file`` (names; an integer label is an error: indices need
    ``data.classes``)."""
    csv_file = Path(csv_file)
    rows = _rows(csv_file)
    for line, _, label in rows:
        if _is_index(label):
            raise ValueError(
                f"{csv_file}:{line}: label {label!r} is an index, and index labels need data.classes (the names "
                "in index order; to read such labels as names, list them in data.classes)"
            )
    return sorted({label for _, _, label in rows})


def read_label_csv(csv_file: str | Path, root: str | Path, classes: Sequence[str]) -> tuple[list[str], list[int]]:
    """Image paths (relative ones below ``root``) and class indices of ``csv_file``'s rows."""
    csv_file, root = Path(csv_file), Path(root)
    index = {name: k for k, name in enumerate(classes)}
    paths, labels = [], []
    for line, raw_path, label in _rows(csv_file):
        if label in index:
            k = index[label]
        elif _is_index(label):
            k = int(label)
            if not 0 <= k < len(classes):
                raise ValueError(f"{csv_file}:{line}: label index {k} outside 0..{len(classes) - 1} (data.classes)")
        else:
            raise ValueError(f"{csv_file}:{line}: label {label!r} is not among the classes {list(classes)}")
        path = Path(raw_path)
        path = path if path.is_absolute() else root / path
        if not path.is_file():
            raise FileNotFoundError(f"{csv_file}:{line}: image {raw_path} not found (read as {path})")
        paths.append(str(path))
        labels.append(k)
    return paths, labels


def csv_split(
    csv_file: str | Path,
    root: str | Path,
    classes: Sequence[str],
    mode: str = "RGB",
    transform: Callable[[Any], Any] | None = None,
) -> ImageListDataset:
    """One split of the ``csv`` layout as a labelled :class:`~tasks.images.ImageListDataset` (rows in file order)."""
    paths, labels = read_label_csv(csv_file, root, classes)
    dataset = ImageListDataset(paths, transform=transform, labels=labels, mode=mode)
    dataset.classes, dataset.class_to_idx = list(classes), {c: i for i, c in enumerate(classes)}
    return dataset
