"""Image sizes from file headers, without decoding pixels (the YOLO reader and ``python -m tasks.data check``).

Pillow's ``Image.open`` reads only the header; the size returned is the upright one (EXIF
orientations 5-8 swap width and height), which is how :func:`tasks.images.read_image` delivers
the pixels and how labelling tools (Ultralytics' ``exif_size``) measure normalised boxes.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from PIL import Image

from tasks.images import _DECODE_ERRORS, BadImageError

__all__ = ["header_size"]

#: EXIF orientation tag and the values that turn the image a quarter (width and height swap).
_ORIENTATION = 0x0112
_QUARTER_TURNS = (5, 6, 7, 8)


def header_size(path: str | Path) -> tuple[int, int]:
    """``(width, height)`` of the upright image ``path``, read from its header only.

    Raises :class:`~tasks.images.BadImageError` naming the file when it is missing, empty or
    not an image Pillow recognises.
    """
    p = Path(path)
    if not p.is_file():
        raise BadImageError(p, "image file not found")
    if p.stat().st_size == 0:
        raise BadImageError(p, "image file is empty")
    try:
        with warnings.catch_warnings():  # the size limit is applied when the pixels are read
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(p) as img:
                w, h = img.size
                turned = img.getexif().get(_ORIENTATION) in _QUARTER_TURNS
    except Image.DecompressionBombError:
        raise BadImageError(p, "too many pixels, refused before decoding") from None
    except _DECODE_ERRORS as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise BadImageError(p, f"cannot read the image header ({why})") from e
    return (h, w) if turned else (w, h)
