"""Reading images with errors that name the file, and skipping unreadable samples with a count."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image

__all__ = ["BadImageError", "SkippedSample", "drop_skipped", "read_image", "warn_skipped"]


class BadImageError(ValueError):
    """An image that is missing, empty or cannot be decoded. ``str(e)`` starts with the path."""

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


def read_image(path: str | Path, mode: str = "RGB") -> torch.Tensor:
    """Decode ``path`` to a ``(C, H, W)`` uint8 tensor (``mode`` is a PIL mode: RGB, L, ...).

    Raises :class:`BadImageError` naming the file for a missing, empty, truncated or corrupt
    image. Decoding goes through Pillow: torchvision's own decoders are deprecated since 0.29
    (superseded by TorchCodec, which is not a dependency here) and Pillow reads every format
    the datasets use.
    """
    p = Path(path)
    if not p.is_file():
        raise BadImageError(p, "image file not found")
    if p.stat().st_size == 0:
        raise BadImageError(p, "image file is empty")
    try:
        with Image.open(p) as img:
            arr = np.asarray(img.convert(mode))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise BadImageError(p, f"cannot decode image ({str(e).splitlines()[0]})") from e
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


class SkippedSample(NamedTuple):
    """Returned by a dataset instead of a sample it could not read (a collate drops it).

    A ``NamedTuple`` so it survives Lightning's batch transfer (frozen dataclasses do not).
    """

    path: str
    reason: str


def drop_skipped(samples: Sequence[Any]) -> tuple[list[Any], list[SkippedSample]]:
    """Split a list of dataset items into readable samples and :class:`SkippedSample` markers."""
    kept = [s for s in samples if not isinstance(s, SkippedSample)]
    skipped = [s for s in samples if isinstance(s, SkippedSample)]
    return kept, skipped


def warn_skipped(skipped: Sequence[SkippedSample], where: str, max_listed: int = 5) -> None:
    """One warning that counts the skipped files and names the first few."""
    if not skipped:
        return
    listed = "; ".join(f"{s.path} ({s.reason})" for s in skipped[:max_listed])
    more = f" and {len(skipped) - max_listed} more" if len(skipped) > max_listed else ""
    warnings.warn(f"{where}: skipped {len(skipped)} unreadable image(s): {listed}{more}", stacklevel=2)
