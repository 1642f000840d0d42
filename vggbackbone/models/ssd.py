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

import json
import logging
import os
import re
import warnings
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.anchor_utils import DefaultBoxGenerator
from torchvision.models.detection.ssd import SSD, SSDHead
from torchvision.ops.misc import FrozenBatchNorm2d

from ..utils import atomic_path, make_divisible
from ..vgg import ArchSpec, VGGBackbone, get_config
from ..weights import (
    FORMAT,
    InputNormalization,
    WeightsError,
    load_state_dict_file,
    load_vgg_state_dict,
    resolve_normalization,
)
from .detection import check_detector_kwargs, set_detector_normalization

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
#: The input statistics of torchvision's ssd300_vgg16 (Caffe VGG16: 0-255 RGB minus the mean).
TORCHVISION_SSD_NORMALIZATION = InputNormalization(
    (0.48235, 0.45882, 0.40784), (1.0 / 255.0, 1.0 / 255.0, 1.0 / 255.0), "torchvision_ssd"
)
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

        def scaled(c: int) -> int:
            return c if width_mult == 1.0 else make_divisible(c * width_mult)

        extra: OrderedDict[str, nn.Module] = OrderedDict()
        in_ch = fc_channels
        out_channels = [c4, fc_channels]
        for name, mid, out, k, s, p in _EXTRAS[size]:
            mid, out = scaled(mid), scaled(out)
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


# ---------------------------------------------------------------------------- weights files
_TV_PREFIX = re.compile(r"^backbone\.(features|extra)\.(\d+(?:\.\d+)*)$")


def _param_prefixes(module: nn.Module) -> list[str]:
    """Names of the sub-modules holding parameters/buffers, in registration (forward) order."""
    return [n for n, m in module.named_modules() if any(True for _ in m.parameters(recurse=False))]


def _torchvision_key_map(sd: Mapping[str, Tensor], model: SSD) -> dict[str, str]:
    """torchvision ``ssd300_vgg16`` keys -> this model's keys.

    torchvision's backbone is ``features`` (VGG ``features[:pool4]``, flat indices) then
    ``extra.0`` (pool4, conv5_x, then pool5/fc6/fc7 as ``extra.0.7``) and ``extra.1..4``
    (conv8..conv11): its parameter layers, in network order, are this model's ``body`` convs,
    ``fc.fc6``, ``fc.fc7`` and ``extra.convK.convK_{1,2}`` in the same order; the L2Norm scale
    ``scale_weight`` is ``l2norm.weight``; the head keys are the same (torchvision's ``SSDHead``).
    """
    prefixes: list[str] = []
    for k in sd:
        if k.startswith(("backbone.features.", "backbone.extra.")):
            p = k.rsplit(".", 1)[0]
            if not _TV_PREFIX.match(p):
                raise WeightsError(f"unexpected key {k!r} in a torchvision SSD state dict")
            if p not in prefixes:
                prefixes.append(p)

    def order(p: str) -> tuple[int, tuple[int, ...]]:  # network order, whatever order the file has
        m = _TV_PREFIX.match(p)
        assert m is not None
        return (0 if m.group(1) == "features" else 1, tuple(int(i) for i in m.group(2).split(".")))

    prefixes.sort(key=order)
    bb = model.backbone
    ours = [f"backbone.{n}" for n in _param_prefixes(bb) if n != "l2norm"]
    if len(prefixes) != len(ours):
        raise WeightsError(
            f"the torchvision SSD state dict has {len(prefixes)} backbone layers with weights, this "
            f"ssd_vgg({bb.body.arch}, size={bb.size}) has {len(ours)}: build ssd_vgg('vgg16', size=300) for it"
        )
    key_map = {"backbone.scale_weight": "backbone.l2norm.weight"}
    for theirs, mine in zip(prefixes, ours, strict=True):
        for k in sd:
            if k.rsplit(".", 1)[0] == theirs:
                key_map[k] = f"{mine}.{k.rsplit('.', 1)[1]}"
    for k in sd:
        if k.startswith("head."):
            key_map[k] = k
    return key_map


