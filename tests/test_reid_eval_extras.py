"""ReID evaluation extras: mINP on a hand-computed distance matrix, average query expansion (AQE)
against hand-computed embeddings and against fast-reid's loop, AQE composed with both distances
and with re-ranking, and the task options reaching the ranking."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cli_configs import quick_trainer, write_config

from tasks.data.market import MarketConfig, generate_market
from vggbackbone.metrics import (
    KReciprocalReRanker,
    average_query_expansion,
    compute_distance,
    evaluate_rank,
    rank_distances,
    rank_embeddings,
)

# 4 queries x 6 gallery images. Gallery 1 is query 0's identity seen by query 0's camera (removed
# for it), gallery 4 is junk (-1), query 3 (identity 9) has no match and is not counted.
Q_PIDS, Q_CAMS = np.array([1, 2, 3, 9]), np.array([0, 0, 0, 0])
G_PIDS, G_CAMS = np.array([1, 1, 2, 2, -1, 3]), np.array([1, 0, 1, 1, 1, 1])
DIST = np.array([
    [0.5, 0.1, 0.2, 0.9, 0.05, 0.7],  # kept: g2 g0* g5 g3        AP 1/2          INP 1/2
    [0.3, 0.4, 0.6, 0.1, 0.2, 0.8],   # kept: g3* g0 g1 g2* g5    AP (1 + 2/4)/2  INP 2/4
    [0.2, 0.3, 0.4, 0.5, 0.6, 0.1],   # kept: g5* g0 g1 g2 g3     AP 1            INP 1
    [0.1, 0.1, 0.1, 0.1, 0.1, 0.1],   # no match: skipped
])  # fmt: skip


def test_minp_cmc_map_by_hand():
    """Numbers as fast-reid's ``evaluate_rank`` (``INP = cmc[last] / (last + 1)``) gives them."""
    res = rank_distances(DIST, Q_PIDS, G_PIDS, Q_CAMS, G_CAMS, max_rank=3)
    np.testing.assert_allclose(res.cmc, [2 / 3, 1.0, 1.0])
    assert res.mAP == pytest.approx((1 / 2 + 3 / 4 + 1) / 3)
    assert res.mINP == pytest.approx((1 / 2 + 2 / 4 + 1) / 3)
    assert (res.num_queries, res.num_valid_queries) == (4, 3)
    assert res.as_dict() == pytest.approx({"mAP": 0.75, "mINP": 2 / 3, "rank1": 2 / 3})
    cmc, mAP = evaluate_rank(torch.from_numpy(DIST), Q_PIDS, G_PIDS, Q_CAMS, G_CAMS, max_rank=3)  # the old API
    np.testing.assert_allclose(cmc, res.cmc)
    assert mAP == res.mAP


def test_minp_of_chunked_embeddings_equals_the_distance_matrix():
    g = torch.Generator().manual_seed(3)
    q, gal = torch.randn(9, 4, generator=g), torch.randn(30, 4, generator=g)
    q_pids, g_pids = torch.arange(9) % 4, torch.arange(30) % 5
    q_cams, g_cams = torch.zeros(9, dtype=torch.long), torch.arange(30) % 2
    ref = rank_distances(compute_distance(q, gal, "euclidean"), q_pids, g_pids, q_cams, g_cams)
    res = rank_embeddings(q, gal, q_pids, g_pids, q_cams, g_cams, metric="euclidean", chunk_size=2)
    assert res.mINP == pytest.approx(ref.mINP) and res.mAP == pytest.approx(ref.mAP)
    assert 0 < res.mINP < res.mAP  # the hardest match ranks below the average one here


def fastreid_aqe(query_feat, gallery_feat, qe_times=1, qe_k=10, alpha=3.0):
    """fast-reid's ``fastreid/evaluation/query_expansion.py`` ``aqe``, row by row with numpy."""
    num_query = query_feat.shape[0]
    all_feat = torch.cat((query_feat, gallery_feat), dim=0)
    norm_feat = F.normalize(all_feat, p=2, dim=1)
    all_feat = all_feat.numpy()
    for _ in range(qe_times):
        rows = []
        for sim in torch.mm(norm_feat, norm_feat.t()).numpy():
            init_rank = np.argpartition(-sim, range(1, qe_k + 1))
            weights = np.power(sim[init_rank[:qe_k]].reshape((-1, 1)), alpha)
            rows.append(np.mean(all_feat[init_rank[:qe_k], :] * weights, axis=0))
        all_feat = np.stack(rows, axis=0)
        norm_feat = F.normalize(torch.from_numpy(all_feat), p=2, dim=1)
    return torch.from_numpy(all_feat[:num_query]), torch.from_numpy(all_feat[num_query:])


