"""SSD on a VGG backbone (Liu et al., "SSD: Single Shot MultiBox Detector", ECCV 2016).

Built from :class:`~vggbackbone.VGGBackbone` and torchvision's ``SSD``, ``SSDHead`` and
``DefaultBoxGenerator``, the way the paper (and torchvision's ``ssd300_vgg16``) turns VGG16
into the SSD base network:

=============  =====================================================  ========  ==========
source layer   what it is                                             SSD300    SSD512
=============  =====================================================  ========  ==========
conv4_3        VGG conv4 (Caffe ``ceil_mode`` pools), L2Norm, scale   38x38     64x64
               20 (learnable, one per channel)
fc7            pool5 as 3x3/1 max-pool, fc6 = 3x3 conv dilation 6     19x19     32x32
               (1024 ch), fc7 = 1x1 conv (1024 ch)
conv8_2        1x1 256 -> 3x3/2 512                                    10x10     16x16
conv9_2        1x1 128 -> 3x3/2 256                                    5x5       8x8
conv10_2       1x1 128 -> 3x3 256 (300: no pad; 512: /2, pad 1)        3x3       4x4
conv11_2       1x1 128 -> 3x3 256 (idem)                               1x1       2x2
conv12_2       SSD512 only: 1x1 128 -> 4x4 256 pad 1                   -         1x1
=============  =====================================================  ========  ==========

Every channel count is multiplied by ``width_mult`` (rounded to multiples of 8). fc6/fc7 are
initialised from the VGG classifier by the paper's subsampling when the backbone weights
carry one (every 4th filter of fc6 and fc7, every 4th input of fc7, every 3rd tap of fc6's
7x7 kernel: a 3x3 kernel whose dilation 6 covers the original 7x7 field at the new stride),
from random otherwise (xavier, as torchvision).

Default boxes: torchvision's ``DefaultBoxGenerator`` with the scales of the Caffe release
(``box_scales="coco"``, torchvision's ssd300_vgg16 settings, or ``"voc"``), aspect ratios
{1, 2, 1/2} on the first and the last two sources, {1, 2, 1/2, 3, 1/3} elsewhere: 8732 boxes at
300, 24564 at 512.

>>> from vggbackbone.models import ssd_vgg
>>> model = ssd_vgg("vgg16", size=300, num_classes=21)                    # the paper's VOC SSD300
>>> tiny = ssd_vgg("vgg11_bn", size=300, num_classes=4, width_mult=0.125)  # a CPU-sized SSD
"""

from __future__ import annotations

import logging
import os
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.anchor_utils import DefaultBoxGenerator
from torchvision.models.detection.ssd import SSD, SSDHead

from ..normalization import InputNormalization, resolve_normalization
from ..utils import scale_width
from ..vgg import ArchSpec, VGGBackbone, get_config
from ..weights import CLASSIFIER_KEYS, ReadWeights, WeightsError, classifier_problem, reshape_head
from .core import build_trunk, check_num_classes, is_pretrained, pretrained_structure, require_blocks
from .detection import check_detector_kwargs, set_detector_normalization
from .ssd_weights import TORCHVISION_SSD_NORMALIZATION, load_ssd_weights, save_ssd_weights

__all__ = [
    "SSD_ASPECT_RATIOS",
    "SSD_BOX_SCALES",
    "SSD_STEPS",
    "TORCHVISION_SSD_NORMALIZATION",
    "L2Norm",
    "SSDVGGBackbone",
    "load_ssd_weights",
    "save_ssd_weights",
    "ssd_vgg",
]

logger = logging.getLogger(__name__)

