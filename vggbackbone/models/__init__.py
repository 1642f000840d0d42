"""Task models built on :class:`~vggbackbone.VGGBackbone` (plain PyTorch, no Lightning)."""

from .classifier import VGGClassifier, vgg_classifier
from .detection import fasterrcnn_vgg
from .fcn import FCN, fcn_vgg
from .reid import GeM, ReIDNet, ReIDOutput, reid_vgg
from .single_stage import fcos_vgg, retinanet_vgg
from .ssd import ssd_vgg
from .unet import UNetVGG, unet_vgg

__all__ = [
    "FCN",
    "GeM",
    "ReIDNet",
    "ReIDOutput",
    "UNetVGG",
    "VGGClassifier",
    "fasterrcnn_vgg",
    "fcn_vgg",
    "fcos_vgg",
    "reid_vgg",
    "retinanet_vgg",
    "ssd_vgg",
    "unet_vgg",
    "vgg_classifier",
]

try:  # segmentation-models-pytorch is optional (the `seg` extra): register our smp encoders
    from .smp_encoder import VGGSmpEncoder, register_smp_encoder

    __all__ += ["VGGSmpEncoder", "register_smp_encoder"]
except ImportError:  # pragma: no cover - smp not installed
    pass
