"""Metrics that are not Lightning-specific (plain torch/numpy): detection, segmentation, ReID."""

from .detection import COCO_STATS, coco_backend, coco_evaluate, detections_to_coco, voc_ap, voc_evaluate
from .query_expansion import average_query_expansion
from .rank import RankResult, compute_distance, evaluate_rank, rank_distances, rank_embeddings
from .rerank import KReciprocalReRanker
from .segmentation import SegmentationScores, segmentation_scores

__all__ = [
    "COCO_STATS",
    "KReciprocalReRanker",
    "RankResult",
    "SegmentationScores",
    "average_query_expansion",
    "coco_backend",
    "coco_evaluate",
    "compute_distance",
    "detections_to_coco",
    "evaluate_rank",
    "rank_distances",
    "rank_embeddings",
    "segmentation_scores",
    "voc_ap",
    "voc_evaluate",
]
