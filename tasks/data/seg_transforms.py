"""Joint image/mask transforms and the collates of segmentation (``tasks.data.segmentation`` re-exports them).

Samples are dicts ``{"image": tv_tensors.Image uint8 (3, H, W), "mask": tv_tensors.Mask int64 (H, W),
"id", "path"}`` (or :class:`~tasks.skips.SkippedSample`); training crops are stacked, evaluation
images are kept as lists (each evaluated at its own size).
"""

from __future__ import annotations

from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from tasks.data.masks import IGNORE_INDEX
from tasks.images import drop_skipped

__all__ = ["collate_eval", "collate_train", "flip_probability", "train_transforms"]


def train_transforms(
    crop_size: int | None,
    scale_size: int | None = None,
    scale_range: tuple[float, float] = (0.5, 2.0),
    hflip: float = 0.5,
    ignore_index: int = IGNORE_INDEX,
) -> v2.Compose:
    """Random scale (``v2.ScaleJitter``: fit in ``scale_size`` times a factor in ``scale_range``),
    random ``crop_size`` crop (padded with 0 in the image and ``ignore_index`` in the mask) and
    horizontal flip, applied jointly to ``tv_tensors.Image`` and ``tv_tensors.Mask`` (masks
    are resized with nearest neighbour). ``hflip``: flip probability (``True``/``False``, the
    old type, mean 0.5/0). ``crop_size=None``: whole images, neither scaled nor cropped (the
    FCN recipe's online training at batch 1)."""
    steps: list[Any] = []
    if crop_size is not None:
        size = scale_size or crop_size
        steps += [
            v2.ScaleJitter((size, size), scale_range=tuple(scale_range)),
            v2.RandomCrop(crop_size, pad_if_needed=True, fill={tv_tensors.Image: 0, tv_tensors.Mask: ignore_index}),
        ]
    hflip = flip_probability(hflip)
    if hflip > 0:
        steps.append(v2.RandomHorizontalFlip(hflip))
    return v2.Compose(steps or [v2.Identity()])


def flip_probability(hflip: float | bool) -> float:
    return (0.5 if hflip else 0.0) if isinstance(hflip, bool) else float(hflip)


def collate_train(samples: list[Any]) -> dict[str, Any]:
    """Same-size crops -> ``{"image": uint8 (N, 3, h, w), "mask": int64 (N, h, w), "id": [...]}``."""
    kept, skipped = drop_skipped(samples)  # counted and reported once per epoch by the task
    return {
        "image": torch.stack([s["image"].as_subclass(torch.Tensor) for s in kept])
        if kept
        else torch.empty(0, 3, 1, 1, dtype=torch.uint8),
        "mask": torch.stack([s["mask"].as_subclass(torch.Tensor).long() for s in kept])
        if kept
        else torch.empty(0, 1, 1, dtype=torch.long),
        "id": [s["id"] for s in kept],
        "skipped": [(s.path, s.reason) for s in skipped],
    }


def collate_eval(samples: list[Any]) -> dict[str, Any]:
    """Images of any size -> lists (evaluation runs image by image at full resolution).

    ``mask`` is there when the samples have masks, and (empty) when every sample of the batch
    was unreadable, so an evaluation step never finds it missing.
    """
    kept, skipped = drop_skipped(samples)  # counted and reported once per epoch by the task
    out: dict[str, Any] = {
        "image": [s["image"].as_subclass(torch.Tensor) for s in kept],
        "id": [s["id"] for s in kept],
        "path": [s["path"] for s in kept],
        "skipped": [(s.path, s.reason) for s in skipped],
    }
    if not kept or "mask" in kept[0]:
        out["mask"] = [s["mask"].as_subclass(torch.Tensor).long() for s in kept]
    return out
