"""``layout: pairs``: per split a text file of ``image mask`` lines (SegNet's and DeepLab's lists).

::

    <list file>:   JPEGImages/2007_000032.jpg SegmentationClass/2007_000032.png
                   /home/someone/CamVid/train/0001TP_006690.png /home/someone/CamVid/trainannot/0001TP_006690.png

One pair a line, two whitespace-separated paths (blank lines and lines starting with ``#`` are
skipped). A relative path is relative to ``data.root`` (``pairs_base: root``) or to the list
file's folder (``pairs_base: list``). Lists written on another machine hold that machine's
absolute paths: ``path_prefix`` re-roots them without editing the file, ``{"/home/someone/CamVid":
"."}`` reading ``/home/someone/CamVid/train/x.png`` as ``train/x.png`` below the base (the
longest matching prefix wins; a prefix matches whole path components). DeepLab's lists start
their paths with ``/`` meaning the dataset folder: ``{"/": "."}``.

Every path is checked when the list is read: a path that does not exist, or a line without
exactly two paths, is an error naming ``file:line``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path, PurePosixPath
from typing import Literal

from tasks.data.folders import PairedSegmentation, distinct_ids
from tasks.data.masks import MaskLabels

__all__ = ["pairs_split", "read_pairs", "reroot"]


def reroot(path: str, path_prefix: Mapping[str, str] | None) -> str:
    """``path`` with the longest matching prefix of ``path_prefix`` (whole components) replaced."""
    if not path_prefix:
        return path
    pure = PurePosixPath(path)
    for old in sorted(path_prefix, key=lambda p: -len(PurePosixPath(p).parts)):
        old_path = PurePosixPath(old)
        if pure.parts[: len(old_path.parts)] == old_path.parts:
            rest = pure.parts[len(old_path.parts) :]
            return str(PurePosixPath(path_prefix[old], *rest))
    return path


def read_pairs(
    list_file: str | Path, base: str | Path, path_prefix: Mapping[str, str] | None = None
) -> list[tuple[Path, Path, str]]:
    """``(image, mask, id)`` of every line of ``list_file``; relative paths below ``base``.

    Raises ``FileNotFoundError`` for a missing list or a listed path that does not exist and
    ``ValueError`` for a malformed line or an empty list, each naming ``file:line``.
    """
    list_file, base = Path(list_file), Path(base)
    if not list_file.is_file():
        raise FileNotFoundError(f"{list_file}: pairs list not found (data.pairs_file)")
    rows: list[tuple[Path, Path]] = []
    lines: list[int] = []
    for n, line in enumerate(list_file.read_text().splitlines(), start=1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        fields = text.split()
        if len(fields) != 2:
            raise ValueError(
                f"{list_file}:{n}: expected 'image mask' (two paths), got {len(fields)} field(s): {text!r}"
            )
        resolved = []
        for what, raw in zip(("image", "mask"), fields):
            path = Path(reroot(raw, path_prefix))
            path = Path(os.path.normpath(path if path.is_absolute() else base / path))
            if not path.is_file():
                hint = (
                    " (an absolute path of another machine? re-root it with data.path_prefix)"
                    if Path(raw).is_absolute() and str(path) == raw
                    else ""
                )
                read_as = "" if str(path) == raw else f", read as {path}"
                raise FileNotFoundError(f"{list_file}:{n}: {what} {raw}{read_as} not found{hint}")
            resolved.append(path)
        rows.append((resolved[0], resolved[1]))
        lines.append(n)
    if not rows:
        raise ValueError(f"{list_file}: no 'image mask' line")
    seen: dict[Path, int] = {}
    for (image, _), n in zip(rows, lines):
        if image in seen:
            raise ValueError(f"{list_file}:{n}: image {image} listed again (first at line {seen[image]})")
        seen[image] = n
    ids = distinct_ids([(*p.parent.parts[-1:], p.stem) for p, _ in rows])
    if len(set(ids)) != len(ids):  # same folder and file names in different places: the line number tells apart
        ids = [f"line{n}_{p.stem}" for (p, _), n in zip(rows, lines)]
    return [(image, mask, sid) for (image, mask), sid in zip(rows, ids)]


def pairs_split(
    root: str | Path,
    split: str,
    pairs_file: str,
    labels: int | MaskLabels,
    pairs_base: Literal["root", "list"] = "root",
    path_prefix: Mapping[str, str] | None = None,
    transforms: Callable[[dict], dict] | None = None,
) -> PairedSegmentation:
    """The ``split`` of a ``pairs`` layout: ``pairs_file`` with ``{split}`` filled in (below ``root``
    when relative), read by :func:`read_pairs`."""
    root = Path(root)
    list_file = Path(pairs_file.format(split=split))
    list_file = list_file if list_file.is_absolute() else root / list_file
    base = list_file.parent if pairs_base == "list" else root
    return PairedSegmentation(read_pairs(list_file, base, path_prefix), labels, transforms)
