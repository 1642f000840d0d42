"""FCN-32s / FCN-16s / FCN-8s (Long, Shelhamer & Darrell, "Fully Convolutional Networks for
Semantic Segmentation", CVPR 2015 / PAMI 2017) on :class:`~vggbackbone.VGGBackbone`.

The network, as in the reference Caffe models (``voc-fcn{32,16,8}s``, ``voc-fcn8s-atonce``)::

    fc7 (stride 32) -> drop7 -> score_fr ──upscore2 (x2)──┐
    pool4 (stride 16) -> x pool4_scale -> score_pool4 ─────+──upscore_pool4 (x2)─┐
    pool3 (stride 8)  -> x pool3_scale -> score_pool3 ───────────────────────────+─upscore8 (x8)─> crop (N,K,H,W)

* fc6/fc7 are the VGG classifier turned into convolutions (7x7 and 1x1), loaded from the
  classifier weights by :class:`VGGBackbone` (``fc6``/``fc7`` taps);
* score layers are zero-initialised, so training starts from "predict the bias";
* upsampling layers are transposed convolutions initialised to bilinear interpolation; the x2
  ones are learned, the final one (x32, x16 or x8) stays fixed, as in the paper;
* **FCN-8s "at once"**: the skips are scaled by ``pool4_scale=0.01`` and ``pool3_scale=1e-4``
  (the reference ``voc-fcn8s-atonce``), which makes the finer skips start learning slowly, as if
  the 32s -> 16s -> 8s stages had been run one after the other. Set both to 1 to turn it off.

Alignment: ``fc_padding="same"``, a deliberate difference from the reference. The reference
(``voc-fcn8s/net.py``) pads conv1_1 by 100 pixels because its fc6 is an unpadded ("valid") 7x7
conv, as in the VGG paper's dense evaluation, and then crops the upsampled maps at offsets 5, 9
and 31. Here the backbone is built with ``fc_padding="same"`` (fc6 padded by 3, the backbone's
default is "valid") and Caffe's ``ceil_mode`` pools, so every map stays aligned: a stride-``s``
map has ``ceil(H / s)`` rows whose row ``i`` is centred on input row ``s * i + (s - 1) / 2``.
Every crop is then at offset 0 and only trims the extra rows that ``ceil`` adds: the output is
exactly ``H x W`` for any ``H, W >= 1`` and no compute is spent on a 100-pixel frame. Both forms
use the same fc6 weights; they differ only at the border cells of fc6, which here see zeros
where the reference's see the padded frame.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..vgg import ArchSpec, VGGBackbone, get_config
from .core import NormalizingModel, build_trunk, check_num_classes, require_blocks

__all__ = [
    "FCN",
    "FCN_TAPS",
    "BilinearUpsample",
    "bilinear_kernel",
    "fcn_vgg",
    "skip_activation_rms",
    "skip_probe",
]

logger = logging.getLogger(__name__)

FCNVariant = Literal["32s", "16s", "8s"]

#: Backbone taps each variant fuses, shallowest first.
FCN_TAPS: dict[str, list[str]] = {"32s": ["fc7"], "16s": ["pool4", "fc7"], "8s": ["pool3", "pool4", "fc7"]}


def _variant_taps(variant: str) -> list[str]:
    if variant not in FCN_TAPS:
        raise ValueError(f"FCN variant must be '32s', '16s' or '8s', got {variant!r}")
    return FCN_TAPS[variant]


def bilinear_kernel(factor: int) -> Tensor:
    """The ``(2 * factor, 2 * factor)`` bilinear filter of FCN's ``upsample_filt`` (even sizes)."""
    size = 2 * factor
    center = factor - 0.5
    og = torch.arange(size, dtype=torch.float64)
    filt = 1 - (og - center).abs() / factor
    return (filt[:, None] * filt[None, :]).float()


