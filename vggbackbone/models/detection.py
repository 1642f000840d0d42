"""Faster R-CNN on a VGG backbone, built from torchvision's detection parts.

Two forms, both returning ``torchvision.models.detection.FasterRCNN``:

* **classic** (``fpn=False``), the VGG16 setup of Ren et al., "Faster R-CNN" (NeurIPS 2015):
  one feature map, ``conv5`` at stride 16; the RPN's 9 anchors per position, sizes
  (128, 256, 512) x ratios (0.5, 1, 2); 7x7 RoI pooling of ``conv5``; a box head that *is*
  VGG's fc6/fc7 (``C*7*7 -> 4096 -> 4096``, dropout 0.5), initialised from the classifier of
  the backbone weights; conv1-conv2 frozen when the backbone is pretrained.
* **FPN** (``fpn=True``), Lin et al. (CVPR 2017): ``conv3``/``conv4``/``conv5`` (strides 4,
  8, 16) through torchvision's ``FeaturePyramidNetwork`` plus a max-pooled stride-32 level,
  one anchor size per level (32, 64, 128, 256) x (0.5, 1, 2), ``MultiScaleRoIAlign`` and a
  two-layer MLP head (``256*7*7 -> 1024 -> 1024``), as torchvision's ResNet-FPN models.

torchvision's RPN shares one head over every level, so all levels must have the same channel
count: a multi-level detector therefore always goes through the FPN, never raw conv3 + conv5.

>>> from vggbackbone.models import fasterrcnn_vgg
>>> model = fasterrcnn_vgg("vgg16", num_classes=21)                  # the paper's VOC model
>>> small = fasterrcnn_vgg("vgg11_bn", num_classes=4, width_mult=0.25, fpn=True, min_size=320)
"""

from __future__ import annotations

import inspect
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor, nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign, RoIPool
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from ..utils import scale_width
from ..vgg import ArchSpec, VGGBackbone, get_config
from ..weights import CLASSIFIER_KEYS, InputNormalization, ReadWeights, WeightsError, classifier_problem
from .core import Structure, build_trunk, check_num_classes, is_pretrained, pretrained_structure, require_blocks
from .rcnn_training import TORCHVISION_BETA, use_reference_training

__all__ = [
    "RoIPoolSingleLevel",
    "VGGBoxHead",
    "VGGFPNBackbone",
    "check_detector_kwargs",
    "fasterrcnn_vgg",
    "set_detector_normalization",
]

#: Anchors of the classic form (paper: 3 scales x 3 aspect ratios on conv5).
CLASSIC_ANCHOR_SIZES: tuple[int, ...] = (128, 256, 512)
#: One anchor size per FPN level (strides 4, 8, 16, 32).
FPN_ANCHOR_SIZES: tuple[int, ...] = (32, 64, 128, 256)
ASPECT_RATIOS: tuple[float, ...] = (0.5, 1.0, 2.0)
#: GeneralizedRCNNTransform's own keyword arguments, which torchvision's detectors pass on.
TRANSFORM_KWARGS: tuple[str, ...] = ("size_divisible", "fixed_size", "_skip_resize")
#: FasterRCNN arguments fasterrcnn_vgg sets itself (from its own options).
_FASTERRCNN_OWN = (
    "backbone", "num_classes", "min_size", "max_size", "image_mean", "image_std",
    "rpn_anchor_generator", "box_roi_pool", "box_head", "box_predictor",
)  # fmt: skip


