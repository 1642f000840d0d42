"""Market-1501 ranking metrics and k-reciprocal re-ranking against hand-computed answers and
straightforward dense reference implementations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vggbackbone.metrics import KReciprocalReRanker, compute_distance, evaluate_rank, rank_embeddings
from vggbackbone.metrics.rerank import knn


# ----------------------------------------------------------------------------- references
def reference_eval_market(distmat, q_pids, g_pids, q_camids, g_camids, max_rank):
    """The benchmark's loop, query by query (torchreid's eval_market1501, plus junk -1 removal; INP as
    fast-reid's evaluate_rank: matches / (position of the last match + 1))."""
    indices = np.argsort(distmat, axis=1, kind="stable")
    cmcs, aps, inps = [], [], []
    for i in range(distmat.shape[0]):
        order = indices[i]
        remove = ((g_pids[order] == q_pids[i]) & (g_camids[order] == q_camids[i])) | (g_pids[order] == -1)
        raw = (g_pids[order] == q_pids[i])[~remove].astype(np.int64)
        if not raw.any():
            continue
        cmc = raw.cumsum()
        last = np.max(np.where(raw == 1))
        inps.append(cmc[last] / (last + 1.0))
        cmc[cmc > 1] = 1
        cmc = np.concatenate([cmc, np.full(max(0, max_rank - len(cmc)), cmc[-1])])
        cmcs.append(cmc[:max_rank])
        prec = raw.cumsum() / (np.arange(len(raw)) + 1.0)
        aps.append((prec * raw).sum() / raw.sum())
    return np.mean(cmcs, 0), float(np.mean(aps)), float(np.mean(inps))


def reference_re_ranking(q_g_dist, q_q_dist, g_g_dist, k1=20, k2=6, lambda_value=0.3):
    """Zhong et al.'s dense implementation (as shipped in torchreid), inputs are euclidean distances."""
    original_dist = np.concatenate(
        [np.concatenate([q_q_dist, q_g_dist], axis=1), np.concatenate([q_g_dist.T, g_g_dist], axis=1)], axis=0
    )
    original_dist = np.power(original_dist, 2).astype(np.float64)
    original_dist = np.transpose(1.0 * original_dist / np.max(original_dist, axis=0))
    V = np.zeros_like(original_dist)
    initial_rank = np.argsort(original_dist, kind="stable").astype(np.int32)
    query_num = q_g_dist.shape[0]
    all_num = original_dist.shape[0]
    for i in range(all_num):
        forward_k_neigh_index = initial_rank[i, : k1 + 1]
        backward_k_neigh_index = initial_rank[forward_k_neigh_index, : k1 + 1]
        fi = np.where(backward_k_neigh_index == i)[0]
        k_reciprocal_index = forward_k_neigh_index[fi]
        k_reciprocal_expansion_index = k_reciprocal_index
        for candidate in k_reciprocal_index:
            candidate_forward_k_neigh_index = initial_rank[candidate, : int(np.around(k1 / 2.0)) + 1]
            candidate_backward_k_neigh_index = initial_rank[
                candidate_forward_k_neigh_index, : int(np.around(k1 / 2.0)) + 1
            ]
            fi_candidate = np.where(candidate_backward_k_neigh_index == candidate)[0]
            candidate_k_reciprocal_index = candidate_forward_k_neigh_index[fi_candidate]
            if len(np.intersect1d(candidate_k_reciprocal_index, k_reciprocal_index)) > 2.0 / 3 * len(
                candidate_k_reciprocal_index
            ):
                k_reciprocal_expansion_index = np.append(k_reciprocal_expansion_index, candidate_k_reciprocal_index)
        k_reciprocal_expansion_index = np.unique(k_reciprocal_expansion_index)
        weight = np.exp(-original_dist[i, k_reciprocal_expansion_index])
        V[i, k_reciprocal_expansion_index] = 1.0 * weight / np.sum(weight)
    original_dist = original_dist[:query_num,]
    if k2 != 1:
        V_qe = np.zeros_like(V)
        for i in range(all_num):
            V_qe[i, :] = np.mean(V[initial_rank[i, :k2], :], axis=0)
        V = V_qe
    invIndex = [np.where(V[:, i] != 0)[0] for i in range(all_num)]
    jaccard_dist = np.zeros_like(original_dist)
    for i in range(query_num):
        temp_min = np.zeros(shape=[1, all_num])
        indNonZero = np.where(V[i, :] != 0)[0]
        indImages = [invIndex[ind] for ind in indNonZero]
        for j in range(len(indNonZero)):
            temp_min[0, indImages[j]] = temp_min[0, indImages[j]] + np.minimum(
                V[i, indNonZero[j]], V[indImages[j], indNonZero[j]]
            )
        jaccard_dist[i] = 1 - temp_min / (2.0 - temp_min)
    final_dist = jaccard_dist * (1 - lambda_value) + original_dist * lambda_value
    return final_dist[:query_num, query_num:]


