"""Task metrics that do not need Lightning."""

from .segmentation import ConfusionMatrix, SegmentationScores, confusion_matrix, segmentation_scores

__all__ = ["ConfusionMatrix", "SegmentationScores", "confusion_matrix", "segmentation_scores"]
