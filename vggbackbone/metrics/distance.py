"""Pairwise distances between embedding sets, shared by ranking and re-ranking.

Written with one matrix product (``|a|^2 + |b|^2 - 2 a.b``) rather than
:func:`torch.cdist`, because re-ranking needs the *squared* distances of chunks of rows and
``cdist`` would take a square root that is then undone.
"""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from torch import Tensor

__all__ = ["Metric", "compute_distance", "squared_euclidean"]

Metric = Literal["cosine", "euclidean"]


def squared_euclidean(a: Tensor, b: Tensor) -> Tensor:
    """``(n, D) x (m, D) -> (n, m)`` squared euclidean distances (clamped at 0 against rounding)."""
    return ((a * a).sum(1, keepdim=True) + (b * b).sum(1) - 2.0 * a @ b.T).clamp_(min=0)


def compute_distance(query: Tensor, gallery: Tensor, metric: Metric = "cosine") -> Tensor:
    """Pairwise distances ``(Q, D) x (G, D) -> (Q, G)``.

    ``cosine``: ``1 - cos(q, g)`` in ``[0, 2]``; ``euclidean``: ``||q - g||_2``.
    """
    if metric == "cosine":
        return 1.0 - F.normalize(query, dim=1) @ F.normalize(gallery, dim=1).T
    if metric == "euclidean":
        return squared_euclidean(query, gallery).sqrt_()
    raise ValueError(f"metric must be 'cosine' or 'euclidean', got {metric!r}")
