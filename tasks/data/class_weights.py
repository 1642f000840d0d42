"""Median-frequency class balancing (``model.class_weights: median_frequency``), cached next to the data.

As SegNet (Badrinarayanan et al., 2017, after Eigen & Fergus, 2015) defines it: with
``freq(c)`` = pixels of class ``c`` / total pixels of the training images where ``c`` is present,
``weight(c) = median(freq) / freq(c)``. Pixels are the labelled ones (``data.ignore_index``
pixels belong to no class and are counted nowhere); the median is numpy's, over the classes
present in the training masks; a class absent from every training mask gets weight 0 (no
pixel of it is ever a target) and is named when the weights are printed.

No library computes these from a segmentation dataset (torchmetrics, smp and mmseg take weights
as given), so :func:`mask_statistics` counts them here, one mask at a time, the images not read.

The weights are computed once and kept in ``<data.root>/_class_weights.json``
(:data:`CACHE_NAME`), a file the project writes atomically (``vggbackbone.utils.atomic_path``)
and marks as its own (``format``); it holds one entry per training set, keyed by the layout
options and the name, size and modification time of every mask file, so a changed mask or
option computes them again. A file of that name the project did not write is never touched
(an error naming it); a data folder that cannot be written is warned about, and the weights are
used uncached.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from vggbackbone.utils import atomic_path

__all__ = [
    "CACHE_NAME",
    "MaskSource",
    "cached_median_frequency",
    "describe_weights",
    "mask_statistics",
    "median_frequency",
]

#: The cache file, in ``data.root``.
CACHE_NAME = "_class_weights.json"
FORMAT = "vggbackbone-class-weights/1"


class MaskSource(Protocol):
    """A segmentation dataset whose masks can be read without their images."""

    def __len__(self) -> int: ...

    def mask_at(self, i: int) -> torch.Tensor: ...

    def mask_files(self) -> list[Path]: ...


def mask_statistics(dataset: MaskSource, num_classes: int, ignore_index: int) -> tuple[np.ndarray, np.ndarray]:
    """``(pixels of c, labelled pixels of the images where c is present)`` per class, int64 ``(K,)`` each."""
    pixels = np.zeros(num_classes, np.int64)
    image_pixels = np.zeros(num_classes, np.int64)
    for i in range(len(dataset)):
        mask = dataset.mask_at(i).reshape(-1)
        labelled = mask[mask != ignore_index]
        counts = torch.bincount(labelled, minlength=num_classes).numpy().astype(np.int64)
        pixels += counts
        image_pixels[counts > 0] += labelled.numel()
    return pixels, image_pixels


def median_frequency(pixels: np.ndarray, image_pixels: np.ndarray) -> np.ndarray:
    """``median(freq) / freq(c)`` with ``freq = pixels / image_pixels``; 0 for absent classes (float64)."""
    present = pixels > 0
    if not present.any():
        raise ValueError("median_frequency: the training masks hold no labelled pixel")
    freq = np.zeros(len(pixels), np.float64)
    freq[present] = pixels[present] / image_pixels[present]
    weights = np.zeros(len(pixels), np.float64)
    weights[present] = np.median(freq[present]) / freq[present]
    return weights


def _cache_key(dataset: MaskSource, options: Mapping[str, Any]) -> str:
    files = []
    for path in dict.fromkeys(dataset.mask_files()):  # COCO: one annotation file for every image
        st = os.stat(path)
        files.append([str(path), st.st_size, st.st_mtime_ns])
    text = json.dumps({"options": dict(options), "files": files}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _read_cache(path: Path) -> dict[str, Any]:
    if not path.exists() and not path.is_symlink():
        return {"format": FORMAT, "entries": {}}
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        data = e
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("entries"), dict):
        raise ValueError(
            f"{path}: not a class-weights cache the project wrote, so it is left as it is; move it away to let "
            "model.class_weights: median_frequency cache its weights there"
        )
    return data


def cached_median_frequency(
    dataset: MaskSource,
    num_classes: int,
    ignore_index: int,
    cache_dir: str | Path,
    options: Mapping[str, Any],
    write: bool = True,
) -> tuple[list[float], str]:
    """Median-frequency weights of ``dataset``'s masks, from the cache in ``cache_dir`` when its
    entry for ``options`` and the mask files is there, else computed and stored (``write``: this
    process writes the file; the others only read). Returns the weights and a line saying where
    they came from."""
    path = Path(cache_dir) / CACHE_NAME
    cache = _read_cache(path)
    key = _cache_key(dataset, {**options, "num_classes": num_classes, "ignore_index": ignore_index})
    entry = cache["entries"].get(key)
    if entry is not None and len(entry.get("weights", ())) == num_classes:
        return [float(w) for w in entry["weights"]], f"read from {path}"
    pixels, image_pixels = mask_statistics(dataset, num_classes, ignore_index)
    weights = median_frequency(pixels, image_pixels)
    entry = {"weights": weights.tolist(), "pixels": pixels.tolist(), "image_pixels": image_pixels.tolist(),
             "masks": len(dataset), "options": {k: str(v) for k, v in options.items()}}  # fmt: skip
    where = f"computed from {len(dataset)} training masks"
    if write:
        cache["entries"][key] = entry
        try:
            with atomic_path(path) as tmp:
                tmp.write_text(json.dumps(cache, indent=1, sort_keys=True))
            where += f", cached in {path}"
        except OSError as e:
            warnings.warn(f"{path}: the class weights could not be cached ({e}); they are used uncached", stacklevel=2)
    return weights.tolist(), where


def describe_weights(weights: Sequence[float], names: Sequence[str]) -> str:
    """``name weight, ...`` with the absent classes named."""
    shown = ", ".join(f"{n} {w:.4g}" for n, w in zip(names, weights))
    absent = [n for n, w in zip(names, weights) if w == 0]
    return shown + (f" (absent from the training masks, weight 0: {', '.join(absent)})" if absent else "")
