"""k-reciprocal re-ranking (Zhong et al., "Re-ranking Person Re-identification with k-reciprocal
Encoding", CVPR 2017), sparse, so it scales to galleries of tens of thousands of images.

The reference implementation builds and sorts the full ``(Q+G) x (Q+G)`` distance matrix and a
dense ``V``: 20k + 3k images need several GB and an N^2 log N sort. Every quantity of the method
only needs each image's ``k1 + 1`` nearest neighbours, so here:

* the k-NN graph comes from faiss (exact ``IndexFlatL2``; torch top-k when faiss is missing or
  the features live on a GPU),
* the row maxima that normalise distances are a chunked reduction,
* ``V`` (the k-reciprocal encoding) and its query expansion are torch sparse matrices,
* the Jaccard distance is computed one chunk of queries at a time from the sparse ``V``.

The result equals the reference's ``final_dist`` (up to float rounding and tie order among
equidistant neighbours). Distances are squared euclidean on the features, on L2-normalised
features for the cosine metric (``2 - 2 cos``), as in the paper.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .distance import squared_euclidean

__all__ = ["KReciprocalReRanker", "knn"]

_CHUNK_ELEMS = 8_000_000


def knn(x: Tensor, k: int, *, use_faiss: bool | None = None) -> Tensor:
    """Indices ``(N, k)`` of each row's ``k`` nearest rows of ``x`` (itself included), nearest first.

    Exact search: faiss ``IndexFlatL2`` for CPU tensors when faiss is installed (``use_faiss``
    ``None`` = when available), else chunked torch distances + ``topk``.
    """
    n = x.shape[0]
    k = min(k, n)
    if use_faiss is None:
        use_faiss = x.device.type == "cpu"
    if use_faiss:
        try:
            import faiss
        except ImportError:
            use_faiss = False
    if use_faiss:
        xs = np.ascontiguousarray(x.detach().cpu().float().numpy())
        index = faiss.IndexFlatL2(xs.shape[1])
        index.add(xs)
        _, idx = index.search(xs, k)
        return torch.from_numpy(idx).long().to(x.device)
    chunk = max(1, _CHUNK_ELEMS // max(1, n))
    return torch.cat(
        [squared_euclidean(x[a : a + chunk], x).topk(k, dim=1, largest=False).indices for a in range(0, n, chunk)]
    )


def _k_reciprocal(ranks: Tensor, k: int, rows: slice) -> Tensor:
    """``R(i, k)`` for rows ``i`` in ``rows``: forward neighbours of ``i`` that have ``i`` in their
    own top ``k+1`` (``(n, k+1)`` indices, ``-1`` where not reciprocal)."""
    fwd = ranks[rows, : k + 1]
    bwd = ranks[fwd][:, :, : k + 1]
    me = torch.arange(rows.start, rows.stop, device=ranks.device)[:, None, None]
    return torch.where((bwd == me).any(-1), fwd, -1)


def _unique_rows(idx: Tensor) -> Tensor:
    """Sort each row and replace duplicates by ``-1`` (``-1`` entries stay ``-1``)."""
    s, _ = idx.sort(dim=1)
    dup = torch.zeros_like(s, dtype=torch.bool)
    dup[:, 1:] = s[:, 1:] == s[:, :-1]
    return torch.where(dup, -1, s)


class KReciprocalReRanker:
    """Re-ranked query x gallery distances, produced one chunk of queries at a time.

    Args:
        query: ``(Q, D)`` query features.
        gallery: ``(G, D)`` gallery features.
        metric: ``"cosine"`` (features are L2-normalised first) or ``"euclidean"``.
        k1, k2, lambda_value: the paper's parameters (20, 6, 0.3 on Market-1501).

    ``distances(a, b)`` returns the final distances ``(b - a, G)`` of queries ``a..b-1``:
    ``(1 - lambda) * jaccard + lambda * d(q, g) / max_j d(q, j)``.
    """

    def __init__(
        self,
        query: Tensor,
        gallery: Tensor,
        *,
        metric: str = "cosine",
        k1: int = 20,
        k2: int = 6,
        lambda_value: float = 0.3,
    ) -> None:
        if k1 < 1 or k2 < 1:
            raise ValueError(f"k1 and k2 must be >= 1, got k1={k1}, k2={k2}")
        feats = torch.cat([query, gallery]).float()
        if metric == "cosine":
            feats = F.normalize(feats, dim=1)
        elif metric != "euclidean":
            raise ValueError(f"metric must be 'cosine' or 'euclidean', got {metric!r}")
        self.feats = feats
        self.num_query = query.shape[0]
        self.lambda_value = lambda_value
        n = feats.shape[0]
        k1 = min(k1, n - 1)
        k2 = min(k2, k1 + 1)
        kh = round(k1 / 2)  # the reference's np.around (round half to even)

        with torch.no_grad():
            step = max(1, _CHUNK_ELEMS // n)
            # the reference divides each row of the distance matrix by its maximum over all images
            self.row_max = torch.cat([squared_euclidean(feats[a : a + step], feats).amax(1) for a in range(0, n, step)])
            self.row_max.clamp_(min=1e-12)
            ranks = knn(feats, k1 + 1)
            v_rows, v_cols, v_vals = self._encode(ranks, n, k1, kh)
            v = torch.sparse_coo_tensor(
                torch.stack([v_rows, v_cols]), v_vals, (n, n), check_invariants=False
            ).coalesce()
            if k2 > 1:  # local query expansion: average V over each image's k2 nearest neighbours
                rows = torch.arange(n, device=feats.device).repeat_interleave(k2)
                avg = torch.sparse_coo_tensor(
                    torch.stack([rows, ranks[:, :k2].reshape(-1)]),
                    torch.full((n * k2,), 1.0 / k2, device=feats.device),
                    (n, n),
                    check_invariants=False,
                ).coalesce()
                with warnings.catch_warnings():  # "sparse CSR support is in beta", used internally
                    warnings.filterwarnings("ignore", message=".*Sparse CSR tensor support.*")
                    v = torch.sparse.mm(avg, v).coalesce()
        r, c = v.indices()
        # coalesced COO is sorted by row: row_ptr[i] is where row i starts (a CSR index by hand)
        self.row_ptr = torch.searchsorted(r, torch.arange(n + 1, device=r.device))
        self.v_cols, self.v_vals = c, v.values()
        gal = r >= self.num_query
        self.g_rows, self.g_cols, self.g_vals = r[gal] - self.num_query, c[gal], v.values()[gal]

    def _encode(self, ranks: Tensor, n: int, k1: int, kh: int) -> tuple[Tensor, Tensor, Tensor]:
        """Sparse ``V``: row ``i`` holds Gaussian weights over ``i``'s expanded k-reciprocal set."""
        rows, cols, vals = [], [], []
        width = (k1 + 1) * (kh + 2)
        step = max(1, _CHUNK_ELEMS // (width * (k1 + 1)))
        r_half = _k_reciprocal(ranks, kh, slice(0, n))  # (n, kh+1)
        for a in range(0, n, step):
            sl = slice(a, min(n, a + step))
            r = _k_reciprocal(ranks, k1, sl)  # (c, k1+1)
            cand = torch.where((r >= 0)[..., None], r_half[r.clamp(min=0)], -1)  # (c, k1+1, kh+1): R(cand, k1/2)
            in_r = ((cand[..., None] == r[:, None, None, :]) & (cand >= 0)[..., None]).any(-1)
            size = (cand >= 0).sum(-1)
            keep = in_r.sum(-1) > (2.0 / 3.0) * size  # candidate set mostly inside R(i, k1)
            expansion = torch.cat([r, torch.where(keep[..., None], cand, -1).flatten(1)], dim=1)
            expansion = _unique_rows(expansion)
            ok = expansion >= 0
            i_idx = torch.arange(sl.start, sl.stop, device=ranks.device)[:, None].expand_as(expansion)[ok]
            j_idx = expansion[ok]
            # squared distances of the pairs, a few at a time (each pair gathers two D-vectors)
            pair_step = max(1, _CHUNK_ELEMS // self.feats.shape[1])
            d = torch.cat([
                ((self.feats[i_idx[s : s + pair_step]] - self.feats[j_idx[s : s + pair_step]]) ** 2).sum(1)
                for s in range(0, len(i_idx), pair_step)
            ]) / self.row_max[i_idx]  # fmt: skip
            w = torch.exp(-d)
            denom = torch.zeros(sl.stop - sl.start, device=w.device).index_add_(0, i_idx - sl.start, w)
            rows.append(i_idx)
            cols.append(j_idx)
            vals.append(w / denom[i_idx - sl.start])
        return torch.cat(rows), torch.cat(cols), torch.cat(vals)

    def distances(self, a: int, b: int) -> Tensor:
        """Re-ranked distances ``(b - a, G)`` of queries ``a..b-1`` to the whole gallery."""
        q = self.num_query
        g = self.feats.shape[0] - q
        with torch.no_grad():
            ptr = self.row_ptr
            lo, hi = int(ptr[a]), int(ptr[b])
            vq = torch.zeros(b - a, self.feats.shape[0], device=self.feats.device)
            local_rows = torch.repeat_interleave(torch.arange(b - a, device=vq.device), ptr[a + 1 : b + 1] - ptr[a:b])
            vq[local_rows, self.v_cols[lo:hi]] = self.v_vals[lo:hi]
            support = vq.any(0)
            sel = support[self.g_cols]
            cols, rows, vals = self.g_cols[sel], self.g_rows[sel], self.g_vals[sel]
            temp_min = torch.zeros(b - a, g, device=vq.device)
            step = max(1, _CHUNK_ELEMS // max(1, b - a))
            for s in range(0, cols.numel(), step):
                mins = torch.minimum(vq[:, cols[s : s + step]], vals[s : s + step])
                temp_min.index_add_(1, rows[s : s + step], mins)
            jaccard = 1.0 - temp_min / (2.0 - temp_min)
            original = squared_euclidean(self.feats[a:b], self.feats[q:]) / self.row_max[a:b, None]
            return (1.0 - self.lambda_value) * jaccard + self.lambda_value * original
