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

from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..vgg import ArchSpec, VGGBackbone, get_config
from ..weights import InputNormalization, NormalizeInput

__all__ = ["FCN", "FCN_TAPS", "BilinearUpsample", "bilinear_kernel", "fcn_vgg"]

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


class FCN(nn.Module):
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
    ) -> None:
        super().__init__()
        needed = _variant_taps(variant)
        missing = [t for t in needed if t not in backbone.return_layers]
        if missing:
            raise ValueError(f"FCN-{variant} needs backbone taps {needed}; missing {missing}")
        if backbone.fc_padding != "same":
            raise ValueError(
                "FCN aligns its skips with stride-aligned fc6/fc7 maps: build the backbone with fc_padding='same' "
                f"(got {backbone.fc_padding!r}; see the module docstring)"
            )
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.backbone = backbone
        self.variant = variant
        self.num_classes = num_classes
        self.input_norm = NormalizeInput(backbone.normalization)
        self.pool4_scale = pool4_scale
        self.pool3_scale = pool3_scale
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

    @property
    def normalization(self) -> InputNormalization:
        """The :class:`~vggbackbone.weights.InputNormalization` this model applies to its ``[0, 1]`` input."""
        return self.input_norm.normalization

    def _key(self, tap: str) -> str:
        return self.backbone.return_layers[tap]

    def forward(self, x: Tensor) -> Tensor:
        """``(N, C, H, W)`` in ``[0, 1]`` -> logits ``(N, num_classes, H, W)``."""
        feats = self.backbone(self.input_norm(x))
        score = self.score_fr(self.drop7(feats[self._key("fc7")]))  # stride 32
        if self.variant != "32s":
            pool4 = feats[self._key("pool4")]
            skip = self.score_pool4(pool4 * self.pool4_scale)
            score = self.upscore2(score, (skip.shape[-2], skip.shape[-1])) + skip  # stride 16
        if self.variant == "8s":
            pool3 = feats[self._key("pool3")]
            skip = self.score_pool3(pool3 * self.pool3_scale)
            score = self.upscore_pool4(score, (skip.shape[-2], skip.shape[-1])) + skip  # stride 8
        return self.upscore(score, (x.shape[-2], x.shape[-1]))


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

    Returns:
        :class:`FCN`, mapping ``(N, in_channels, H, W)`` images in ``[0, 1]`` to logits
        ``(N, num_classes, H, W)``; it normalises its input itself (``model.normalization``:
        ``normalization`` if given, else what the weights carry, else ImageNet's).
    """
    taps = _variant_taps(variant)
    cfg = get_config(arch, batch_norm)
    if len(cfg.blocks) != 5:
        raise ValueError(f"FCN needs a 5-block VGG (pool3/pool4/fc7 at strides 8/16/32), got {cfg.name}")
    backbone = VGGBackbone(
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
    return FCN(
        backbone,
        num_classes,
        variant,
        pool4_scale=pool4_scale,
        pool3_scale=pool3_scale,
        learn_upsampling=learn_upsampling,
    )
