"""Task models on VGGBackbone: detection, segmentation and ReID builders."""

from .detection import fasterrcnn_vgg

__all__ = ["fasterrcnn_vgg"]