class BilinearUpsample(nn.Module):
    """Upsample ``(N, C, h, w)`` by an even ``factor`` with a transposed conv initialised to bilinear.

    ``ConvTranspose2d(C, C, 2 * factor, stride=factor, padding=factor // 2)`` whose weight is
    the bilinear kernel on the channel diagonal (FCN's ``interp`` surgery), applied to the input
    replicate-padded by one pixel: at initialisation the output equals
    ``F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False)``, borders
    included (a plain transposed conv would fade the border rows towards zero). ``forward(x,
    size)`` returns the top-left ``size`` of the ``(h * factor, w * factor)`` result.

    ``learnable=False`` keeps the kernel fixed (and per channel, ``groups=C``: no cross-channel
    terms to learn).
    """

    def __init__(self, channels: int, factor: int, learnable: bool = True) -> None:
        super().__init__()
        if factor < 2 or factor % 2:
            raise ValueError(f"upsampling factor must be even and >= 2, got {factor}")
        self.factor = factor
        groups = 1 if learnable else channels
        self.deconv = nn.ConvTranspose2d(
            channels, channels, 2 * factor, stride=factor, padding=factor // 2, groups=groups, bias=False
        )
        self.reset_parameters()
        self.deconv.weight.requires_grad_(learnable)

    def reset_parameters(self) -> None:
        w = self.deconv.weight
        kernel = bilinear_kernel(self.factor)
        with torch.no_grad():
            w.zero_()
            if self.deconv.groups == 1:
                idx = torch.arange(w.shape[0])
                w[idx, idx] = kernel
            else:
                w[:, 0] = kernel

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        h, w = x.shape[-2:]
        if size[0] > h * self.factor or size[1] > w * self.factor:
            raise ValueError(f"cannot upsample {h}x{w} by {self.factor} to {size[0]}x{size[1]}")
        y = self.deconv(F.pad(x, (1, 1, 1, 1), mode="replicate"))
        f = self.factor  # the one-pixel pad shifted the output by `factor` rows and columns
        return y[..., f : f + size[0], f : f + size[1]]


class FCN(NormalizingModel):
    """FCN head on a :class:`VGGBackbone` returning ``pool3`` (8s), ``pool4`` (16s, 8s) and ``fc7``,
    built with ``fc_padding="same"`` (see the module docstring for why not the reference's valid fc6).

    Input ``(N, C, H, W)`` images in ``[0, 1]`` (RGB), normalised inside with
    :attr:`normalization` (the backbone's: what its weights expect); output logits
    ``(N, num_classes, H, W)``.
    """

    def __init__(
        self,
        backbone: VGGBackbone,
        num_classes: int,
        variant: FCNVariant = "8s",
        *,
        pool4_scale: float = 0.01,
        pool3_scale: float = 1e-4,
        score_dropout: float = 0.5,
        learn_upsampling: bool = True,
        skip_factors: tuple[float, float] | None = None,
    ) -> None:
        super().__init__(backbone.normalization)
        needed = _variant_taps(variant)
        missing = [t for t in needed if t not in backbone.return_layers]
        if missing:
            raise ValueError(f"FCN-{variant} needs backbone taps {needed}; missing {missing}")
        if backbone.fc_padding != "same":
            raise ValueError(
                "FCN aligns its skips with stride-aligned fc6/fc7 maps: build the backbone with fc_padding='same' "
                f"(got {backbone.fc_padding!r}; see the module docstring)"
            )
        self.backbone = backbone
        self.variant = variant
        self.num_classes = check_num_classes(num_classes, 1, "FCN")
        self.pool4_scale = pool4_scale
        self.pool3_scale = pool3_scale
        # (pool4, pool3) multipliers of the skip scales, measured at build time (fcn_vgg's
        # skip_rms_reference); a buffer so a checkpoint keeps them; None (not in the state dict): off
        factors = None if skip_factors is None else torch.tensor([float(f) for f in skip_factors])
        self.register_buffer("skip_factors", factors)
        channels = dict(zip(backbone.return_layers, backbone.feature_info.channels()))

        self.drop7 = nn.Dropout(score_dropout) if score_dropout > 0 else nn.Identity()
        self.score_fr = nn.Conv2d(channels["fc7"], num_classes, 1)
        final = 32
        if variant in ("16s", "8s"):
            self.score_pool4 = nn.Conv2d(channels["pool4"], num_classes, 1)
            self.upscore2 = BilinearUpsample(num_classes, 2, learnable=learn_upsampling)
            final = 16
        if variant == "8s":
            self.score_pool3 = nn.Conv2d(channels["pool3"], num_classes, 1)
            self.upscore_pool4 = BilinearUpsample(num_classes, 2, learnable=learn_upsampling)
            final = 8
        self.upscore = BilinearUpsample(num_classes, final, learnable=False)
        for m in (self.score_fr, getattr(self, "score_pool4", None), getattr(self, "score_pool3", None)):
            if m is not None:  # FCN zero-initialises every score layer
                nn.init.zeros_(m.weight)
                nn.init.zeros_(m.bias)

    def _key(self, tap: str) -> str:
        return self.backbone.return_layers[tap]

    def forward(self, x: Tensor) -> Tensor:
        """``(N, C, H, W)`` in ``[0, 1]`` -> logits ``(N, num_classes, H, W)``."""
        feats = self.backbone(self.normalize_input(x))
        score = self.score_fr(self.drop7(feats[self._key("fc7")]))  # stride 32
        factors = self.skip_factors
        if self.variant != "32s":
            pool4 = feats[self._key("pool4")]
            scale4 = self.pool4_scale if factors is None else self.pool4_scale * factors[0]
            skip = self.score_pool4(pool4 * scale4)
            score = self.upscore2(score, (skip.shape[-2], skip.shape[-1])) + skip  # stride 16
        if self.variant == "8s":
            pool3 = feats[self._key("pool3")]
            scale3 = self.pool3_scale if factors is None else self.pool3_scale * factors[1]
            skip = self.score_pool3(pool3 * scale3)
            score = self.upscore_pool4(score, (skip.shape[-2], skip.shape[-1])) + skip  # stride 8
        return self.upscore(score, (x.shape[-2], x.shape[-1]))


