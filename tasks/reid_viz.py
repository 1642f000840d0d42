"""Retrieval grids: each query followed by its top-k gallery results, framed green (same
identity) or red (another identity), after the benchmark's same-camera removal."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from tasks.images import BadImageError, read_image
from vggbackbone.utils import atomic_path

__all__ = ["retrieval_grid", "save_retrieval_grid"]

_GREEN, _RED, _BLUE, _GREY = (40, 170, 60), (210, 40, 40), (40, 90, 210), (200, 200, 200)


def _tile(path: str, size: tuple[int, int]) -> Image.Image:
    h, w = size
    try:
        arr = read_image(path).permute(1, 2, 0).numpy()
        return Image.fromarray(arr).resize((w, h), Image.Resampling.BILINEAR)
    except BadImageError:
        return Image.new("RGB", (w, h), _GREY)


def retrieval_grid(
    query_paths: Sequence[str],
    result_paths: Sequence[Sequence[str]],
    matches: Sequence[Sequence[bool]],
    *,
    tile: tuple[int, int] = (128, 64),
    border: int = 4,
) -> Image.Image:
    """One row per query: the query (blue frame), a gap, then its results (green/red frames).

    Args:
        query_paths: ``Q`` image paths.
        result_paths: ``Q`` lists of up to ``k`` result paths, best first.
        matches: ``Q`` lists of booleans, True where the result has the query's identity.
        tile: ``(height, width)`` of each picture.
        border: frame width in pixels.
    """
    h, w = tile
    k = max((len(r) for r in result_paths), default=0)
    cell_w, cell_h = w + 2 * border, h + 2 * border
    gap, label_h = cell_w // 3, 14
    width = cell_w * (k + 1) + gap
    height = (cell_h + label_h) * max(1, len(query_paths))
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for row, (qp, results, ok) in enumerate(zip(query_paths, result_paths, matches)):
        y = row * (cell_h + label_h) + label_h
        draw.text((2, y - label_h + 1), "query", fill=(0, 0, 0))
        draw.rectangle([0, y, cell_w - 1, y + cell_h - 1], fill=_BLUE)
        canvas.paste(_tile(qp, tile), (border, y + border))
        for j, (rp, good) in enumerate(zip(results, ok)):
            x = cell_w * (j + 1) + gap
            draw.text((x + 2, y - label_h + 1), f"{j + 1}", fill=(0, 0, 0))
            draw.rectangle([x, y, x + cell_w - 1, y + cell_h - 1], fill=_GREEN if good else _RED)
            canvas.paste(_tile(rp, tile), (x + border, y + border))
    return canvas


def save_retrieval_grid(
    path: str | Path,
    query_paths: Sequence[str],
    result_paths: Sequence[Sequence[str]],
    matches: Sequence[Sequence[bool]],
    **kwargs: object,
) -> tuple[Path, np.ndarray]:
    """Write :func:`retrieval_grid` as a PNG atomically; return the path and the ``(H, W, 3)`` array."""
    img = retrieval_grid(query_paths, result_paths, matches, **kwargs)  # type: ignore[arg-type]
    path = Path(path)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
    return path, np.asarray(img)
