"""RetinaNet and FCOS on a VGG backbone with an FPN, built from torchvision's detection parts.

Both return torchvision's classes (``RetinaNet``, ``FCOS``) on the pyramid torchvision's
ResNet-50 versions use, P3-P7 at strides 8-128 (``retinanet_resnet50_fpn``,
``fcos_resnet50_fpn``: FPN over C3-C5, then P6/P7 by ``LastLevelP6P7`` from P5):

=====  =======  ==============================================================
level  stride   VGG source
=====  =======  ==============================================================
P3     8        ``conv4`` (conv4_3 ReLU; ResNet's C3 is also stride 8)
P4     16       ``conv5`` (conv5_3 ReLU)
P5     32       ``pool5`` (conv5 max-pooled: VGG has no stride-32 convolution
                before the classifier, so C5 is the pooled conv5)
P6     64       3x3/2 conv on P5 (``LastLevelP6P7``, as torchvision's v1 models)
P7     128      ReLU, 3x3/2 conv on P6
=====  =======  ==============================================================

FPN width 256 (x ``width_mult``). Defaults as torchvision: images resized to shorter side
800 / longer side at most 1333; RetinaNet anchors 32..512 (one octave per level, 3 scales per
octave, ratios 0.5/1/2), FCOS one point per location with sizes 8..128 (= strides: FCOS
derives its per-level regression ranges from them).

>>> from vggbackbone.models import fcos_vgg, retinanet_vgg
>>> model = retinanet_vgg("vgg16", num_classes=91)
>>> tiny = fcos_vgg("vgg11_bn", num_classes=4, width_mult=0.125, min_size=320, max_size=512)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from torch import nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.fcos import FCOS
from torchvision.models.detection.retinanet import RetinaNet
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from ..utils import scale_width
from ..vgg import ArchSpec, VGGBackbone, get_config
from .core import build_trunk, check_num_classes, is_pretrained, pretrained_structure, require_blocks
from .detection import TRANSFORM_KWARGS, VGGFPNBackbone, check_detector_kwargs, set_detector_normalization

__all__ = [
    "FCOS_ANCHOR_SIZES",
    "FPN_TAPS",
    "RETINANET_ANCHOR_SIZES",
    "check_detector_kwargs",
    "fcos_vgg",
    "retinanet_vgg",
    "vgg_fpn_p3p7",
]

#: Backbone taps feeding the FPN (P3, P4, P5), see the module docstring.
FPN_TAPS: tuple[str, ...] = ("conv4", "conv5", "pool5")
#: RetinaNet's base anchor size per level P3..P7 (torchvision's; each x 2^0, 2^(1/3), 2^(2/3)).
RETINANET_ANCHOR_SIZES: tuple[int, ...] = (32, 64, 128, 256, 512)
#: FCOS's anchor-point size per level P3..P7 (the strides, as torchvision's fcos_resnet50_fpn).
FCOS_ANCHOR_SIZES: tuple[int, ...] = (8, 16, 32, 64, 128)
#: GeneralizedRCNNTransform's own keyword arguments, which RetinaNet/FCOS pass on.
_TRANSFORM_KWARGS = TRANSFORM_KWARGS
_OWN = ("backbone", "num_classes", "min_size", "max_size", "image_mean", "image_std", "anchor_generator")


def vgg_fpn_p3p7(body: VGGBackbone, out_channels: int) -> VGGFPNBackbone:
    """``body`` (returning conv4, conv5, pool5) through an FPN with ``LastLevelP6P7`` (P3-P7).

    Output: ``OrderedDict`` ``"0", "1", "2", "p6", "p7"`` at strides 8, 16, 32, 64, 128, each
    with ``out_channels`` channels.
    """
    if body.feature_info.reduction() != [8, 16, 32]:
        raise ValueError(f"P3-P5 need taps at strides 8, 16, 32, got {body.feature_info.reduction()}")
    return VGGFPNBackbone(body, out_channels, extra_blocks=LastLevelP6P7(out_channels, out_channels))


def _fpn_body(
    builder: str,
    arch: ArchSpec,
    weights_backbone: Any,
    width_mult: float,
    frozen_stages: int | None,
    norm_layer: Callable[[int], nn.Module] | None,
    normalization: Any,
    pretrained: bool | None,
    progress: bool,
) -> VGGBackbone:
    """The VGG returning conv4, conv5, pool5 (P3-P5's sources), pretrained as torchvision's
    ``trainable_backbone_layers=3`` of 5: 2 blocks frozen."""
    cfg = get_config(arch)
    require_blocks(cfg, 5, builder, "pool5 at stride 32")
    structure = pretrained_structure(
        cfg,
        is_pretrained(pretrained, weights_backbone),
        frozen_stages,
        norm_layer,
        frozen_when_pretrained=2,
        builder=builder,
        max_frozen=5,
    )
    body, _ = build_trunk(
        arch,
        {t: str(i) for i, t in enumerate(FPN_TAPS)},
        weights_backbone,
        width_mult=width_mult,
        normalization=normalization,
        progress=progress,
        **structure.backbone_kwargs(),
    )
    return body


def retinanet_vgg(
    arch: ArchSpec = "vgg16",
    num_classes: int = 91,
    weights_backbone: str | Path | Any | None = None,
    *,
    width_mult: float = 1.0,
    frozen_stages: int | None = None,
    norm_layer: Callable[[int], nn.Module] | None = None,
    fpn_channels: int | None = None,
    anchor_sizes: Sequence[int] = RETINANET_ANCHOR_SIZES,
    aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
    min_size: int | Sequence[int] = 800,
    max_size: int = 1333,
    normalization: Any = None,
    pretrained: bool | None = None,
    progress: bool = True,
    **kwargs: Any,
) -> RetinaNet:
    """RetinaNet (Lin et al., ICCV 2017) on VGG + FPN P3-P7 (see the module docstring).

    Args:
        arch: any 5-block :class:`~vggbackbone.VGGBackbone` arch.
        num_classes: object classes; RetinaNet's sigmoid classifier has no background class,
            but torchvision's convention (and COCO's 91) counts it: pass what you would pass to
            torchvision's ``retinanet_resnet50_fpn``.
        weights_backbone: VGG weights as :class:`~vggbackbone.VGGBackbone` takes them.
        width_mult: multiplies the VGG and FPN widths (rounded to multiples of 8).
        frozen_stages: VGG blocks 1..k frozen. Default as torchvision
            (``trainable_backbone_layers=3``): 2 when ``pretrained``, 0 from scratch.
        norm_layer: BatchNorm for ``_bn`` archs (default ``FrozenBatchNorm2d`` pretrained,
            ``BatchNorm2d`` from scratch).
        fpn_channels: FPN and head width (default 256 x ``width_mult``).
        anchor_sizes: base anchor size of P3..P7 (default 32..512); each level gets the sizes
            ``s, int(s * 2^(1/3)), int(s * 2^(2/3))`` times ``aspect_ratios``, as torchvision.
        min_size, max_size: resize inside the model (torchvision's 800 / 1333).
        normalization: input statistics (default: from the backbone weights, else ImageNet).
        pretrained: build the pretrained structure (the ``frozen_stages``, ``norm_layer``
            defaults); ``None``: when ``weights_backbone`` is given (a checkpoint rebuilt
            without its weights passes ``True``).
        **kwargs: ``RetinaNet`` arguments (``score_thresh=0.05``, ``nms_thresh=0.5``,
            ``detections_per_img=300``, ``fg_iou_thresh=0.5``, ``bg_iou_thresh=0.4``,
            ``topk_candidates=1000``, ``head``, ``proposal_matcher``) and the transform's
            ``size_divisible``/``fixed_size``; any other name is refused.

    Returns:
        torchvision ``RetinaNet``; ``model.backbone.body`` is the ``VGGBackbone``,
        ``model.normalization`` the input statistics.
    """
    check_num_classes(num_classes, 2, "retinanet_vgg", background=True)
    check_detector_kwargs(RetinaNet, kwargs, own=_OWN, transform=_TRANSFORM_KWARGS, builder="retinanet_vgg")
    sizes = tuple(int(s) for s in anchor_sizes)
    if len(sizes) != 5:
        raise ValueError(f"anchor_sizes needs one base size per level P3..P7 (5), got {sizes}")
    body = _fpn_body(
        "retinanet_vgg",
        arch,
        weights_backbone,
        width_mult,
        frozen_stages,
        norm_layer,
        normalization,
        pretrained,
        progress,
    )
    channels = fpn_channels or scale_width(256, width_mult)
    backbone = vgg_fpn_p3p7(body, channels)
    anchor_gen = AnchorGenerator(
        tuple((s, int(s * 2 ** (1.0 / 3)), int(s * 2 ** (2.0 / 3))) for s in sizes),
        (tuple(float(r) for r in aspect_ratios),) * len(sizes),
    )
    model = RetinaNet(
        backbone, num_classes, min_size=min_size, max_size=max_size, anchor_generator=anchor_gen, **kwargs
    )
    set_detector_normalization(model, body.normalization)
    return model


def fcos_vgg(
    arch: ArchSpec = "vgg16",
    num_classes: int = 91,
    weights_backbone: str | Path | Any | None = None,
    *,
    width_mult: float = 1.0,
    frozen_stages: int | None = None,
    norm_layer: Callable[[int], nn.Module] | None = None,
    fpn_channels: int | None = None,
    anchor_sizes: Sequence[int] = FCOS_ANCHOR_SIZES,
    min_size: int | Sequence[int] = 800,
    max_size: int = 1333,
    normalization: Any = None,
    pretrained: bool | None = None,
    progress: bool = True,
    **kwargs: Any,
) -> FCOS:
    """FCOS (Tian et al., ICCV 2019) on VGG + FPN P3-P7 (see the module docstring).

    Args:
        arch, num_classes, weights_backbone, width_mult, frozen_stages, norm_layer,
            min_size, max_size, normalization, pretrained: as :func:`retinanet_vgg`.
        fpn_channels: FPN and head width, a multiple of 32 (torchvision's FCOS head uses
            ``GroupNorm(32, C)``); default 256 x ``width_mult`` rounded to a multiple of 32.
        anchor_sizes: one anchor point per location and level P3..P7, of these sizes (default
            8..128, the strides; FCOS's regression ranges per level are 4x-8x these).
        **kwargs: ``FCOS`` arguments (``center_sampling_radius=1.5``, ``score_thresh=0.2``,
            ``nms_thresh=0.6``, ``detections_per_img=100``, ``topk_candidates=1000``, ``head``)
            and the transform's ``size_divisible``/``fixed_size``; any other name is refused.

    Returns:
        torchvision ``FCOS``; ``model.backbone.body`` is the ``VGGBackbone``,
        ``model.normalization`` the input statistics.
    """
    check_num_classes(num_classes, 2, "fcos_vgg", background=True)
    check_detector_kwargs(FCOS, kwargs, own=_OWN, transform=_TRANSFORM_KWARGS, builder="fcos_vgg")
    sizes = tuple(int(s) for s in anchor_sizes)
    if len(sizes) != 5:
        raise ValueError(f"anchor_sizes needs one size per level P3..P7 (5), got {sizes}")
    channels = fpn_channels or scale_width(256, width_mult, 32)
    if channels % 32:
        raise ValueError(
            f"fcos_vgg: fpn_channels must be a multiple of 32 (the head's GroupNorm(32, C)), got {channels}"
        )
    body = _fpn_body(
        "fcos_vgg", arch, weights_backbone, width_mult, frozen_stages, norm_layer, normalization, pretrained, progress
    )
    backbone = vgg_fpn_p3p7(body, channels)
    anchor_gen = AnchorGenerator(tuple((s,) for s in sizes), ((1.0,),) * len(sizes))
    model = FCOS(backbone, num_classes, min_size=min_size, max_size=max_size, anchor_generator=anchor_gen, **kwargs)
    set_detector_normalization(model, body.normalization)
    return model