def skip_probe(batch: int = 4, size: int = 224) -> Tensor:
    """The fixed images the skip activations are measured on: ``(batch, 3, size, size)`` in ``[0, 1]``.

    Smooth random colour fields (an 8x8 uniform grid per image, seed 0, bilinearly upsampled):
    the same on every machine, closer to photographs' low frequencies than white noise. Both
    sides of a ratio (:func:`skip_activation_rms`) must be measured on the same probe.
    """
    g = torch.Generator().manual_seed(0)
    grid = torch.rand(batch, 3, 8, 8, generator=g, dtype=torch.float64)
    return F.interpolate(grid, size=(size, size), mode="bilinear", align_corners=False).float()


@torch.no_grad()
def skip_activation_rms(
    backbone: VGGBackbone | Any, probe: Tensor | None = None, **backbone_kwargs: Any
) -> dict[str, float]:
    """Root mean square of ``pool3`` and ``pool4`` on :func:`skip_probe`, each backbone with its own
    input normalisation: ``{"pool3": ..., "pool4": ...}``.

    ``backbone``: a :class:`VGGBackbone` returning ``pool3`` and ``pool4``, or weights to build
    one from (a ``.caffemodel``, a file, ``"IMAGENET1K_V1"``; ``backbone_kwargs`` such as ``arch``
    (default ``"vgg16"``) and ``width_mult`` go to it, built with FCN's Caffe ``ceil_mode``).
    """
    if not isinstance(backbone, VGGBackbone):
        kwargs = {"arch": "vgg16", "ceil_mode": True, **backbone_kwargs}
        backbone = VGGBackbone(kwargs.pop("arch"), ["pool3", "pool4"], weights=backbone, **kwargs)
    taps = [t for t in ("pool3", "pool4") if t in backbone.return_layers]
    if not taps:
        raise ValueError(f"skip_activation_rms needs a backbone returning pool3 or pool4, got {backbone.return_layers}")
    x = skip_probe() if probe is None else probe
    was_training = backbone.training
    backbone.eval()
    try:
        feats = backbone(backbone.normalization(x))
    finally:
        backbone.train(was_training)
    return {t: float(feats[backbone.return_layers[t]].double().pow(2).mean().sqrt()) for t in taps}


def _skip_factors(backbone: VGGBackbone, reference: Any, width_mult: float, arch: ArchSpec) -> tuple[float, float]:
    """``(pool4, pool3)`` factors ``RMS_reference / RMS_ours`` (see ``fcn_vgg(skip_rms_reference=...)``)."""
    if isinstance(reference, Mapping):
        unknown = sorted(set(reference) - {"pool3", "pool4"})
        if unknown or len(reference) != 2:
            raise ValueError(
                f"skip_rms_reference: a mapping needs exactly pool3 and pool4 RMS values, got {dict(reference)}"
            )
        ref = {k: float(v) for k, v in reference.items()}
        described = "the given RMS values"
    else:
        ref = skip_activation_rms(reference, arch=arch, width_mult=width_mult)
        described = str(reference)
    ours = skip_activation_rms(backbone)  # the taps this variant has (16s: pool4 only)
    bad = [k for k in ours if not (math.isfinite(ref[k]) and ref[k] > 0 and ours[k] > 0)]
    if bad:
        raise ValueError(
            f"skip_rms_reference: RMS of {bad} not positive and finite: reference {ref}, this model {ours}"
        )
    f4, f3 = (ref[k] / ours[k] if k in ours else 1.0 for k in ("pool4", "pool3"))
    logger.info(
        "fcn_vgg: skip activation RMS on the probe: this model %s, reference (%s) %s: pool4_scale x %.4g, "
        "pool3_scale x %.4g",
        ours, described, ref, f4, f3,
    )  # fmt: skip
    return f4, f3


