"""Task models built on :class:`~vggbackbone.VGGBackbone` (plain PyTorch, no Lightning)."""

from .reid import GeM, ReIDNet, ReIDOutput, reid_vgg

__all__ = ["GeM", "ReIDNet", "ReIDOutput", "reid_vgg"]
