"""Semantic masks: PNGs of class indices (VOC ``SegmentationClass``), checked against their image.

``IGNORE_INDEX`` (255) is VOC's void label and the default ``data.ignore_index``: not trained on,
not counted by the metrics. :class:`MaskLabels` says how a dataset's raw mask values become
training ids: the number of classes, the ignore value (``data.ignore_index``) and an optional
label map (``data.label_map``, raw value -> training id, with a rule for unlisted values,
``data.unlisted``: ``ignore`` or ``error``), applied when the mask is read, before it is checked.

A mask is opened like an image (:func:`tasks.images.open_image`: the pixel limit checked on the
header before decoding, the EXIF orientation applied) but its values are labels, never scaled:
a 16-bit (``I;16``) or 32-bit integer (``I``) PNG reads as the same labels as an 8-bit one, and
values of 256 or more are refused (they are not class indices: a depth map, an instance-id
image?).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from tasks.images import BadImageError, open_image

__all__ = ["IGNORE_INDEX", "MASK_MODES", "BadMaskError", "MaskLabels", "as_mask_labels", "check_mask", "read_mask"]

IGNORE_INDEX = 255


class BadMaskError(ValueError):
    """A mask that cannot be used with its image. ``str(e)`` starts with the mask's path."""


@dataclass(frozen=True)
class MaskLabels:
    """How the raw values of a dataset's masks become training ids.

    Args:
        num_classes: training ids are ``0..num_classes-1``.
        ignore_index: the value of pixels that are not trained on nor counted (``data.ignore_index``);
            never a class index (a void value inside the classes is moved out by ``label_map``).
        label_map: raw value -> training id (a class index or ``ignore_index``); ``None``: the raw
            values are the training ids.
        unlisted: what a raw value missing from ``label_map`` becomes: ``ignore`` (``ignore_index``)
            or ``error`` (:class:`BadMaskError` naming the file and the values). A raw value equal to
            ``ignore_index`` stays ignored even when unlisted.
        source: who gave ``label_map``, for messages.
    """

    num_classes: int
    ignore_index: int = IGNORE_INDEX
    label_map: Mapping[int, int] | None = None
    unlisted: Literal["ignore", "error"] = "error"
    source: str = field(default="data.label_map", compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.ignore_index, bool) or not isinstance(self.ignore_index, int) or self.ignore_index < 0:
            raise ValueError(f"data.ignore_index must be an integer >= 0, got {self.ignore_index!r}")
        if self.ignore_index < self.num_classes:
            raise ValueError(
                f"data.ignore_index {self.ignore_index} is a class index (0..{self.num_classes - 1}): the ignore "
                "value must be outside the classes; map a void value inside them away with data.label_map"
            )
        if self.unlisted not in ("ignore", "error"):
            raise ValueError(f"data.unlisted must be 'ignore' or 'error', got {self.unlisted!r}")
        if self.label_map is not None:
            table = {int(k): int(v) for k, v in self.label_map.items()}
            bad = {k: v for k, v in table.items() if not (0 <= v < self.num_classes or v == self.ignore_index)}
            if bad:
                raise ValueError(
                    f"{self.source}: raw values {sorted(bad)[:10]} map to {[bad[k] for k in sorted(bad)[:10]]}, "
                    f"neither a class (0..{self.num_classes - 1}) nor data.ignore_index {self.ignore_index}"
                )
            object.__setattr__(self, "label_map", table)

    def convert(self, raw: np.ndarray, path: str | Path) -> np.ndarray:
        """Raw int64 values -> training ids through :attr:`label_map` (``raw`` itself when there is none)."""
        if self.label_map is None:
            return raw
        values, inverse = np.unique(raw, return_inverse=True)
        unlisted = [int(v) for v in values if int(v) not in self.label_map and int(v) != self.ignore_index]
        if unlisted and self.unlisted == "error":
            raise BadMaskError(
                f"{path}: mask values {unlisted[:10]} are not in {self.source} (data.unlisted: error; "
                "set data.unlisted: ignore to ignore them, or list them)"
            )
        mapped = np.array([self.label_map.get(int(v), self.ignore_index) for v in values], dtype=np.int64)
        return mapped[inverse].reshape(raw.shape)


