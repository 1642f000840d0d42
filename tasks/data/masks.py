"""Semantic masks: PNGs of class indices (VOC ``SegmentationClass``), checked against their image.

``IGNORE_INDEX`` (255) is VOC's void label: not trained on, not counted by the metrics.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

__all__ = ["IGNORE_INDEX", "BadMaskError", "check_mask", "read_mask"]

IGNORE_INDEX = 255


class BadMaskError(ValueError):
    """A mask that cannot be used with its image. ``str(e)`` starts with the mask's path."""


def check_mask(mask: torch.Tensor, num_classes: int, path: str | Path, image_size: tuple[int, int] | None) -> None:
    """Raise :class:`BadMaskError` if ``mask`` has the wrong size or labels outside the classes."""
    if image_size is not None and tuple(mask.shape[-2:]) != tuple(image_size):
        raise BadMaskError(
            f"{path}: mask is {mask.shape[-2]}x{mask.shape[-1]} (HxW) but its image is {image_size[0]}x{image_size[1]}"
        )
    labels = torch.unique(mask)
    bad = labels[(labels >= num_classes) & (labels != IGNORE_INDEX)]
    if bad.numel():
        raise BadMaskError(
            f"{path}: mask has labels {bad.tolist()[:10]} outside 0..{num_classes - 1} "
            f"({num_classes} classes; {IGNORE_INDEX} = ignore)"
        )


def read_mask(path: str | Path, num_classes: int, image_size: tuple[int, int] | None = None) -> torch.Tensor:
    """Read a PNG of class indices (palette ``P`` or grayscale ``L``) as an int64 ``(H, W)`` tensor.

    Raises :class:`BadMaskError` naming the file when it is missing, unreadable, not a mask
    of indices (e.g. an RGB picture), of another size than ``image_size`` ``(H, W)``, or holds
    labels outside ``[0, num_classes)`` other than 255.
    """
    path = Path(path)
    if not path.is_file():
        raise BadMaskError(f"{path}: mask file not found")
    try:
        with Image.open(path) as im:
            mode = im.mode
            if mode not in ("P", "L"):
                raise BadMaskError(
                    f"{path}: a mask must be a palette (P) or grayscale (L) PNG of class indices, got mode {mode}"
                )
            arr = np.array(im)
    except (OSError, SyntaxError) as e:
        raise BadMaskError(f"{path}: cannot read mask ({e})") from e
    mask = torch.from_numpy(arr.astype(np.int64))
    check_mask(mask, num_classes, path, image_size)
    return mask
