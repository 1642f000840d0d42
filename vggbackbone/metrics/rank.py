"""Retrieval metrics of person re-identification: CMC, mAP and mINP under the Market-1501 protocol.

Protocol (Zheng et al., "Scalable Person Re-identification: A Benchmark", ICCV 2015, as
implemented by torchreid and fast-reid): for each query, the gallery is ranked by distance, then

* gallery images of the query's identity taken by the query's camera are removed (the task is
  to match *across* cameras),
* gallery images with identity ``-1`` ("junk": bad detections) are removed,
* identity ``0`` (Market's "distractors") stays in the gallery as a non-match;

``CMC[k]`` is the fraction of queries whose first correct match is within the top ``k+1`` and
``AP`` the mean of the precision at each correct match (non-interpolated, as torchreid and
fast-reid compute it; the original MATLAB script's trapezoid rule gives slightly different AP).
``INP`` (Ye et al., "Deep Learning for Person Re-identification: A Survey and Outlook", TPAMI
2021) is ``num_matches / (rank of the hardest match)``, ranks counted after the removals, as
fast-reid's ``evaluate_rank`` computes it; mINP is its mean over the queries with a match.
Queries with no correct match left in the gallery are skipped, as in the benchmark code.

Distances are never materialised for the whole query set: :func:`rank_embeddings` works on
chunks of queries, so a 20k x 20k evaluation needs memory for one chunk x gallery only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .distance import Metric, compute_distance
from .query_expansion import average_query_expansion
from .rerank import KReciprocalReRanker

__all__ = ["RankResult", "compute_distance", "evaluate_rank", "rank_distances", "rank_embeddings"]

ArrayLike = Tensor | np.ndarray

# elements of one (chunk x gallery) working set; ~60 bytes each across the ranking buffers
_WORKING_SET = 4_000_000


def _as_tensor(x: ArrayLike, dtype: torch.dtype | None = None) -> Tensor:
    t = x if isinstance(x, Tensor) else torch.from_numpy(np.asarray(x))
    return t.to(dtype) if dtype is not None else t


@dataclass
class _Stats:
    """Sums over a set of queries, so chunks can be added up."""

    first_hit_counts: Tensor  # (max_rank,) queries whose first valid match is at rank k (0-based)
    ap_sum: float
    inp_sum: float
    num_valid: int
    topk: Tensor | None  # (chunk, k) gallery indices of the first k kept results (-1: none)
    topk_match: Tensor | None  # (chunk, k) True where that result has the query's identity


def _chunk_stats(
    dist: Tensor, q_pids: Tensor, g_pids: Tensor, q_camids: Tensor, g_camids: Tensor, max_rank: int, topk: int
) -> _Stats:
    """Protocol statistics of one chunk of queries: ``dist`` is ``(c, G)``, ids on its device."""
    order = torch.argsort(dist, dim=1, stable=True)  # stable: ties keep gallery order
    gp, gc = g_pids[order], g_camids[order]
    same_id = gp == q_pids[:, None]
    valid = ~((same_id & (gc == q_camids[:, None])) | (gp == -1))
    hits = same_id & valid
    pos = torch.cumsum(valid, dim=1, dtype=torch.int32) - 1  # rank among kept results
    num_hits = hits.sum(1)
    has_match = num_hits > 0
    big = torch.iinfo(torch.int32).max
    first = torch.where(hits, pos, big).amin(1)[has_match].clamp(max=max_rank).long()
    first_hit_counts = torch.bincount(first, minlength=max_rank + 1)[:max_rank].cpu()
    precision = torch.cumsum(hits, dim=1, dtype=torch.int32).double() / (pos.double() + 1).clamp(min=1)
    ap = (precision * hits).sum(1) / num_hits.clamp(min=1)
    last = torch.where(hits, pos, -1).amax(1)  # rank of the hardest match (0-based)
    inp = num_hits.double() / (last.double() + 1).clamp(min=1)
    top_idx = top_match = None
    if topk > 0:
        # scatter the first k kept results to columns 0..k-1; everything else lands in column k
        slot = torch.where(valid & (pos < topk), pos, topk).long()
        top_idx = torch.full((dist.shape[0], topk + 1), -1, dtype=torch.long, device=dist.device)
        top_idx.scatter_(1, slot, order)
        top_idx = top_idx[:, :topk]
        top_match = (g_pids[top_idx.clamp(min=0)] == q_pids[:, None]) & (top_idx >= 0)
        top_idx, top_match = top_idx.cpu(), top_match.cpu()
    num_valid = int(has_match.sum())
    return _Stats(
        first_hit_counts, float(ap[has_match].sum()), float(inp[has_match].sum()), num_valid, top_idx, top_match
    )


@dataclass
class RankResult:
    """Outcome of a ranking evaluation.

    Attributes:
        cmc: ``(max_rank,)`` float array, ``cmc[k]`` = rank-(k+1) accuracy.
        mAP: mean average precision over valid queries.
        mINP: mean inverse negative penalty over valid queries (Ye et al.).
        num_queries: queries evaluated.
        num_valid_queries: queries with at least one correct match left in the gallery.
        topk: ``(Q, k)`` gallery indices of each query's first ``k`` results after the protocol's
            removals (``-1`` where fewer remain), when asked for; else ``None``.
        topk_match: ``(Q, k)`` bool, whether each of those results has the query's identity.
    """

    cmc: np.ndarray
    mAP: float
    mINP: float
    num_queries: int
    num_valid_queries: int
    topk: np.ndarray | None = None
    topk_match: np.ndarray | None = None

    def rank(self, k: int) -> float:
        """Rank-``k`` accuracy (``k`` is 1-based: ``rank(1)`` is CMC rank-1)."""
        return float(self.cmc[k - 1])

    def as_dict(self, ranks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
        out = {"mAP": self.mAP, "mINP": self.mINP}
        out.update({f"rank{k}": self.rank(k) for k in ranks if k <= len(self.cmc)})
        return out


def _rank_chunked(
    distances: Callable[[int, int], Tensor],
    num_queries: int,
    q_pids: Tensor,
    g_pids: Tensor,
    q_camids: Tensor,
    g_camids: Tensor,
    max_rank: int,
    chunk_size: int | None,
    topk: int,
) -> RankResult:
    num_gallery = g_pids.numel()
    if num_gallery == 0:
        raise ValueError("the gallery is empty")
    chunk = chunk_size or max(1, _WORKING_SET // max(1, num_gallery))
    counts = torch.zeros(max_rank, dtype=torch.long)
    ap_sum, inp_sum, num_valid = 0.0, 0.0, 0
    tops, matches = [], []
    for a in range(0, num_queries, chunk):
        b = min(num_queries, a + chunk)
        dist = distances(a, b)
        if dist.shape != (b - a, num_gallery):
            raise ValueError(f"distance chunk has shape {tuple(dist.shape)}, expected {(b - a, num_gallery)}")
        dev = dist.device
        s = _chunk_stats(
            dist, q_pids[a:b].to(dev), g_pids.to(dev), q_camids[a:b].to(dev), g_camids.to(dev), max_rank, topk
        )
        counts += s.first_hit_counts
        ap_sum += s.ap_sum
        inp_sum += s.inp_sum
        num_valid += s.num_valid
        if topk > 0:
            tops.append(s.topk)
            matches.append(s.topk_match)
    if num_valid == 0:
        raise ValueError(
            f"none of the {num_queries} queries has a correct match in the gallery (same identity, other camera): "
            "check that query and gallery share identities and that camera ids are right"
        )
    cmc = (counts.cumsum(0).double() / num_valid).numpy()
    return RankResult(
        cmc=cmc,
        mAP=ap_sum / num_valid,
        mINP=inp_sum / num_valid,
        num_queries=num_queries,
        num_valid_queries=num_valid,
        topk=torch.cat(tops).numpy() if topk > 0 else None,
        topk_match=torch.cat(matches).numpy() if topk > 0 else None,
    )


def _ids(q_pids: ArrayLike, g_pids: ArrayLike, q_camids: ArrayLike, g_camids: ArrayLike, nq: int, ng: int):
    ids = [_as_tensor(v, torch.long).reshape(-1) for v in (q_pids, g_pids, q_camids, g_camids)]
    for name, v, n in zip(("q_pids", "g_pids", "q_camids", "g_camids"), ids, (nq, ng, nq, ng)):
        if v.numel() != n:
            raise ValueError(f"{name} has {v.numel()} entries, expected {n}")
    return ids


def rank_distances(
    distmat: ArrayLike,
    q_pids: ArrayLike,
    g_pids: ArrayLike,
    q_camids: ArrayLike,
    g_camids: ArrayLike,
    max_rank: int = 50,
) -> RankResult:
    """CMC, mAP and mINP of a ``(Q, G)`` distance matrix (arguments of :func:`evaluate_rank`).

    Raises ``ValueError`` when no query has a match in the gallery.
    """
    dist = _as_tensor(distmat)
    if dist.dim() != 2:
        raise ValueError(f"distmat must be 2-D (num_query, num_gallery), got shape {tuple(dist.shape)}")
    ids = _ids(q_pids, g_pids, q_camids, g_camids, dist.shape[0], dist.shape[1])
    return _rank_chunked(lambda a, b: dist[a:b], dist.shape[0], *ids, max_rank, None, 0)


def evaluate_rank(
    distmat: ArrayLike,
    q_pids: ArrayLike,
    g_pids: ArrayLike,
    q_camids: ArrayLike,
    g_camids: ArrayLike,
    max_rank: int = 50,
) -> tuple[np.ndarray, float]:
    """CMC and mAP of a query x gallery distance matrix under the Market-1501 protocol.

    Args:
        distmat: ``(Q, G)`` distances (smaller = more similar), numpy or torch.
        q_pids, g_pids: ``(Q,)``, ``(G,)`` identity labels (``-1`` in the gallery = junk, ignored).
        q_camids, g_camids: ``(Q,)``, ``(G,)`` camera ids.
        max_rank: length of the returned CMC curve (a gallery shorter than that is fine: the
            curve stays flat past its end).

    Returns:
        ``(cmc, mAP)``: ``cmc`` a float64 array of shape ``(max_rank,)`` (``cmc[0]`` = rank-1),
        ``mAP`` a float. Raises ``ValueError`` when no query has a match in the gallery.
        :func:`rank_distances` also gives mINP.
    """
    res = rank_distances(distmat, q_pids, g_pids, q_camids, g_camids, max_rank)
    return res.cmc, res.mAP


def rank_embeddings(
    query: Tensor,
    gallery: Tensor,
    q_pids: ArrayLike,
    g_pids: ArrayLike,
    q_camids: ArrayLike,
    g_camids: ArrayLike,
    *,
    metric: Metric = "cosine",
    max_rank: int = 50,
    chunk_size: int | None = None,
    rerank: bool = False,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
    topk: int = 0,
    aqe: bool = False,
    aqe_times: int = 1,
    aqe_k: int = 5,
    aqe_alpha: float = 3.0,
) -> RankResult:
    """Evaluate embeddings ``(Q, D)`` against ``(G, D)`` without building the full distance matrix.

    Distances are computed ``chunk_size`` queries at a time (default: a chunk of about four
    million distances), on the embeddings' device. With ``rerank=True`` the distances are the
    k-reciprocal re-ranked ones (Zhong et al. 2017, :func:`~vggbackbone.metrics.rerank.KReciprocalReRanker`)
    with ``k1``, ``k2``, ``lambda_value``. ``aqe=True`` first replaces query and gallery embeddings
    by their average query expansion (:func:`~vggbackbone.metrics.query_expansion.average_query_expansion`
    with ``aqe_times``, ``aqe_k``, ``aqe_alpha``), then ranks them with ``metric`` and ``rerank``
    as without it (fast-reid's order). ``topk > 0`` also returns each query's first ``topk``
    kept results (for retrieval pictures).
    """
    if query.dim() != 2 or gallery.dim() != 2 or query.shape[1] != gallery.shape[1]:
        raise ValueError(
            f"query and gallery must be (N, D) with the same D, got {tuple(query.shape)}, {tuple(gallery.shape)}"
        )
    ids = _ids(q_pids, g_pids, q_camids, g_camids, query.shape[0], gallery.shape[0])
    query, gallery = query.float(), gallery.float()
    if aqe:
        query, gallery = average_query_expansion(query, gallery, times=aqe_times, k=aqe_k, alpha=aqe_alpha)
    if rerank:
        ranker = KReciprocalReRanker(query, gallery, metric=metric, k1=k1, k2=k2, lambda_value=lambda_value)
        dist_fn = ranker.distances
    else:
        if metric == "cosine":  # normalise once, not per chunk
            query, gallery = F.normalize(query, dim=1), F.normalize(gallery, dim=1)

        def dist_fn(a: int, b: int) -> Tensor:
            if metric == "cosine":
                return 1.0 - query[a:b] @ gallery.T
            return compute_distance(query[a:b], gallery, metric)

    with torch.no_grad():
        return _rank_chunked(dist_fn, query.shape[0], *ids, max_rank, chunk_size, topk)
