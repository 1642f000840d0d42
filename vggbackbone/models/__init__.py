"""Task models built on :class:`~vggbackbone.VGGBackbone` (plain PyTorch, no Lightning)."""

from .detection import fasterrcnn_vgg
from .reid import GeM, ReIDNet, ReIDOutput, reid_vgg

__all__ = ["GeM", "ReIDNet", "ReIDOutput", "fasterrcnn_vgg", "reid_vgg"]