def fcn_vgg(
    arch: ArchSpec = "vgg16",
    num_classes: int = 21,
    variant: FCNVariant = "8s",
    weights_backbone: Any = None,
    *,
    in_channels: int = 3,
    batch_norm: bool | None = None,
    frozen_stages: int = 0,
    norm_layer: Callable[[int], nn.Module] | None = None,
    norm_eval: bool = False,
    width_mult: float = 1.0,
    fc_channels: int | None = None,
    fc_dropout: float = 0.5,
    normalization: Any = None,
    pool4_scale: float = 0.01,
    pool3_scale: float = 1e-4,
    learn_upsampling: bool = True,
    skip_rms_reference: str | dict[str, float] | None = None,
) -> FCN:
    """FCN-``variant`` on VGG ``arch`` (any paper config, ``_bn`` variant or 5-block custom spec).

    Args:
        arch: VGG arch name or block spec (5 blocks: the skips are pool3 and pool4).
        num_classes: classes including background (21 for PASCAL VOC).
        variant: ``"32s"``, ``"16s"`` or ``"8s"``.
        weights_backbone: backbone weights (path or torchvision weights name); fc6/fc7 come
            from the classifier weights.
        in_channels, batch_norm, frozen_stages, norm_layer, norm_eval, width_mult, fc_channels,
            fc_dropout, normalization: passed to :class:`VGGBackbone` (built with Caffe's
            ``ceil_mode=True`` pools and ``fc_padding="same"`` so any input size works and every
            map stays aligned).
        pool4_scale, pool3_scale: skip scaling of FCN-8s "at once" (reference values 0.01 and
            1e-4); ``1.0`` disables it.
        learn_upsampling: learn the x2 upsamplings (the final one is always fixed bilinear).
        skip_rms_reference: ``None`` (default): the skips are scaled by ``pool4_scale`` and
            ``pool3_scale`` as given. Otherwise the weights those scales were tuned for (the
            reference's Caffe VGG16: a ``.caffemodel`` path) or their ``{"pool3": rms, "pool4":
            rms}`` measured before with :func:`skip_activation_rms`: at build time the RMS of this
            model's pool3/pool4 on :func:`skip_probe` is measured and each scale multiplied by
            ``RMS_reference / RMS_this``, so the skip branches see inputs of the reference's
            magnitude (with zero-initialised score layers, the same step sizes at the start). The
            factors are a buffer (``skip_factors``) that checkpoints keep; built without
            ``weights_backbone`` (a checkpoint about to be loaded) they are 1 until its state
            dict sets them.

    Returns:
        :class:`FCN`, mapping ``(N, in_channels, H, W)`` images in ``[0, 1]`` to logits
        ``(N, num_classes, H, W)``; it normalises its input itself (``model.normalization``:
        ``normalization`` if given, else what the weights carry, else ImageNet's).
    """
    taps = _variant_taps(variant)
    require_blocks(get_config(arch, batch_norm), 5, "fcn_vgg", "pool3/pool4/fc7 at strides 8/16/32")
    backbone, _ = build_trunk(
        arch,
        taps,
        weights_backbone,
        in_channels=in_channels,
        batch_norm=batch_norm,
        frozen_stages=frozen_stages,
        norm_layer=norm_layer,
        norm_eval=norm_eval,
        ceil_mode=True,
        width_mult=width_mult,
        fc_channels=fc_channels,
        fc_dropout=fc_dropout,
        fc_padding="same",
        normalization=normalization,
    )
    factors = None
    if skip_rms_reference is not None:
        if variant == "32s":
            raise ValueError("skip_rms_reference rescales the pool3/pool4 skips: FCN-32s has none")
        if weights_backbone is None:
            logger.info(
                "fcn_vgg: skip_rms_reference without weights_backbone: skip factors 1 until a state dict sets them"
            )
            factors = (1.0, 1.0)
        else:
            factors = _skip_factors(backbone, skip_rms_reference, width_mult, arch)
    return FCN(
        backbone,
        num_classes,
        variant,
        pool4_scale=pool4_scale,
        pool3_scale=pool3_scale,
        learn_upsampling=learn_upsampling,
        skip_factors=factors,
    )