class VGGBoxHead(nn.Sequential):
    """VGG's fc6/fc7 as the Fast R-CNN box head: ``(R, C, 7, 7) -> (R, representation_size)``.

    ``flatten -> fc6 -> ReLU -> Dropout -> fc7 -> ReLU -> Dropout``, exactly VGG's classifier
    minus fc8, so ImageNet classifier weights load as they are (``C*7*7`` must equal the
    classifier's input, i.e. pooled conv5 features of the same arch and width).
    """

    def __init__(self, in_channels: int, representation_size: int = 4096, dropout: float = 0.5) -> None:
        layers: OrderedDict[str, nn.Module] = OrderedDict(
            flatten=nn.Flatten(start_dim=1),
            fc6=nn.Linear(in_channels * 7 * 7, representation_size),
            relu6=nn.ReLU(inplace=True),
            drop6=nn.Dropout(dropout),
            fc7=nn.Linear(representation_size, representation_size),
            relu7=nn.ReLU(inplace=True),
            drop7=nn.Dropout(dropout),
        )
        if dropout <= 0:
            del layers["drop6"], layers["drop7"]
        super().__init__(layers)
        self.in_channels = in_channels
        self.representation_size = representation_size
        for fc in (self.fc6, self.fc7):  # torchvision's VGG classifier initialisation
            nn.init.normal_(fc.weight, 0, 0.01)
            nn.init.zeros_(fc.bias)

    def load_classifier(self, state_dict: dict[str, Tensor], source: str = "weights") -> bool:
        """Copy fc6/fc7 from a backbone state dict (``features.fc6.conv.*`` keys, Linear or conv shape).

        Returns ``False`` (and warns) when the weights carry no usable fc6/fc7, e.g. torchvision's
        ``IMAGENET1K_FEATURES`` (NaN classifier) or a file saved from a backbone cut at pool5.
        Raises :class:`~vggbackbone.WeightsError` when they exist but have the wrong shape.
        """
        problem = classifier_problem(state_dict, source)
        if problem:
            warnings.warn(f"{problem}; the box head starts from random init", stacklevel=3)
            return False
        tensors = {k: state_dict[k] for k in CLASSIFIER_KEYS}
        new = {
            "fc6.weight": tensors["features.fc6.conv.weight"].reshape(tensors["features.fc6.conv.weight"].shape[0], -1),
            "fc6.bias": tensors["features.fc6.conv.bias"],
            "fc7.weight": tensors["features.fc7.conv.weight"].reshape(tensors["features.fc7.conv.weight"].shape[0], -1),
            "fc7.bias": tensors["features.fc7.conv.bias"],
        }
        own = self.state_dict()
        wrong = [
            f"{k}: file {tuple(v.shape)} vs head {tuple(own[k].shape)}"
            for k, v in new.items()
            if v.shape != own[k].shape
        ]
        if wrong:
            raise WeightsError(f"{source}: classifier fc6/fc7 do not fit the box head: " + "; ".join(wrong))
        self.load_state_dict(new)
        return True


class RoIPoolSingleLevel(nn.Module):
    """Fast R-CNN's RoI max-pooling of one feature map, with ``MultiScaleRoIAlign``'s call signature.

    torchvision only ships the multi-scale *align* pooler for ``RoIHeads``; this wraps
    ``torchvision.ops.RoIPool`` (the op of the original paper) so ``roi_pool="pool"`` reproduces
    it. The stride is fixed by the backbone, so the scale is set, not inferred.
    """

    def __init__(self, featmap_name: str, output_size: int, stride: int) -> None:
        super().__init__()
        self.featmap_name = featmap_name
        self.pool = RoIPool((output_size, output_size), spatial_scale=1.0 / stride)

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        feat = x[self.featmap_name]
        if feat.device.type == "cpu" and feat.dtype in (torch.float16, torch.bfloat16):
            # torchvision's CPU RoIPool kernel has no half/bfloat16 version (CPU autocast)
            return self.pool(feat.float(), [b.float() for b in boxes])
        return self.pool(feat, boxes)


class VGGFPNBackbone(nn.Module):
    """``VGGBackbone`` taps through a ``FeaturePyramidNetwork`` (torchvision's ``BackboneWithFPN``).

    torchvision's ``BackboneWithFPN`` extracts taps with ``IntermediateLayerGetter``, which needs
    the taps to be direct children; ``VGGBackbone`` already returns named taps, so the body is
    the backbone itself.

    Output: ``OrderedDict`` ``"0".."k-1"`` (one per tap, strides of the taps) plus ``"pool"``
    (stride of the last tap x 2), each with ``out_channels`` channels.
    """

    def __init__(self, body: VGGBackbone, out_channels: int = 256, extra_blocks: nn.Module | None = None) -> None:
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(
            in_channels_list=body.feature_info.channels(),
            out_channels=out_channels,
            extra_blocks=LastLevelMaxPool() if extra_blocks is None else extra_blocks,
        )
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return self.fpn(self.body(x))


