"""Task models on VGGBackbone: detection, segmentation and ReID builders."""

from .fcn import FCN, fcn_vgg
from .unet import UNetVGG, unet_vgg

__all__ = ["FCN", "UNetVGG", "fcn_vgg", "unet_vgg"]

try:  # segmentation-models-pytorch is optional (the `seg` extra): register our smp encoders
    from .smp_encoder import VGGSmpEncoder, register_smp_encoder

    __all__ += ["VGGSmpEncoder", "register_smp_encoder"]
except ImportError:  # pragma: no cover - smp not installed
    pass