def load_ssd_weights(model: SSD, weights: str | os.PathLike[str]) -> InputNormalization | None:
    """Load a whole-SSD state dict file into ``model`` (built by :func:`ssd_vgg`), strictly.

    Understands torchvision's ``ssd300_vgg16`` state dicts (through an explicit key map, see
    :func:`_torchvision_key_map`) and files of this package (``model.state_dict()`` or
    :func:`save_ssd_weights`). Read with ``torch.load(weights_only=True)`` or safetensors.
    Returns the input normalisation the file declares (torchvision's SSD statistics for a
    torchvision file), or ``None`` when it declares none. Raises
    :class:`~vggbackbone.WeightsError` naming missing, unexpected or mis-shaped keys.
    """
    sd, meta = load_state_dict_file(weights)
    norm: InputNormalization | None = None
    if "backbone.scale_weight" in sd:  # torchvision's SSDFeatureExtractorVGG
        key_map = _torchvision_key_map(sd, model)
        sd = {key_map[k]: v for k, v in sd.items()}
        norm = TORCHVISION_SSD_NORMALIZATION
        source = "torchvision ssd300_vgg16"
    else:
        source = "vggbackbone ssd_vgg"
        if "normalization" in meta:
            norm = InputNormalization.from_dict(meta["normalization"])
    own = model.state_dict()
    missing = [k for k in own if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in own]
    if missing or unexpected:
        raise WeightsError(
            f"{weights} ({source} layout) does not match this ssd_vgg\n"
            f"  missing keys ({len(missing)}): {missing[:8]}{' ...' if len(missing) > 8 else ''}\n"
            f"  unexpected keys ({len(unexpected)}): {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}"
        )
    shapes = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}" for k, v in sd.items() if v.shape != own[k].shape
    ]
    if shapes:
        raise WeightsError(f"{weights} has tensors of the wrong shape for this ssd_vgg:\n  " + "\n  ".join(shapes[:8]))
    nonfinite = [k for k, v in sd.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if nonfinite:
        raise WeightsError(f"{weights} has non-finite values in {nonfinite[:4]}")
    model.load_state_dict(sd, strict=False)  # strict in effect: only num_batches_tracked may be absent
    return norm


def save_ssd_weights(model: SSD, path: str | os.PathLike[str]) -> Path:
    """Write ``model``'s state dict with its input normalisation (``.pth``/``.safetensors``), atomically.

    Loads back with ``ssd_vgg(..., weights=path)``, normalisation included.
    """
    path = Path(path)
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    t = model.transform
    declared = getattr(model, "normalization", None)
    name = declared.name if isinstance(declared, InputNormalization) else "custom"
    norm = InputNormalization(tuple(t.image_mean), tuple(t.image_std), name)  # what the model really applies
    with atomic_path(path) as tmp:
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(sd, str(tmp), metadata={"format": FORMAT, "normalization": json.dumps(norm.to_dict())})
        else:
            torch.save({"format": FORMAT, "model": "ssd_vgg", "normalization": norm.to_dict(), "state_dict": sd}, tmp)
    return path


# ---------------------------------------------------------------------------- builder
def _classifier_state(weights_backbone: Any, arch: ArchSpec, progress: bool) -> tuple[bool, str]:
    """Whether the backbone weights carry a finite fc6/fc7 classifier, and the file's description."""
    sd, _, _, _, desc = load_vgg_state_dict(weights_backbone, get_config(arch), progress=progress)
    fc = [k for k in sd if k.startswith(("features.fc6.", "features.fc7."))]
    if not fc:
        return False, f"{desc} has no classifier fc6/fc7"
    if not all(torch.isfinite(sd[k]).all() for k in fc):
        return False, f"{desc} has a non-finite classifier fc6/fc7 (e.g. torchvision's IMAGENET1K_FEATURES)"
    return True, desc


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
            (``trainable_backbone_layers=4``): 1 with pretrained weights, 0 from scratch.
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
        **kwargs: ``SSD`` arguments (``score_thresh=0.01``, ``nms_thresh=0.45``,
            ``detections_per_img=200``, ``iou_thresh=0.5``, ``topk_candidates=400``,
            ``positive_fraction=0.25``, ``head``); any other name is refused.

    Returns:
        torchvision ``SSD``; ``model.backbone`` is an :class:`SSDVGGBackbone` whose ``.body`` is
        the ``VGGBackbone``; ``model.normalization`` the input statistics. Images go in as a
        list of ``(3, H, W)`` tensors in ``[0, 1]``.
    """
    if num_classes < 2:
        raise ValueError(f"num_classes counts the background too: at least 2, got {num_classes}")
    if size not in _EXTRAS:
        raise ValueError(f"size must be 300 or 512, got {size!r}")
    if weights is not None and weights_backbone is not None:
        raise ValueError("give weights (a whole SSD) or weights_backbone (the VGG), not both")
    if fc_init not in ("auto", "classifier", "random"):
        raise ValueError(f"fc_init must be 'auto', 'classifier' or 'random', got {fc_init!r}")
    check_detector_kwargs(SSD, kwargs, own=_SSD_OWN, transform=("_skip_resize",), builder="ssd_vgg")
    cfg = get_config(arch)
    if len(cfg.blocks) != 5:
        raise ValueError(
            f"ssd_vgg needs a 5-block VGG (conv4 at stride 8, conv5 at 16), got {len(cfg.blocks)}: {arch!r}"
        )
    pretrained = weights is not None or weights_backbone is not None
    if frozen_stages is None:
        frozen_stages = 1 if pretrained else 0
    if not 0 <= frozen_stages <= 5:
        raise ValueError(f"frozen_stages must be in 0..5 for SSD (its fc6/fc7 are SSD's own), got {frozen_stages}")
    if cfg.batch_norm and norm_layer is None:
        norm_layer = FrozenBatchNorm2d if pretrained else nn.BatchNorm2d

    def scaled(c: int) -> int:
        return c if width_mult == 1.0 else make_divisible(c * width_mult)

    fc_ch = fc_channels or scaled(1024)
    common: dict[str, Any] = dict(width_mult=width_mult, ceil_mode=True, progress=progress)
    if norm_layer is not None:
        common["norm_layer"] = norm_layer
    body = VGGBackbone(
        arch,
        return_layers={"conv4": "conv4", "conv5": "conv5"},
        weights=weights_backbone,
        frozen_stages=frozen_stages,
        normalization=normalization if weights is None else None,
        **common,
    )
    backbone = SSDVGGBackbone(
        body, size=size, fc_channels=fc_ch, width_mult=width_mult, extra_norm=nn.BatchNorm2d if extra_norm else None
    )

    if fc_init != "random" and weights is None:
        if weights_backbone is None:
            if fc_init == "classifier":
                raise WeightsError("fc_init='classifier' needs weights_backbone with the VGG classifier")
            logger.info("ssd_vgg: no weights: fc6/fc7 start from random (xavier) init")
        else:
            usable, why = _classifier_state(weights_backbone, arch, progress)
            if usable:
                # build the full backbone to fc7 from the same weights: its strict loader checks the file
                full = VGGBackbone(arch, return_layers=["fc7"], weights=weights_backbone, **common)
                convs = {
                    fc: next(m for n, m in full.named_modules() if isinstance(m, nn.Conv2d) and fc in n)
                    for fc in ("fc6", "fc7")
                }
                backbone.load_classifier(
                    convs["fc6"].weight, convs["fc6"].bias, convs["fc7"].weight, convs["fc7"].bias, why
                )
                del full
                logger.info("ssd_vgg: fc6/fc7 subsampled from the classifier of %s", why)
            elif fc_init == "classifier":
                raise WeightsError(f"fc_init='classifier': {why}")
            else:
                warnings.warn(f"ssd_vgg: {why}; fc6/fc7 start from random (xavier) init", stacklevel=2)
    if isinstance(box_scales, str):
        if (box_scales, size) not in SSD_BOX_SCALES:
            raise ValueError(f"box_scales must be 'coco', 'voc' or a sequence of floats, got {box_scales!r}")
        scales = list(SSD_BOX_SCALES[(box_scales, size)])
    else:
        scales = [float(s) for s in box_scales]
    n_sources = len(backbone.out_channels)
    if len(scales) != n_sources + 1:
        raise ValueError(f"SSD{size} has {n_sources} sources: box_scales needs {n_sources + 1} values, got {scales}")
    anchor_gen = DefaultBoxGenerator(
        [list(r) for r in SSD_ASPECT_RATIOS[size]],
        scales=scales,
        steps=list(SSD_STEPS[size]),
        clip=clip_default_boxes,
    )

    model_norm = body.normalization
    if normalization is not None:
        model_norm = resolve_normalization(normalization, body.in_channels)
    kwargs.setdefault("head", SSDHead(backbone.out_channels, anchor_gen.num_anchors_per_location(), num_classes))
    model = SSD(backbone, anchor_gen, (size, size), num_classes, **kwargs)
    if weights is not None:
        file_norm = load_ssd_weights(model, weights)
        if normalization is None:
            if file_norm is None:
                warnings.warn(
                    f"ssd_vgg: {weights} declares no input normalisation (a plain state dict): using "
                    f"{model_norm.name} statistics; pass normalization= or save with save_ssd_weights",
                    stacklevel=2,
                )
            else:
                model_norm = file_norm
    # body too: with a whole-SSD file the statistics are the file's, not what the body resolved
    set_detector_normalization(model, model_norm, body=body)
    return model