def check_detector_kwargs(
    cls: type[nn.Module], kwargs: dict[str, Any], *, own: Iterable[str], transform: Iterable[str], builder: str
) -> None:
    """Refuse keyword arguments ``cls`` would not use, by name.

    torchvision's detectors pass unknown ``**kwargs`` on to ``GeneralizedRCNNTransform``,
    which swallows them silently: a misspelt ``score_tresh`` would be ignored. Accepted: the
    named parameters of ``cls.__init__`` that the builder does not set itself (``own``), plus
    the transform options in ``transform``.
    """
    params = inspect.signature(cls.__init__).parameters
    named = [n for n, p in params.items() if n != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    accepted = [n for n in named if n not in set(own)] + list(transform)
    unknown = [k for k in kwargs if k not in accepted]
    if unknown:
        raise ValueError(
            f"{builder}: unknown argument(s) {unknown}; {cls.__name__} accepts {sorted(accepted)} "
            f"besides the builder's own arguments"
        )


def set_detector_normalization(
    model: nn.Module, normalization: InputNormalization, *, body: nn.Module | None = None
) -> None:
    """Make ``normalization`` the input statistics a torchvision detector applies and exposes.

    Sets the ``GeneralizedRCNNTransform``'s ``image_mean``/``image_std`` (read at every call, so
    setting them after construction is the same as passing them to the constructor),
    ``model.normalization`` and, when given, ``body.normalization`` (the ``VGGBackbone``'s
    attribute, for builders whose statistics can differ from what the backbone resolved, e.g. a
    whole-model file). Shared by :func:`fasterrcnn_vgg`, ``retinanet_vgg``, ``fcos_vgg`` and
    ``ssd_vgg``, which list ``image_mean``/``image_std`` among the arguments they set themselves.
    """
    model.transform.image_mean = list(normalization.mean)
    model.transform.image_std = list(normalization.std)
    model.normalization = normalization
    if body is not None:
        body.normalization = normalization


def fasterrcnn_vgg(
    arch: ArchSpec = "vgg16",
    num_classes: int = 91,
    weights_backbone: str | Path | Any | None = None,
    *,
    fpn: bool = False,
    width_mult: float = 1.0,
    frozen_stages: int | None = None,
    norm_layer: Callable[[int], nn.Module] | None = None,
    fpn_taps: Sequence[str] = ("conv3", "conv4", "conv5"),
    fpn_channels: int | None = None,
    anchor_sizes: Sequence[int] | None = None,
    aspect_ratios: Sequence[float] = ASPECT_RATIOS,
    roi_pool: Literal["align", "pool"] = "align",
    representation_size: int | None = None,
    box_head_dropout: float | None = None,
    min_size: int | Sequence[int] = 600,
    max_size: int = 1000,
    normalization: Any = None,
    allowed_border: float | None = None,
    rpn_loss_beta: float = TORCHVISION_BETA,
    box_loss_beta: float = TORCHVISION_BETA,
    pretrained: bool | None = None,
    progress: bool = True,
    **kwargs: Any,
) -> FasterRCNN:
    """Faster R-CNN with a VGG backbone (classic paper form, or with an FPN).

    Args:
        arch: any :class:`~vggbackbone.VGGBackbone` arch (``"vgg16"``, ``"vgg11_bn"``, a block
            spec...). A block spec needs 5 blocks (conv5).
        num_classes: object classes **plus background** (VOC: 21, COCO: 91).
        weights_backbone: backbone weights as :class:`~vggbackbone.VGGBackbone` takes them (file
            or torchvision name). In the classic form the classifier's fc6/fc7 initialise the
            box head (when the file has them).
        fpn: ``False``: classic single-level conv5 model; ``True``: FPN on ``fpn_taps``.
        width_mult: channel multiplier of the backbone and, unless given, of the FPN and box
            head widths (rounded to multiples of 8), for small CPU/edge models; ``1.0`` is the
            real VGG.
        frozen_stages: VGG blocks 1..k frozen. Default as torchvision's detectors: 2 (the
            paper's frozen conv1-conv2) when ``pretrained``, 0 when training from scratch.
        norm_layer: BatchNorm for ``_bn`` archs. Default as torchvision: ``FrozenBatchNorm2d``
            when ``pretrained``, ``BatchNorm2d`` from scratch.
        fpn_taps: backbone taps fed to the FPN (network order).
        fpn_channels: FPN width (default 256 x ``width_mult``).
        anchor_sizes: classic: sizes on conv5 (default (128, 256, 512)); FPN: one size per level
            including the pooled one (default (32, 64, 128, 256)).
        aspect_ratios: anchor height/width ratios, the same on every level.
        roi_pool: classic form only: ``"align"`` (RoIAlign, 7x7, sampling ratio 2; torchvision's
            choice, slightly better) or ``"pool"`` (the paper's RoIPool). The FPN form always
            uses ``MultiScaleRoIAlign``.
        representation_size: box-head width. Classic: fc6/fc7 width, default 4096 x
            ``width_mult`` (must be 4096 to load ImageNet classifier weights). FPN: 1024 x
            ``width_mult``.
        box_head_dropout: classic head's dropout after fc6 and fc7 (default 0.5, as VGG).
        min_size, max_size: torchvision's resize inside the model (shorter side to ``min_size``,
            longer side at most ``max_size``; a sequence of ``min_size`` picks one at random per
            training batch). Defaults: the paper's 600/1000.
        normalization: the input normalisation (``"imagenet"``, ``"caffe"``, a dict ``{mean,
            std}`` on ``[0, 1]`` RGB, or an :class:`~vggbackbone.weights.InputNormalization`);
            default: what the backbone weights carry (ImageNet for torchvision's). It becomes
            the ``GeneralizedRCNNTransform``'s ``image_mean``/``image_std``; for Caffe (BGR,
            0-255) weights the channel flip is folded into conv1_1 when they are loaded, so the
            model still takes RGB (see :func:`~vggbackbone.weights.load_backbone_weights`).
        allowed_border: RPN training only: ``None`` (torchvision) matches and samples every
            anchor; a number of pixels (py-faster-rcnn: 0) ignores the anchors that cross the
            image border by more (:class:`~vggbackbone.models.rcnn_training.BorderRPN`).
        rpn_loss_beta, box_loss_beta: smooth-L1 beta of the RPN's and the box head's box loss
            (torchvision: 1/9 both; py-faster-rcnn: 1/9 and 1, its sigma 3 and 1).
        pretrained: build the pretrained structure (``frozen_stages``, ``norm_layer`` defaults);
            ``None``: when ``weights_backbone`` is given. A model rebuilt from a checkpoint (no
            weights to load) passes ``True`` (:func:`~vggbackbone.models.core.pretrained_structure`).
        **kwargs: any other ``FasterRCNN`` argument (``box_nms_thresh``, ``rpn_pre_nms_top_n_test``...,
            and the transform's ``size_divisible``/``fixed_size``); an unknown one raises
            ``ValueError`` naming it (``FasterRCNN`` would pass it on to its transform, which
            ignores it). The classic form defaults to the paper's ``box_batch_size_per_image=128``
            and ``rpn_post_nms_top_n_test=300``.

    Returns:
        ``FasterRCNN``; ``model.backbone`` is the ``VGGBackbone`` (classic) or a
        :class:`VGGFPNBackbone` whose ``.body`` is; ``model.normalization`` the
        :class:`~vggbackbone.weights.InputNormalization` its transform applies. Images go in as a
        list of ``(3, H, W)`` RGB tensors in ``[0, 1]``.
    """
    check_detector_kwargs(FasterRCNN, kwargs, own=_FASTERRCNN_OWN, transform=TRANSFORM_KWARGS, builder="fasterrcnn_vgg")
    check_num_classes(num_classes, 2, "fasterrcnn_vgg", background=True)
    cfg = get_config(arch)
    require_blocks(cfg, 5, "fasterrcnn_vgg", "conv5 at stride 16")
    if roi_pool not in ("align", "pool"):
        raise ValueError(f"roi_pool must be 'align' or 'pool', got {roi_pool!r}")
    pretrained = is_pretrained(pretrained, weights_backbone)
    structure = pretrained_structure(
        cfg, pretrained, frozen_stages, norm_layer, frozen_when_pretrained=2, builder="fasterrcnn_vgg"
    )
    trunk = dict(width_mult=width_mult, normalization=normalization, progress=progress)
    ratios = tuple(float(r) for r in aspect_ratios)
    if fpn:
        fpn_channels = fpn_channels or scale_width(256, width_mult)
        parts = _fpn_parts(arch, weights_backbone, structure, trunk, fpn_taps, fpn_channels, anchor_sizes, ratios)
        rep = representation_size or scale_width(1024, width_mult)
        box_head: nn.Module = TwoMLPHead(fpn_channels * 7 * 7, rep)
    else:
        parts = _classic_parts(arch, weights_backbone, structure, trunk, anchor_sizes, ratios)
        rep = representation_size or scale_width(4096, width_mult)
        box_head = VGGBoxHead(parts.body.out_channels, rep, 0.5 if box_head_dropout is None else box_head_dropout)
        if parts.read is not None:
            box_head.load_classifier(parts.read.state_dict, parts.read.description)
        kwargs.setdefault("box_batch_size_per_image", 128)
        kwargs.setdefault("rpn_post_nms_top_n_test", 300)
    model = FasterRCNN(
        parts.backbone,
        num_classes=None,  # given through box_predictor: FasterRCNN's own assumes a 1024-wide head
        min_size=(min_size,) if isinstance(min_size, int) else tuple(int(s) for s in min_size),
        max_size=max_size,
        rpn_anchor_generator=parts.anchors,
        box_roi_pool=parts.pooler,
        box_head=box_head,
        box_predictor=FastRCNNPredictor(rep, num_classes),
        **kwargs,
    )
    if not fpn and roi_pool == "pool":  # FasterRCNN only accepts a MultiScaleRoIAlign: swap it after
        model.roi_heads.box_roi_pool = RoIPoolSingleLevel(
            "0", output_size=7, stride=parts.body.feature_info.reduction(0)
        )
    use_reference_training(
        model, allowed_border=allowed_border, rpn_loss_beta=rpn_loss_beta, box_loss_beta=box_loss_beta
    )
    set_detector_normalization(model, parts.body.normalization)
    return model


class _Parts(NamedTuple):
    """The pieces of a Faster R-CNN that differ between the classic and the FPN form."""

    body: VGGBackbone
    read: ReadWeights | None
    backbone: nn.Module
    anchors: AnchorGenerator
    pooler: nn.Module


def _fpn_parts(
    arch: ArchSpec,
    weights: Any,
    structure: Structure,
    trunk: dict[str, Any],
    fpn_taps: Sequence[str],
    channels: int,
    anchor_sizes: Sequence[int] | None,
    ratios: tuple[float, ...],
) -> _Parts:
    """FPN form: ``fpn_taps`` (+ a pooled level) through torchvision's FPN, one anchor size per level."""
    taps = list(fpn_taps)
    sizes = tuple(anchor_sizes) if anchor_sizes is not None else FPN_ANCHOR_SIZES
    num_levels = len(taps) + 1
    if len(sizes) != num_levels:
        raise ValueError(
            f"FPN on {taps} + pool has {num_levels} levels; anchor_sizes needs one size per level, got {sizes}"
        )
    return_layers = {t: str(i) for i, t in enumerate(taps)}
    body, read = build_trunk(arch, return_layers, weights, **structure.backbone_kwargs(), **trunk)
    level_names = [str(i) for i in range(len(taps))]  # the pooled level only feeds the RPN
    return _Parts(
        body,
        read,
        VGGFPNBackbone(body, out_channels=channels),
        AnchorGenerator(tuple((s,) for s in sizes), (ratios,) * num_levels),
        MultiScaleRoIAlign(featmap_names=level_names, output_size=7, sampling_ratio=2),
    )


def _classic_parts(
    arch: ArchSpec,
    weights: Any,
    structure: Structure,
    trunk: dict[str, Any],
    anchor_sizes: Sequence[int] | None,
    ratios: tuple[float, ...],
) -> _Parts:
    """Classic form: conv5 alone, the paper's 9 anchors, 7x7 RoI pooling."""
    sizes = tuple(anchor_sizes) if anchor_sizes is not None else CLASSIC_ANCHOR_SIZES
    body, read = build_trunk(arch, {"conv5": "0"}, weights, **structure.backbone_kwargs(), **trunk)
    pooler = MultiScaleRoIAlign(featmap_names=["0"], output_size=7, sampling_ratio=2)
    return _Parts(body, read, body, AnchorGenerator((sizes,), (ratios,)), pooler)
