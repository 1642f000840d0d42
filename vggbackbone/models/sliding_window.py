"""Sliding-window inference of a segmentation model (:class:`~vggbackbone.models.FCN`,
:class:`~vggbackbone.models.UNetVGG`, any ``(N, C, H, W) -> (N, K, H, W)`` logits model).

Written here because neither torchvision nor smp has one (MONAI's is not a dependency).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["sliding_window_logits"]


def sliding_window_logits(
    model: nn.Module, image: Tensor, window: int, overlap: float = 1 / 3, batch_size: int = 4
) -> Tensor:
    """Logits ``(1, K, H, W)`` of ``image`` ``(1, C, H, W)`` from overlapping ``window`` crops, averaged.

    Windows are placed every ``window * (1 - overlap)`` pixels and the last one is shifted to end
    at the border, so none is padded (a side shorter than ``window`` is taken whole); ``batch_size``
    crops go through ``model`` at a time.
    """
    _, _, h, w = image.shape
    wh, ww = min(window, h), min(window, w)
    stride = max(1, int(window * (1 - overlap)))

    def starts(size: int, win: int) -> list[int]:
        n = max(1, math.ceil((size - win) / stride) + 1)
        return sorted({min(i * stride, size - win) for i in range(n)})

    boxes = [(y, x) for y in starts(h, wh) for x in starts(w, ww)]
    logits: Tensor | None = None
    count = torch.zeros(1, 1, h, w, device=image.device, dtype=image.dtype)
    for i in range(0, len(boxes), batch_size):
        chunk = boxes[i : i + batch_size]
        out = model(torch.cat([image[..., y : y + wh, x : x + ww] for y, x in chunk]))
        if logits is None:
            logits = image.new_zeros(1, out.shape[1], h, w, dtype=out.dtype)
        for k, (y, x) in enumerate(chunk):
            logits[..., y : y + wh, x : x + ww] += out[k]
            count[..., y : y + wh, x : x + ww] += 1
    assert logits is not None
    return logits / count
