"""Per-image non-maximum suppression and top-k over a flat list of candidates from many images,
in tensor operations only, so that a traced graph keeps a dynamic batch dimension.

torchvision's detectors post-process each image in a Python loop, which the tracer unrolls for
the batch it sees; here every candidate carries its image index and the whole batch goes
through one :func:`torchvision.ops.nms` call (ONNX ``NonMaxSuppression``). Boxes of different
images and different NMS groups (class, or pyramid level for proposals) are kept apart by
shifting them: the x coordinates by ``image * (width + 1)``, the y coordinates by ``group *
(height + 1)``. torchvision's ``batched_nms`` shifts both coordinates by ``group * (max + 1)``;
shifting images and groups along different axes keeps the magnitudes (and so the float32
rounding of the IoU) to ``max(batch * width, groups * height)`` instead of their product.
Boxes must be clipped to the image (every family clips before its NMS).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["nms_per_image", "pad_per_image", "rank_in_image"]


def rank_in_image(image: Tensor, batch_ids: Tensor) -> Tensor:
    """The position of each entry among the entries of its image, in list order.

    ``image``: ``(K,)`` int64 image index of each entry; ``batch_ids``: ``arange(batch)``.
    Returns ``(K,)`` int64 (0 for the first entry of each image, 1 for the second...).
    """
    onehot = (image[:, None] == batch_ids[None]).to(torch.int64)  # (K, B)
    return (onehot.cumsum(0) * onehot).sum(1) - 1


def nms_per_image(
    boxes: Tensor,
    scores: Tensor,
    groups: Tensor,
    image: Tensor,
    batch_ids: Tensor,
    *,
    iou_threshold: float,
    size: tuple[int, int],
    top: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """NMS within each (image, group), then the ``top`` best per image.

    Args:
        boxes: ``(N, 4)`` xyxy, clipped to ``[0, width] x [0, height]`` (``size = (height, width)``).
        scores: ``(N,)``; groups: ``(N,)`` int64 (class or level: only boxes of one group suppress
            each other); image: ``(N,)`` int64 image index; batch_ids: ``arange(batch)``.

    Returns ``(keep, image_of_kept, rank)``: indices into the candidates, in decreasing score
    order across the batch, at most ``top`` per image; their image and their rank in it.
    """
    from torchvision.ops import nms

    height, width = size
    shift = torch.stack([image * (width + 1), groups * (height + 1)], 1).to(boxes.dtype).repeat(1, 2)
    keep = nms(boxes + shift, scores, iou_threshold)
    kept_image = image[keep]
    rank = rank_in_image(kept_image, batch_ids)
    chosen = rank < top
    return keep[chosen], kept_image[chosen], rank[chosen]


def pad_per_image(
    values: list[Tensor], image: Tensor, rank: Tensor, batch_ids: Tensor, slots: int
) -> tuple[list[Tensor], Tensor]:
    """Scatter per-detection values into ``(batch, slots, ...)`` tensors, zero-padded.

    ``values``: tensors of first dimension ``K`` (one row per detection); ``image``, ``rank``:
    ``(K,)`` from :func:`nms_per_image` (``rank < slots``). Returns the padded tensors and the
    ``(batch,)`` int64 count of detections per image.
    """
    slot = image * slots + rank
    count = (image[:, None] == batch_ids[None]).to(torch.int64).sum(0)
    padded = []
    for v in values:
        flat = v.new_zeros((batch_ids.shape[0] * slots, *tuple(v.shape[1:])))
        flat = flat.index_put((slot,), v)
        padded.append(flat.reshape((-1, slots, *tuple(v.shape[1:]))))
    return padded, count
