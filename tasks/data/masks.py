"""Semantic masks: PNGs of class indices (VOC ``SegmentationClass``), checked against their image.

``IGNORE_INDEX`` (255) is VOC's void label: not trained on, not counted by the metrics.

A mask is opened like an image (:func:`tasks.images.open_image`: the pixel limit checked on the
header before decoding, the EXIF orientation applied) but its values are labels, never scaled:
a 16-bit (``I;16``) or 32-bit integer (``I``) PNG reads as the same labels as an 8-bit one, and
values of 256 or more are refused (they are not class indices: a depth map, an instance-id
image?).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from tasks.images import BadImageError, open_image

__all__ = ["IGNORE_INDEX", "MASK_MODES", "BadMaskError", "check_mask", "read_mask"]

IGNORE_INDEX = 255


class BadMaskError(ValueError):
    """A mask that cannot be used with its image. ``str(e)`` starts with the mask's path."""


def check_mask(mask: torch.Tensor, num_classes: int, path: str | Path, image_size: tuple[int, int] | None) -> None:
    """Raise :class:`BadMaskError` if ``mask`` has the wrong size or labels outside the classes."""
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
    bad = labels[(labels >= num_classes) & (labels != IGNORE_INDEX)]
    if bad.numel():
        raise BadMaskError(
            f"{path}: mask has labels {bad.tolist()[:10]} outside 0..{num_classes - 1} "
            f"({num_classes} classes; {IGNORE_INDEX} = ignore)"
        )


#: Pillow modes of masks: palette, 8-bit grayscale, 16-bit grayscale (PNG ``I;16``) and 32-bit integer.
MASK_MODES = ("P", "L", "I;16", "I;16B", "I;16L", "I;16N", "I")


def read_mask(path: str | Path, num_classes: int, image_size: tuple[int, int] | None = None) -> torch.Tensor:
    """Read a PNG of class indices (palette ``P``, grayscale ``L``, or 16/32-bit grayscale) as int64 ``(H, W)``.

    Raises :class:`BadMaskError` naming the file when it is missing, unreadable, above the
    pixel limit (:data:`tasks.images.MAX_IMAGE_PIXELS`, checked before decoding), not a mask of
    indices (e.g. an RGB picture), holds values of 256 or more, is of another size than
    ``image_size`` ``(H, W)``, or holds labels outside ``[0, num_classes)`` other than 255.
    """
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
    wide = arr[(arr < 0) | (arr > 255)]
    if wide.size:
        raise BadMaskError(
            f"{path}: a {'16' if im.mode != 'I' else '32'}-bit mask holds values {np.unique(wide).tolist()[:10]} "
            "outside 0..255; a mask holds class indices (255 = ignore), not intensities or instance ids"
        )
    mask = torch.from_numpy(arr)
    check_mask(mask, num_classes, path, image_size)
    return mask
