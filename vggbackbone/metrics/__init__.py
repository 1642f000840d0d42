"""Task metrics that do not need Lightning (detection: COCO and PASCAL VOC)."""

from .detection import COCO_STATS, coco_evaluate, detections_to_coco, voc_ap, voc_evaluate

__all__ = ["COCO_STATS", "coco_evaluate", "detections_to_coco", "voc_ap", "voc_evaluate"]