def as_mask_labels(labels: int | MaskLabels) -> MaskLabels:
    """``labels`` as :class:`MaskLabels` (a number of classes: ignore 255, no label map)."""
    return labels if isinstance(labels, MaskLabels) else MaskLabels(int(labels))


def check_mask(
    mask: torch.Tensor,
    num_classes: int,
    path: str | Path,
    image_size: tuple[int, int] | None,
    ignore_index: int = IGNORE_INDEX,
) -> None:
    """Raise :class:`BadMaskError` if ``mask`` has the wrong size or labels outside the classes
    (``ignore_index`` allowed)."""
    if image_size is not None and tuple(mask.shape[-2:]) != tuple(image_size):
        swapped = tuple(mask.shape[-2:]) == tuple(image_size)[::-1]
        raise BadMaskError(
            f"{path}: mask is {mask.shape[-2]}x{mask.shape[-1]} (HxW) but its image is {image_size[0]}x{image_size[1]}"
            + (
                " (images are read with their EXIF orientation applied: was the mask drawn on the stored pixels?)"
                if swapped
                else ""
            )
        )
    labels = torch.unique(mask)
    bad = labels[((labels >= num_classes) | (labels < 0)) & (labels != ignore_index)]
    if bad.numel():
        raise BadMaskError(
            f"{path}: mask has labels {bad.tolist()[:10]} outside 0..{num_classes - 1} "
            f"({num_classes} classes; {ignore_index} = ignore, data.ignore_index; raw values of another "
            "numbering: data.label_map)"
        )


#: Pillow modes of masks: palette, 8-bit grayscale, 16-bit grayscale (PNG ``I;16``) and 32-bit integer.
MASK_MODES = ("P", "L", "I;16", "I;16B", "I;16L", "I;16N", "I")


def read_mask(
    path: str | Path, num_classes: int | MaskLabels, image_size: tuple[int, int] | None = None
) -> torch.Tensor:
    """Read a PNG of class indices (palette ``P``, grayscale ``L``, or 16/32-bit grayscale) as int64 ``(H, W)``.

    ``num_classes``: the number of classes, or the :class:`MaskLabels` (ignore value, label map)
    of the dataset, whose label map is applied to the raw values first.

    Raises :class:`BadMaskError` naming the file when it is missing, unreadable, above the
    pixel limit (:data:`tasks.images.MAX_IMAGE_PIXELS`, checked before decoding), not a mask of
    indices (e.g. an RGB picture), holds values of 256 or more (without a label map), is of
    another size than ``image_size`` ``(H, W)``, or holds labels outside ``[0, num_classes)``
    other than the ignore value.
    """
    labels = as_mask_labels(num_classes)
    path = Path(path)
    if not path.is_file():
        raise BadMaskError(f"{path}: mask file not found")
    try:
        with open_image(path) as im:
            if im.mode not in MASK_MODES:
                raise BadMaskError(
                    f"{path}: a mask must be a palette (P) or grayscale (L, 16-bit) PNG of class indices, "
                    f"got mode {im.mode}"
                )
            arr = np.asarray(im).astype(np.int64)
    except BadImageError as e:
        raise BadMaskError(f"{path}: cannot read mask ({e.reason})") from e
    wide = arr[((arr < 0) | (arr > 255)) & (arr != labels.ignore_index)] if labels.label_map is None else arr[:0]
    if wide.size:
        raise BadMaskError(
            f"{path}: a {'16' if im.mode != 'I' else '32'}-bit mask holds values {np.unique(wide).tolist()[:10]} "
            "outside 0..255; a mask holds class indices (255 = ignore), not intensities or instance ids"
        )
    mask = torch.from_numpy(labels.convert(arr, path))
    check_mask(mask, labels.num_classes, path, image_size, labels.ignore_index)
    return mask