# ----------------------------------------------------------------------------- hand-made cases
def test_same_camera_matches_are_removed_and_ap_by_hand():
    # one query, identity 1 seen by camera 0
    # gallery ranked by distance: [id1 cam0 (removed), id2, id1 cam1, id3, id1 cam2]
    dist = np.array([[0.1, 0.2, 0.3, 0.4, 0.5]])
    g_pids = np.array([1, 2, 1, 3, 1])
    g_cams = np.array([0, 1, 1, 2, 2])
    cmc, mAP = evaluate_rank(dist, np.array([1]), g_pids, np.array([0]), g_cams, max_rank=4)
    # kept ranking: id2, id1, id3, id1 -> first match at rank 2; AP = (1/2 + 2/4) / 2
    np.testing.assert_allclose(cmc, [0, 1, 1, 1])
    assert mAP == pytest.approx(0.5)
    # the same gallery image from another camera counts: rank-1 and AP = (1 + 2/3 + 3/5) / 3
    cmc, mAP = evaluate_rank(dist, np.array([1]), g_pids, np.array([5]), g_cams, max_rank=4)
    np.testing.assert_allclose(cmc, [1, 1, 1, 1])
    assert mAP == pytest.approx((1 + 2 / 3 + 3 / 5) / 3)


def test_junk_distractors_unmatched_queries_and_short_gallery():
    # gallery: junk (-1) nearest, a distractor (0), then the true match
    dist = np.array([[0.0, 0.1, 0.2], [0.3, 0.2, 0.1], [0.1, 0.2, 0.3]])
    g_pids = np.array([-1, 0, 7])
    g_cams = np.array([1, 1, 1])
    q_pids = np.array([7, 7, 9])  # identity 9 is not in the gallery: skipped
    q_cams = np.array([0, 0, 0])
    cmc, mAP = evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams, max_rank=5)
    # query 0: kept ranking [0, 7] -> rank 2, AP 1/2; query 1: [7, 0] -> rank 1, AP 1
    np.testing.assert_allclose(cmc, [0.5, 1, 1, 1, 1])  # flat past the end of the gallery
    assert mAP == pytest.approx(0.75)
    # a query whose only match is in its own camera has no valid match either
    with pytest.raises(ValueError, match="none of the 1 queries"):
        evaluate_rank(dist[:1], np.array([7]), g_pids, np.array([1]), g_cams)
    with pytest.raises(ValueError, match="g_pids has 2 entries"):
        evaluate_rank(dist, q_pids, g_pids[:2], q_cams, g_cams)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_chunked_embeddings_equal_reference_on_random_data(metric):
    g = torch.Generator().manual_seed(1)
    q, gal = torch.randn(37, 8, generator=g), torch.randn(101, 8, generator=g)
    q_pids, g_pids = torch.randint(0, 12, (37,), generator=g), torch.randint(-1, 12, (101,), generator=g)
    q_cams, g_cams = torch.randint(0, 3, (37,), generator=g), torch.randint(0, 3, (101,), generator=g)
    dist = compute_distance(q, gal, metric)
    if metric == "euclidean":
        torch.testing.assert_close(dist, torch.cdist(q, gal), atol=1e-4, rtol=1e-4)
    else:
        torch.testing.assert_close(
            dist, 1 - torch.nn.functional.cosine_similarity(q[:, None], gal[None], dim=2), atol=1e-5, rtol=1e-5
        )
    ref_cmc, ref_map, ref_minp = reference_eval_market(
        dist.numpy(), *(t.numpy() for t in (q_pids, g_pids, q_cams, g_cams)), 20
    )
    cmc, mAP = evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams, max_rank=20)
    np.testing.assert_allclose(cmc, ref_cmc)
    assert mAP == pytest.approx(ref_map)
    res = rank_embeddings(q, gal, q_pids, g_pids, q_cams, g_cams, metric=metric, max_rank=20, chunk_size=5, topk=4)
    np.testing.assert_allclose(res.cmc, ref_cmc)
    assert res.mAP == pytest.approx(ref_map)
    assert res.mINP == pytest.approx(ref_minp)
    # top-k lists are the nearest kept gallery images, in order
    for i in range(37):
        order = torch.argsort(dist[i], stable=True)
        kept = [int(j) for j in order if g_pids[j] != -1 and not (g_pids[j] == q_pids[i] and g_cams[j] == q_cams[i])]
        assert res.topk[i].tolist() == kept[:4]
        assert res.topk_match[i].tolist() == [bool(g_pids[j] == q_pids[i]) for j in kept[:4]]