def test_aqe_by_hand():
    """Normalised: q0 (1,0), q1 (0,1), g0 (0.6,0.8); 2 neighbours (itself and the nearest), weights sim^3."""
    q, g = torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.tensor([[3.0, 4.0]])
    eq, eg = average_query_expansion(q, g, k=2, alpha=3.0)
    # q0: ([1,0] + 0.6^3 [3,4]) / 2; q1: ([0,2] + 0.8^3 [3,4]) / 2; g0: ([3,4] + 0.8^3 [0,2]) / 2
    torch.testing.assert_close(eq, torch.tensor([[0.824, 0.432], [0.768, 2.024]]))
    torch.testing.assert_close(eg, torch.tensor([[1.5, 2.512]]))


@pytest.mark.parametrize("times", [1, 2])
def test_aqe_equals_fastreid_in_chunks(times):
    g = torch.Generator().manual_seed(0)
    q, gal = torch.randn(7, 5, generator=g), torch.randn(13, 5, generator=g)
    ref_q, ref_g = fastreid_aqe(q, gal, qe_times=times, qe_k=4, alpha=3.0)
    eq, eg = average_query_expansion(q, gal, times=times, k=4, alpha=3.0, chunk_size=3)
    torch.testing.assert_close(eq, ref_q.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(eg, ref_g.float(), rtol=1e-5, atol=1e-6)


def test_aqe_refuses_bad_options_and_non_finite_results():
    q, g = torch.tensor([[1.0, 0.0]]), torch.tensor([[-1.0, 0.1]])
    with pytest.raises(ValueError, match="times >= 1 and k >= 1"):
        average_query_expansion(q, g, k=0)
    with pytest.raises(ValueError, match=r"non-finite embeddings \(alpha=2.5"):
        average_query_expansion(q, g, k=2, alpha=2.5)  # (-0.995)^2.5 is NaN


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.parametrize("rerank", [False, True])
def test_aqe_composes_with_both_distances_and_re_ranking(metric, rerank):
    """``aqe=True``: the same ranking as expanding first, then distances (or re-ranking) as usual."""
    g = torch.Generator().manual_seed(2)
    q, gal = torch.randn(6, 4, generator=g), torch.randn(20, 4, generator=g)
    ids = (torch.arange(6) % 3, torch.arange(20) % 4, torch.zeros(6, dtype=torch.long), torch.arange(20) % 2)
    eq, eg = average_query_expansion(q, gal, k=3, alpha=3.0)
    if rerank:
        dist = KReciprocalReRanker(eq, eg, metric=metric, k1=5, k2=2).distances(0, 6)
    else:
        dist = compute_distance(eq, eg, metric)
    ref = rank_distances(dist, *ids)
    res = rank_embeddings(q, gal, *ids, metric=metric, rerank=rerank, k1=5, k2=2, aqe=True, aqe_k=3)
    np.testing.assert_allclose(res.cmc, ref.cmc)
    assert (res.mAP, res.mINP) == pytest.approx((ref.mAP, ref.mINP))
    plain = rank_embeddings(q, gal, *ids, metric=metric, rerank=rerank, k1=5, k2=2)
    assert (plain.mAP, plain.mINP) != pytest.approx((res.mAP, res.mINP))  # the option changes the ranking


def test_task_options_reach_the_ranking_and_the_metrics_file(tmp_path: Path, monkeypatch):
    """``validate --model.aqe true --model.distance euclidean --model.rerank true``: all applied,
    mINP in the metrics file next to mAP and CMC."""
    import tasks.reid_eval
    from tasks.reid import main

    seen: dict = {}

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return rank_embeddings(*args, **kwargs)

    monkeypatch.setattr(tasks.reid_eval, "rank_embeddings", spy)
    market = MarketConfig(num_train_ids=4, num_test_ids=4, num_cameras=2, min_cameras=2, max_cameras=2,
                          max_per_camera=2, num_distractors=1, num_junk=1, height=32, width=16, seed=5)  # fmt: skip
    root = generate_market(tmp_path / "market", market, progress=False)
    cfg = write_config({
        "seed_everything": 0,
        "trainer": quick_trainer(tmp_path, logger="reid"),
        "model": {"arch": "vgg11_bn", "width_mult": 0.125, "grid_queries": 0, "rerank_k1": 4, "rerank_k2": 2},
        "data": {"root": str(root), "image_size": [32, 16], "eval_batch_size": 8, "num_workers": 0},
    }, tmp_path / "reid.yaml")  # fmt: skip
    main(["validate", "--config", str(cfg), "--model.aqe", "true", "--model.aqe_k", "3",
          "--model.distance", "euclidean", "--model.rerank", "true"])  # fmt: skip
    assert {k: seen[k] for k in ("aqe", "aqe_times", "aqe_k", "aqe_alpha", "metric", "rerank", "k1")} == {
        "aqe": True, "aqe_times": 1, "aqe_k": 3, "aqe_alpha": 3.0, "metric": "euclidean", "rerank": True, "k1": 4
    }  # fmt: skip
    (metrics_file,) = (tmp_path / "runs").rglob("val_metrics.json")
    metrics = json.loads(metrics_file.read_text())
    flat = {k.split("/")[-1]: v for k, v in metrics.items()}
    assert 0 < flat["mINP"] <= 1 and flat["aqe"] is True and flat["distance"] == "euclidean"
