"""What ``data.layout`` of :class:`~tasks.data.segmentation.SegmentationDataModule` sets up.

* ``voc``, ``coco``, ``sbd``: :mod:`tasks.data.segmentation`, :mod:`tasks.data.sbd`;
* ``folders``: an image folder and a mask folder per split (:mod:`tasks.data.folders`);
* ``pairs``: a list of ``image mask`` lines per split (:mod:`tasks.data.pairs`);
* ``cityscapes``, ``ade20k``: presets of ``folders`` (:data:`PRESETS`: folders and suffixes, class
  names and the label map of the release; :mod:`tasks.data.cityscapes`, :mod:`tasks.data.ade20k`).

For every layout, masks are read with one :class:`~tasks.data.masks.MaskLabels` (:func:`mask_labels`):
``data.ignore_index`` and the label map (``data.label_map``, else the preset's).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from tasks.data.ade20k import ADE20K_CLASSES, ADE20K_FOLDERS, ade20k_label_map, ade20k_root
from tasks.data.cityscapes import CITYSCAPES_CLASSES, CITYSCAPES_FOLDERS, cityscapes_label_map
from tasks.data.folders import FolderLayout
from tasks.data.masks import MaskLabels

__all__ = ["FOLDER_LAYOUTS", "LAYOUTS", "PRESETS", "Preset", "check_layout_options", "folder_layout", "mask_labels"]

#: The values of ``data.layout``.
LAYOUTS = ("voc", "coco", "sbd", "folders", "pairs", "cityscapes", "ade20k")
Layout = Literal["voc", "coco", "sbd", "folders", "pairs", "cityscapes", "ade20k"]


@dataclass(frozen=True)
class Preset:
    """A dataset release read as ``folders``: its tree, its classes and its raw -> training id map."""

    folders: FolderLayout
    classes: tuple[str, ...]
    label_map: Callable[[int], dict[int, int]]
    root: Callable[[Path], Path] = Path


PRESETS: Mapping[str, Preset] = {
    "cityscapes": Preset(CITYSCAPES_FOLDERS, CITYSCAPES_CLASSES, cityscapes_label_map),
    "ade20k": Preset(ADE20K_FOLDERS, ADE20K_CLASSES, ade20k_label_map, ade20k_root),
}

#: The layouts read by :func:`tasks.data.folders.folders_split`.
FOLDER_LAYOUTS = ("folders", *PRESETS)

#: Options that only some layouts read: a value given to another layout is an error naming it.
_OPTION_LAYOUTS: Mapping[str, tuple[str, ...]] = {
    "image_dir": FOLDER_LAYOUTS,
    "mask_dir": FOLDER_LAYOUTS,
    "image_suffix": FOLDER_LAYOUTS,
    "mask_suffix": FOLDER_LAYOUTS,
    "pairs_file": ("pairs",),
    "path_prefix": ("pairs",),
}


def check_layout_options(layout: str, given: Mapping[str, Any]) -> None:
    """Refuse, by name, a layout-specific option set (not ``None``) for a layout that does not read it."""
    unread = [k for k, v in given.items() if v is not None and layout not in _OPTION_LAYOUTS[k]]
    if unread:
        where = "; ".join(f"data.{k} is read by layout {', '.join(_OPTION_LAYOUTS[k])}" for k in unread)
        raise ValueError(f"data.layout is {layout}: {where}, not by {layout}")


def folder_layout(
    layout: str,
    image_dir: str | None = None,
    mask_dir: str | None = None,
    image_suffix: str | None = None,
    mask_suffix: str | None = None,
) -> FolderLayout:
    """The tree of a folder layout: the preset's (``folders``: ``images/{split}``, ``masks/{split}``,
    ``.jpg``, ``.png``), each value replaced by the option given."""
    base = PRESETS[layout].folders if layout in PRESETS else FolderLayout()
    return FolderLayout(
        image_dir if image_dir is not None else base.image_dir,
        mask_dir if mask_dir is not None else base.mask_dir,
        image_suffix if image_suffix is not None else base.image_suffix,
        mask_suffix if mask_suffix is not None else base.mask_suffix,
    )


def mask_labels(
    layout: str,
    num_classes: int,
    ignore_index: int,
    label_map: Mapping[int, int] | None,
    unlisted: Literal["ignore", "error"],
) -> MaskLabels:
    """The :class:`MaskLabels` of the layout: ``label_map`` (``data.label_map``) when given, else
    the preset's; ``coco`` paints category names, so a label map there is an error."""
    source = "data.label_map"
    if label_map is not None and layout == "coco":
        raise ValueError(
            "data.label_map does not apply to layout coco: its masks are painted from the categories, matched to "
            "data.classes by name"
        )
    if label_map is None and layout in PRESETS:
        label_map, source = PRESETS[layout].label_map(ignore_index), f"the {layout} label map"
    return MaskLabels(num_classes, ignore_index, label_map, unlisted, source)