#: Default-box scales (fractions of the image side), one per source layer plus one (the extra
#: box of aspect 1 on source k is sqrt(s_k * s_{k+1})). "coco" is Caffe's ssd_coco.py and
#: torchvision's ssd300_vgg16; "voc" is Caffe's ssd_pascal.py / ssd_pascal_512.py.
SSD_BOX_SCALES: dict[tuple[str, int], tuple[float, ...]] = {
    ("coco", 300): (0.07, 0.15, 0.33, 0.51, 0.69, 0.87, 1.05),
    ("voc", 300): (0.1, 0.2, 0.37, 0.54, 0.71, 0.88, 1.05),
    ("coco", 512): (0.04, 0.1, 0.26, 0.42, 0.58, 0.74, 0.9, 1.06),
    ("voc", 512): (0.07, 0.15, 0.3, 0.45, 0.6, 0.75, 0.9, 1.05),
}
#: Aspect ratios r of each source (boxes 1, 1', r and 1/r for each r).
SSD_ASPECT_RATIOS: dict[int, tuple[tuple[int, ...], ...]] = {
    300: ((2,), (2, 3), (2, 3), (2, 3), (2,), (2,)),
    512: ((2,), (2, 3), (2, 3), (2, 3), (2, 3), (2,), (2,)),
}
#: Default-box centre spacing in pixels of each source (the Caffe release's ``steps``).
SSD_STEPS: dict[int, tuple[int, ...]] = {
    300: (8, 16, 32, 64, 100, 300),
    512: (8, 16, 32, 64, 128, 256, 512),
}
#: Extra layers after fc7: (name, 1x1 width, 3x3 width, kernel, stride, padding), at width 1.
_EXTRAS: dict[int, tuple[tuple[str, int, int, int, int, int], ...]] = {
    300: (
        ("conv8", 256, 512, 3, 2, 1),
        ("conv9", 128, 256, 3, 2, 1),
        ("conv10", 128, 256, 3, 1, 0),
        ("conv11", 128, 256, 3, 1, 0),
    ),
    512: (
        ("conv8", 256, 512, 3, 2, 1),
        ("conv9", 128, 256, 3, 2, 1),
        ("conv10", 128, 256, 3, 2, 1),
        ("conv11", 128, 256, 3, 2, 1),
        ("conv12", 128, 256, 4, 1, 1),
    ),
}
#: ``SSD``/``GeneralizedRCNNTransform`` keyword arguments the builder passes on (anything else is refused).
_SSD_OWN = ("backbone", "anchor_generator", "size", "num_classes", "image_mean", "image_std")


