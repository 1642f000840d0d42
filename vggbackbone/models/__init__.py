"""Task models built on :class:`~vggbackbone.VGGBackbone` (plain PyTorch, no Lightning).

Every builder is registered (:mod:`vggbackbone.models.registry`): ``create_model(name, **kw)``
builds it, ``list_models(task)`` lists a task's; the task CLIs choose with ``model.family``.
The rules the builders share (the trunk and its weights read once, the pretrained structure,
the width rounding, the class-count check, self-normalising models) are in
:mod:`vggbackbone.models.core`.
"""

from collections.abc import Mapping
from functools import partial
from typing import Any

from .classifier import ExportableClassifier, VGGClassifier, vgg_classifier
from .core import NormalizingModel
from .detection import fasterrcnn_vgg
from .fcn import FCN, fcn_vgg
from .pretrained import from_pretrained, read_pretrained_config, save_pretrained
from .registry import TASKS, ModelEntry, TaskModels, create_model, list_models, model_entry, register_model
from .reid import CenterLoss, GeM, ReIDNet, ReIDOutput, reid_vgg
from .single_stage import fcos_vgg, retinanet_vgg
from .sliding_window import sliding_window_logits
from .ssd import ssd_vgg
from .unet import UNetVGG, unet_vgg

__all__ = [
    "FCN",
    "TASKS",
    "CenterLoss",
    "ExportableClassifier",
    "GeM",
    "ModelEntry",
    "NormalizingModel",
    "ReIDNet",
    "ReIDOutput",
    "TaskModels",
    "UNetVGG",
    "VGGClassifier",
    "create_model",
    "fasterrcnn_vgg",
    "fcn_vgg",
    "fcos_vgg",
    "from_pretrained",
    "list_models",
    "model_entry",
    "read_pretrained_config",
    "register_model",
    "reid_vgg",
    "retinanet_vgg",
    "save_pretrained",
    "sliding_window_logits",
    "ssd_vgg",
    "unet_vgg",
    "vgg_classifier",
]


def _fasterrcnn_backbone(options: Mapping[str, Any]) -> str:
    return "backbone.body" if options.get("fpn") else "backbone"  # the FPN around it is new


# The built-in models, in the order the task CLIs list them (model.family). Where the VGG sits:
# a detector's FPN, or SSD's fc6/fc7 and extra layers, are new layers around model.backbone.body.
register_model("fasterrcnn", fasterrcnn_vgg, task="detect", backbone_path=_fasterrcnn_backbone)
register_model("ssd", ssd_vgg, task="detect", backbone_path="backbone.body")
register_model("retinanet", retinanet_vgg, task="detect", backbone_path="backbone.body")
register_model("fcos", fcos_vgg, task="detect", backbone_path="backbone.body")
register_model("fcn32s", partial(fcn_vgg, variant="32s"), task="segment")
register_model("fcn16s", partial(fcn_vgg, variant="16s"), task="segment")
register_model("fcn8s", partial(fcn_vgg, variant="8s"), task="segment")
register_model("unet", unet_vgg, task="segment")
register_model("reid_vgg", reid_vgg, task="reid")
register_model("vgg", vgg_classifier, task="classify")

try:  # segmentation-models-pytorch is optional (the `seg` extra): register our smp encoders
    from .smp_encoder import VGGSmpEncoder, register_smp_encoder

    __all__ += ["VGGSmpEncoder", "register_smp_encoder"]
except ImportError:  # pragma: no cover - smp not installed
    pass
