"""Metrics that are not Lightning-specific (plain torch/numpy): detection, ReID ranking."""

from .detection import COCO_STATS, coco_evaluate, detections_to_coco, voc_ap, voc_evaluate
from .rank import RankResult, compute_distance, evaluate_rank, rank_embeddings
from .rerank import KReciprocalReRanker

__all__ = [
    "COCO_STATS",
    "KReciprocalReRanker",
    "RankResult",
    "coco_evaluate",
    "compute_distance",
    "detections_to_coco",
    "evaluate_rank",
    "rank_embeddings",
    "voc_ap",
    "voc_evaluate",
]