def _xavier_init(module: nn.Module) -> None:
    """torchvision's SSD initialisation of the layers it adds to VGG (fc6, fc7, extras)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class L2Norm(nn.Module):
    """Channel-wise L2 normalisation with a learnable per-channel scale (ParseNet; SSD's conv4_3).

    ``(N, C, H, W) -> (N, C, H, W)``: ``weight[c] * x / ||x||_2`` over channels at each position,
    computed as torchvision's ``SSDFeatureExtractorVGG`` does (``F.normalize``, eps 1e-12).
    """

    def __init__(self, channels: int, scale: float = 20.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.full((channels,), float(scale)))

    def forward(self, x: Tensor) -> Tensor:
        return self.weight.view(1, -1, 1, 1) * F.normalize(x)


class SSDVGGBackbone(nn.Module):
    """The SSD base network and extra layers on a :class:`~vggbackbone.VGGBackbone`.

    ``body`` returns conv4 (stride 8, Caffe ``ceil_mode`` pools) and conv5 (stride 16); pool5,
    fc6, fc7 and the extra layers are this module's own (see the module docstring's table).

    Output: ``OrderedDict`` ``"0".."5"`` (SSD300) or ``"0".."6"`` (SSD512) of the source layers,
    conv4_3 (L2-normalised) first; channels in :attr:`out_channels` (a list, as ``SSD`` wants).
    """

    def __init__(
        self,
        body: VGGBackbone,
        size: int = 300,
        fc_channels: int = 1024,
        width_mult: float = 1.0,
        extra_norm: Callable[[int], nn.Module] | None = None,
    ) -> None:
        super().__init__()
        if list(body.return_layers) != ["conv4", "conv5"]:
            raise ValueError(f"the SSD body must return exactly conv4 and conv5, got {list(body.return_layers)}")
        if size not in _EXTRAS:
            raise ValueError(f"size must be one of {sorted(_EXTRAS)}, got {size}")
        c4, c5 = body.feature_info.channels()
        self.body = body
        self.l2norm = L2Norm(c4, 20.0)

        # extra_norm (ScratchDet's BatchNorm after every added convolution) goes between conv and ReLU
        def conv_act(name: str, conv: nn.Conv2d, relu: str) -> list[tuple[str, nn.Module]]:
            layers: list[tuple[str, nn.Module]] = [(name, conv)]
            if extra_norm is not None:
                layers.append((f"{name}_norm", extra_norm(conv.out_channels)))
            return [*layers, (relu, nn.ReLU(inplace=True))]

        # pool5 2x2/2 -> 3x3/1 keeps stride 16; fc6's dilation 6 stands for the 7x7 kernel over
        # stride-32 pool5 (x2) subsampled every 3rd tap (x3)
        self.fc = nn.Sequential(
            OrderedDict(
                [
                    ("pool5", nn.MaxPool2d(3, stride=1, padding=1)),
                    *conv_act("fc6", nn.Conv2d(c5, fc_channels, 3, padding=6, dilation=6), "relu6"),
                    *conv_act("fc7", nn.Conv2d(fc_channels, fc_channels, 1), "relu7"),
                ]
            )
        )
        _xavier_init(self.fc)

        extra: OrderedDict[str, nn.Module] = OrderedDict()
        in_ch = fc_channels
        out_channels = [c4, fc_channels]
        for name, mid, out, k, s, p in _EXTRAS[size]:
            mid, out = scale_width(mid, width_mult), scale_width(out, width_mult)
            i = name[4:]
            extra[name] = nn.Sequential(
                OrderedDict(
                    [
                        *conv_act(f"conv{i}_1", nn.Conv2d(in_ch, mid, 1), f"relu{i}_1"),
                        *conv_act(f"conv{i}_2", nn.Conv2d(mid, out, k, stride=s, padding=p), f"relu{i}_2"),
                    ]
                )
            )
            in_ch = out
            out_channels.append(out)
        self.extra = nn.ModuleDict(extra)
        _xavier_init(self.extra)
        self.size = size
        self.out_channels: list[int] = out_channels

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        taps = self.body(x)
        outputs = [self.l2norm(taps["conv4"])]
        x = self.fc(taps["conv5"])
        outputs.append(x)
        for block in self.extra.values():
            x = block(x)
            outputs.append(x)
        return OrderedDict([(str(i), v) for i, v in enumerate(outputs)])

    # ------------------------------------------------------------------ fc6/fc7 from the classifier
    @torch.no_grad()
    def load_classifier(self, fc6: Tensor, fc6_bias: Tensor, fc7: Tensor, fc7_bias: Tensor, source: str) -> None:
        """Subsample VGG's fc6 ``(F, C, 7, 7)`` and fc7 ``(F, F, 1, 1)`` into this fc6/fc7 (the paper's way).

        Every ``F // fc_channels``-th filter (4 for 4096 -> 1024) and every 3rd tap of the 7x7
        kernel (0, 3, 6) of fc6; every 4th output and input of fc7. Raises
        :class:`~vggbackbone.WeightsError` when the shapes do not allow it.
        """
        own6, own7 = self.fc.fc6, self.fc.fc7
        f = fc6.shape[0]
        n = own6.out_channels
        if fc6.dim() != 4 or fc6.shape[1:] != (own6.in_channels, 7, 7) or fc7.shape[:2] != (f, f) or f % n:
            raise WeightsError(
                f"{source}: classifier fc6 {tuple(fc6.shape)} / fc7 {tuple(fc7.shape)} cannot be subsampled into "
                f"SSD's fc6 ({n}, {own6.in_channels}, 3, 3) / fc7 ({n}, {n}, 1, 1): fc6 must be "
                f"(k*{n}, {own6.in_channels}, 7, 7)"
            )
        step = f // n
        own6.weight.copy_(fc6[::step, :, ::3, ::3])
        own6.bias.copy_(fc6_bias[::step])
        own7.weight.copy_(fc7[::step, ::step])
        own7.bias.copy_(fc7_bias[::step])


# ---------------------------------------------------------------------------- builder
def ssd_vgg(
    arch: ArchSpec = "vgg16",
    size: Literal[300, 512] = 300,
    num_classes: int = 91,
    weights: str | os.PathLike[str] | None = None,
    weights_backbone: str | os.PathLike[str] | Any | None = None,
    *,
    width_mult: float = 1.0,
    fc_channels: int | None = None,
    fc_init: Literal["auto", "classifier", "random"] = "auto",
    frozen_stages: int | None = None,
    norm_layer: Callable[[int], nn.Module] | None = None,
    box_scales: Literal["coco", "voc"] | Sequence[float] = "coco",
    clip_default_boxes: bool = True,
    extra_norm: bool = False,
    normalization: Any = None,
    pretrained: bool | None = None,
    progress: bool = True,
    **kwargs: Any,
) -> SSD:
    """SSD300 / SSD512 on a VGG backbone, as the SSD paper builds it (see the module docstring).

    Args:
        arch: any 5-block :class:`~vggbackbone.VGGBackbone` arch (``"vgg16"`` is the paper's;
            ``"vgg11"``, ``"vgg19_bn"``, a block spec ... work the same way).
        size: 300 (6 sources, 8732 default boxes) or 512 (7 sources, 24564). Images are resized
            to ``size x size`` inside the model.
        num_classes: object classes **plus background** (VOC: 21, COCO: 91).
        weights: a whole-SSD state dict file: saved from torchvision's
            ``ssd300_vgg16`` (needs ``arch="vgg16", size=300``; the key map is explicit, see
            :func:`load_ssd_weights`) or from this builder (``model.state_dict()`` or
            :func:`save_ssd_weights`). Excludes ``weights_backbone``.
        weights_backbone: VGG weights as :class:`~vggbackbone.VGGBackbone` takes them (file or
            torchvision name) for conv1_1..conv5_3, and fc6/fc7 when they carry the classifier.
        width_mult: multiplies every channel count (VGG, fc6/fc7, extra layers; rounded to
            multiples of 8).
        fc_channels: fc6/fc7 width (default 1024 x ``width_mult``).
        fc_init: ``"auto"``: fc6/fc7 subsampled from the classifier of ``weights_backbone`` when
            it has a finite one, else random (xavier) with a warning (a logged line when there
            are no backbone weights at all); ``"classifier"``: the classifier or a
            :class:`~vggbackbone.WeightsError`; ``"random"``: xavier init.
        frozen_stages: VGG blocks 1..k frozen. Default as torchvision's ``ssd300_vgg16``
            (``trainable_backbone_layers=4``): 1 when ``pretrained``, 0 from scratch.
        norm_layer: BatchNorm for ``_bn`` archs (default ``FrozenBatchNorm2d`` pretrained,
            ``BatchNorm2d`` from scratch).
        box_scales: ``"coco"`` (torchvision's / Caffe's COCO settings: 0.07..1.05 at 300,
            0.04..1.06 at 512), ``"voc"`` (Caffe's VOC settings: 0.1..1.05 at 300, 0.07..1.05 at
            512), or one scale per source plus one. See :data:`SSD_BOX_SCALES`.
        clip_default_boxes: ``True`` (torchvision's ``DefaultBoxGenerator`` default, its
            ``ssd300_vgg16``): default-box widths and heights above 1 (the image side) are cut
            to 1. ``False``: left as the scales make them, as the SSD authors' prior box layer
            (``clip: false`` in ``ssd_pascal.py``, ``src/caffe/layers/prior_box_layer.cpp``).
        extra_norm: ``True`` puts a ``BatchNorm2d`` between every convolution SSD adds to VGG
            (fc6, fc7, conv8_1 .. conv11_2/conv12_2) and its ReLU, as ScratchDet (Zhu et al.,
            ICCV 2019) does to train SSD from scratch. Default ``False``: the paper's SSD, and the
            only form torchvision's ``ssd300_vgg16`` files load into.
        normalization: input statistics. Default: from ``weights`` (torchvision's SSD statistics
            for a torchvision file), else from ``weights_backbone``, else ImageNet.
        pretrained: build the pretrained structure (the ``frozen_stages``, ``norm_layer``
            defaults); ``None``: when ``weights`` or ``weights_backbone`` is given (a checkpoint
            rebuilt without its weights passes ``True``).
        **kwargs: ``SSD`` arguments (``score_thresh=0.01``, ``nms_thresh=0.45``,
            ``detections_per_img=200``, ``iou_thresh=0.5``, ``topk_candidates=400``,
            ``positive_fraction=0.25``, ``head``); any other name is refused.

    Returns:
        torchvision ``SSD``; ``model.backbone`` is an :class:`SSDVGGBackbone` whose ``.body`` is
        the ``VGGBackbone``; ``model.normalization`` the input statistics. Images go in as a
        list of ``(3, H, W)`` tensors in ``[0, 1]``.
    """
    check_num_classes(num_classes, 2, "ssd_vgg", background=True)
    if size not in _EXTRAS:
        raise ValueError(f"size must be 300 or 512, got {size!r}")
    if weights is not None and weights_backbone is not None:
        raise ValueError("give weights (a whole SSD) or weights_backbone (the VGG), not both")
    if fc_init not in ("auto", "classifier", "random"):
        raise ValueError(f"fc_init must be 'auto', 'classifier' or 'random', got {fc_init!r}")
    check_detector_kwargs(SSD, kwargs, own=_SSD_OWN, transform=("_skip_resize",), builder="ssd_vgg")
    cfg = get_config(arch)
    require_blocks(cfg, 5, "ssd_vgg", "conv4 at stride 8, conv5 at 16")
    structure = pretrained_structure(
        cfg,
        is_pretrained(pretrained, weights, weights_backbone),
        frozen_stages,
        norm_layer,
        frozen_when_pretrained=1,
        builder="ssd_vgg",
        max_frozen=5,  # SSD's fc6/fc7 are its own
    )
    body, read = build_trunk(
        arch,
        {"conv4": "conv4", "conv5": "conv5"},
        weights_backbone,
        width_mult=width_mult,
        ceil_mode=True,
        normalization=normalization if weights is None else None,
        progress=progress,
        **structure.backbone_kwargs(),
    )
    backbone = SSDVGGBackbone(
        body,
        size=size,
        fc_channels=fc_channels or scale_width(1024, width_mult),
        width_mult=width_mult,
        extra_norm=nn.BatchNorm2d if extra_norm else None,
    )
    if weights is None:
        _init_fc(backbone, read, fc_init)
    anchor_gen = _default_boxes(size, box_scales, len(backbone.out_channels), clip_default_boxes)
    kwargs.setdefault("head", SSDHead(backbone.out_channels, anchor_gen.num_anchors_per_location(), num_classes))
    model = SSD(backbone, anchor_gen, (size, size), num_classes, **kwargs)
    model_norm = body.normalization
    if normalization is not None:
        model_norm = resolve_normalization(normalization, body.in_channels)
    if weights is not None:
        model_norm = _load_whole_ssd(model, weights, model_norm, normalization)
    # body too: with a whole-SSD file the statistics are the file's, not what the body resolved
    set_detector_normalization(model, model_norm, body=body)
    return model


def _init_fc(backbone: SSDVGGBackbone, read: ReadWeights | None, fc_init: str) -> None:
    """fc6/fc7 subsampled from the classifier of the backbone weights (``fc_init`` ``auto`` or
    ``classifier``), or left at their xavier init, saying so."""
    if fc_init == "random":
        return
    if read is None:
        if fc_init == "classifier":
            raise WeightsError("fc_init='classifier' needs weights_backbone with the VGG classifier")
        logger.info("ssd_vgg: no weights: fc6/fc7 start from random (xavier) init")
        return
    problem = classifier_problem(read.state_dict, read.description)
    if problem is None:
        # the Linear classifier as the VGG's 7x7 / 1x1 convolutions (checked against conv5's width)
        sd = reshape_head({k: read.state_dict[k] for k in CLASSIFIER_KEYS}, backbone.body.out_channels)
        fc6, fc6_bias, fc7, fc7_bias = (sd[k] for k in CLASSIFIER_KEYS)
        backbone.load_classifier(fc6, fc6_bias, fc7, fc7_bias, read.description)
        logger.info("ssd_vgg: fc6/fc7 subsampled from the classifier of %s", read.description)
    elif fc_init == "classifier":
        raise WeightsError(f"fc_init='classifier': {problem}")
    else:
        warnings.warn(f"ssd_vgg: {problem}; fc6/fc7 start from random (xavier) init", stacklevel=3)


def _default_boxes(size: int, box_scales: str | Sequence[float], n_sources: int, clip: bool) -> DefaultBoxGenerator:
    """torchvision's ``DefaultBoxGenerator`` with the Caffe release's ratios and steps and the scales
    ``box_scales`` names (``coco``, ``voc``) or gives (one per source plus one)."""
    if isinstance(box_scales, str):
        if (box_scales, size) not in SSD_BOX_SCALES:
            raise ValueError(f"box_scales must be 'coco', 'voc' or a sequence of floats, got {box_scales!r}")
        scales = list(SSD_BOX_SCALES[(box_scales, size)])
    else:
        scales = [float(s) for s in box_scales]
    if len(scales) != n_sources + 1:
        raise ValueError(f"SSD{size} has {n_sources} sources: box_scales needs {n_sources + 1} values, got {scales}")
    return DefaultBoxGenerator(
        [list(r) for r in SSD_ASPECT_RATIOS[size]], scales=scales, steps=list(SSD_STEPS[size]), clip=clip
    )


def _load_whole_ssd(model: SSD, weights: Any, model_norm: InputNormalization, given: Any) -> InputNormalization:
    """Load a whole-SSD file (:func:`load_ssd_weights`); the normalisation it declares wins unless
    one was ``given``; a file that declares none is warned about."""
    file_norm = load_ssd_weights(model, weights)
    if given is not None:
        return model_norm
    if file_norm is None:
        warnings.warn(
            f"ssd_vgg: {weights} declares no input normalisation (a plain state dict): using "
            f"{model_norm.name} statistics; pass normalization= or save with save_ssd_weights",
            stacklevel=3,
        )
        return model_norm
    return file_norm