# ----------------------------------------------------------------------------- re-ranking
def test_knn_faiss_matches_torch():
    x = torch.randn(50, 6, generator=torch.Generator().manual_seed(2))
    a, b = knn(x, 7, use_faiss=True), knn(x, 7, use_faiss=False)
    assert torch.equal(a, b)
    assert torch.equal(a[:, 0], torch.arange(50))  # each point is its own nearest neighbour


@pytest.mark.parametrize("k1,k2", [(6, 3), (5, 1)])
def test_sparse_re_ranking_equals_dense_reference(k1, k2):
    g = torch.Generator().manual_seed(3)
    q, gal = torch.randn(9, 5, generator=g, dtype=torch.float64), torch.randn(30, 5, generator=g, dtype=torch.float64)
    ref = reference_re_ranking(
        torch.cdist(q, gal).numpy(), torch.cdist(q, q).numpy(), torch.cdist(gal, gal).numpy(), k1, k2, 0.3
    )
    ranker = KReciprocalReRanker(q, gal, metric="euclidean", k1=k1, k2=k2, lambda_value=0.3)
    got = torch.cat([ranker.distances(a, min(9, a + 4)) for a in range(0, 9, 4)]).numpy()
    np.testing.assert_allclose(got, ref, atol=1e-5)
    assert not np.allclose(got, torch.cdist(q, gal).numpy() ** 2)  # it did re-rank


def test_re_ranking_fixes_a_non_reciprocal_nearest_neighbour():
    # 2-D toy: the query's identity is a tight cluster at distance ~1; a single image of another
    # identity sits nearer (0.8) but its own neighbours are its cluster-mates, not the query, so
    # it is not a k-reciprocal neighbour of the query and re-ranking pushes it down.
    g = torch.Generator().manual_seed(0)

    def cluster(centre, n=5):
        return torch.tensor(centre) + 0.05 * torch.randn(n, 2, generator=g)

    gal = torch.cat([cluster([1.0, 0.0]), torch.tensor([[-0.8, 0.0]]), cluster([-1.3, 0.0]), cluster([0.0, 5.0])])
    g_pids = torch.tensor([1] * 5 + [2] + [3] * 5 + [4] * 5)
    q, q_pids = torch.zeros(1, 2), torch.tensor([1])
    q_cams, g_cams = torch.zeros(1, dtype=torch.long), torch.ones(16, dtype=torch.long)
    kw = dict(metric="euclidean", max_rank=5, topk=6)
    plain = rank_embeddings(q, gal, q_pids, g_pids, q_cams, g_cams, **kw)
    rr = rank_embeddings(q, gal, q_pids, g_pids, q_cams, g_cams, rerank=True, k1=6, k2=3, **kw)
    assert plain.topk[0, 0] == 5 and plain.rank(1) == 0.0
    assert plain.mAP == pytest.approx((1 / 2 + 2 / 3 + 3 / 4 + 4 / 5 + 5 / 6) / 5)
    assert rr.rank(1) == 1.0 and rr.mAP == pytest.approx(1.0)
    assert set(rr.topk[0, :5].tolist()) == {0, 1, 2, 3, 4}
