"""Metrics that are not Lightning-specific (plain torch/numpy)."""

from .rank import RankResult, compute_distance, evaluate_rank, rank_embeddings
from .rerank import KReciprocalReRanker

__all__ = ["KReciprocalReRanker", "RankResult", "compute_distance", "evaluate_rank", "rank_embeddings"]
