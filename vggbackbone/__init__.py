"""vggbackbone: every VGG configuration as a feature-extraction backbone.

>>> from vggbackbone import VGGBackbone
>>> bb = VGGBackbone("vgg16", return_layers={"conv3": "c3", "conv4": "c4", "conv5": "c5"})
>>> bb.feature_info.channels(), bb.feature_info.reduction()
([256, 512, 512], [4, 8, 16])
"""

from ._timm_hook import register_with_timm
from .deploy import InferenceModule, fold_batchnorm, optimize_for_inference
from .perceptual import LPIPS, PerceptualLoss, StyleLoss
from .vgg import ARCHS, TAPS, VGGBackbone, VGGConfig, get_config
from .weights import CAFFE, IMAGENET, InputNormalization, WeightsError

__version__ = "0.1.0"

register_with_timm()  # timm.create_model("vggbackbone_<arch>", features_only=True): vggbackbone/timm_models.py

__all__ = [
    "ARCHS",
    "CAFFE",
    "IMAGENET",
    "LPIPS",
    "TAPS",
    "InferenceModule",
    "InputNormalization",
    "PerceptualLoss",
    "StyleLoss",
    "VGGBackbone",
    "VGGConfig",
    "WeightsError",
    "__version__",
    "fold_batchnorm",
    "get_config",
    "optimize_for_inference",
]
