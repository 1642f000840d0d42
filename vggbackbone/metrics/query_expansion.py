"""Average query expansion (AQE) of ReID embeddings, as fast-reid's ``TEST.AQE``.

Every query and gallery embedding is replaced by the mean of its ``k`` nearest embeddings
(itself included, by cosine similarity over query and gallery together), each weighted by its
similarity raised to ``alpha`` ("alpha query expansion", Radenović et al. 2018, after Chum et
al. 2007); ``times`` rounds. This is fast-reid's ``fastreid/evaluation/query_expansion.py``
``aqe(query, gallery, qe_times, qe_k, alpha)``, computed with a top-k one chunk of rows at a time
instead of a full ``(Q+G)^2`` similarity matrix and a Python loop per row (neither torchreid nor
any installed library offers it as a function on tensors, hence this module). The expanded
embeddings are then ranked as usual (any distance, with or without re-ranking).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["average_query_expansion"]

_CHUNK_ELEMS = 4_000_000


def average_query_expansion(
    query: Tensor,
    gallery: Tensor,
    *,
    times: int = 1,
    k: int = 5,
    alpha: float = 3.0,
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Expanded ``(Q, D)`` query and ``(G, D)`` gallery embeddings (float32, on the inputs' device).

    Args:
        query, gallery: ``(Q, D)`` and ``(G, D)`` embeddings (not necessarily normalised: the
            neighbours' raw embeddings are averaged, the similarities use normalised ones).
        times: rounds of expansion (fast-reid's ``QE_TIME``, 1).
        k: neighbours averaged, the embedding itself included (``QE_K``, 5); capped at ``Q + G``.
        alpha: exponent of the similarity weights (``ALPHA``, 3.0).
        chunk_size: rows per similarity chunk (default: about four million similarities).

    Raises ``ValueError`` for ``times < 1``, ``k < 1``, or a non-finite result (a fractional
    ``alpha`` with negative similarities).
    """
    if times < 1 or k < 1:
        raise ValueError(f"query expansion needs times >= 1 and k >= 1, got times={times}, k={k}")
    if query.dim() != 2 or gallery.dim() != 2 or query.shape[1] != gallery.shape[1]:
        raise ValueError(
            f"query and gallery must be (N, D) with the same D, got {tuple(query.shape)}, {tuple(gallery.shape)}"
        )
    feats = torch.cat([query, gallery]).float()
    n = feats.shape[0]
    k = min(k, n)
    chunk = chunk_size or max(1, _CHUNK_ELEMS // max(1, n))
    with torch.no_grad():
        for _ in range(times):
            normed = F.normalize(feats, dim=1)
            out = torch.empty_like(feats)
            for a in range(0, n, chunk):
                sims, idx = (normed[a : a + chunk] @ normed.T).topk(k, dim=1)
                weights = sims.pow(alpha)
                out[a : a + chunk] = torch.einsum("ck,ckd->cd", weights, feats[idx]) / k
            feats = out
    if not torch.isfinite(feats).all():
        raise ValueError(
            f"average query expansion gave non-finite embeddings (alpha={alpha}: a fractional power of a "
            "negative similarity, or non-finite inputs): use an integer alpha"
        )
    return feats[: query.shape[0]], feats[query.shape[0] :]
