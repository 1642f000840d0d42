"""VGGBackbone as a segmentation-models-pytorch encoder, so every smp decoder can use it.

Importing this module registers ``vggbackbone_<arch>`` for every arch in
:data:`vggbackbone.ARCHS` in ``smp.encoders.encoders`` (the table smp 0.6's ``get_encoder`` looks
names up in)::

    import segmentation_models_pytorch as smp
    import vggbackbone.models  # registers the encoders
    model = smp.Unet("vggbackbone_vgg16_bn", encoder_weights=None, classes=21)
    model = smp.DeepLabV3Plus("vggbackbone_vgg16", encoder_weights=None, encoder_output_stride=16)
    model.encoder.load_weights("vgg16.pth")  # torchvision/timm/vggbackbone state dict

The features follow smp's own VGG encoders: ``[conv1, conv2, conv3, conv4, conv5, pool5]`` at
strides ``1, 2, 4, 8, 16, 32`` (fewer for ``encoder_depth < 5``), so decoders index them as
they do for ``smp``'s ``vgg16``. Unlike those, dilated mode works (``encoder_output_stride=16``
or ``8``, which DeepLabV3/V3+ need): the backbone is built with ``output_stride`` and turns the
later pools into 3x3/1 pools with dilated convs after them.

smp downloads pretrained encoders from its hub by name; these entries have no hub weights, so
pass ``encoder_weights=None`` and load weights with :meth:`VGGSmpEncoder.load_weights`, or
register a name whose backbone loads them itself with :func:`register_smp_encoder`.
"""

from __future__ import annotations

from typing import Any

import segmentation_models_pytorch as smp
from segmentation_models_pytorch.encoders._base import EncoderMixin
from torch import Tensor, nn

from ..vgg import ARCHS, ArchSpec, VGGBackbone
from ..weights import load_backbone_weights, resolve_normalization

__all__ = ["SMP_PREFIX", "VGGSmpEncoder", "register_smp_encoder", "register_smp_encoders"]

#: Registered names are ``SMP_PREFIX + arch``. They start with "vgg", which makes smp's Unet add
#: the centre block it uses for VGG encoders (pool5 has no conv after it).
SMP_PREFIX = "vggbackbone_"


class VGGSmpEncoder(nn.Module, EncoderMixin):
    """An smp encoder around :class:`VGGBackbone`: ``forward(x) -> [conv1, ..., conv5, pool5]``.

    Args:
        arch: VGG arch name or block spec (5 blocks).
        depth: smp's encoder depth, 1..5: the features are ``conv1 .. conv{depth+1}``, and
            ``conv1 .. conv5, pool5`` for 5 (the last one at stride ``2**depth``).
        output_stride: 32, 16 or 8 (dilated: conv5 at stride 8 with dilation 2 for 8).
        out_channels: ignored (smp passes its registry's value; ours is computed).
        **backbone_kwargs: passed to :class:`VGGBackbone` (``weights``, ``width_mult``,
            ``frozen_stages``, ``norm_layer``...).
    """

    _is_torch_scriptable = False  # the backbone returns a dict; smp's scripting tests expect lists
    _is_torch_exportable = True
    _is_torch_compilable = True

    def __init__(
        self,
        arch: ArchSpec = "vgg16",
        depth: int = 5,
        output_stride: int = 32,
        out_channels: Any = None,
        **backbone_kwargs: Any,
    ) -> None:
        nn.Module.__init__(self)
        EncoderMixin.__init__(self)
        if not 1 <= depth <= 5:
            raise ValueError(f"{type(self).__name__} depth should be in range [1, 5], got {depth}")
        taps = [f"conv{i}" for i in range(1, depth + 2) if i <= 5] + (["pool5"] if depth == 5 else [])
        # A deeper stride than the features reach changes nothing (smp: min(output_stride, 2**depth)).
        stride = output_stride if output_stride < 2**depth else 32
        self.backbone = VGGBackbone(arch, taps, output_stride=stride, **backbone_kwargs)
        if len(self.backbone.config.blocks) != 5:
            raise ValueError(f"smp encoders need a 5-block VGG, got {self.backbone.arch}")
        self._depth = depth
        self._in_channels = self.backbone.in_channels
        self._output_stride = output_stride
        self._out_channels = list(self.backbone.feature_info.channels())
        self._has_weights = backbone_kwargs.get("weights") is not None

    @property
    def normalization(self) -> Any:
        """What the backbone's weights expect on ``[0, 1]`` RGB input (``.mean``, ``.std``)."""
        return self.backbone.normalization

    def forward(self, x: Tensor) -> list[Tensor]:
        """``(N, C, H, W)`` -> features at strides ``1, 2, 4, 8, 16, 32`` (capped by ``output_stride``)."""
        return list(self.backbone(x).values())

    def make_dilated(self, output_stride: int) -> None:
        # Built dilated already (get_encoder passes output_stride to __init__); just check.
        if output_stride not in (8, 16):
            raise ValueError(f"Output stride should be 16 or 8, got {output_stride}.")
        if self._output_stride != output_stride:
            raise ValueError(f"this encoder was built with output_stride={self._output_stride}, not {output_stride}")

    def set_in_channels(self, in_channels: int, pretrained: bool = True) -> None:
        """smp's first-conv patch (reuses RGB weights when the backbone loaded some)."""
        if in_channels == self.backbone.in_channels:
            return
        super().set_in_channels(in_channels, pretrained=pretrained or self._has_weights)
        self.backbone.in_channels = in_channels
        self.backbone.normalization = resolve_normalization(None, in_channels)

    def load_weights(self, weights: Any) -> None:
        """Load a torchvision/timm/vggbackbone VGG state dict (path or torchvision weights name)."""
        self.backbone.normalization = load_backbone_weights(self.backbone, weights)
        self._has_weights = True


def register_smp_encoder(name: str, arch: ArchSpec = "vgg16", **backbone_kwargs: Any) -> str:
    """Register ``name`` in ``smp.encoders.encoders`` as a :class:`VGGSmpEncoder` of ``arch``.

    ``backbone_kwargs`` (e.g. ``weights="vgg16.pth"``, ``width_mult=0.25``) are fixed for that
    name; smp then builds it with ``encoder_weights=None``. Returns ``name``.
    """
    smp.encoders.encoders[name] = {
        "encoder": VGGSmpEncoder,
        "pretrained_settings": {},
        "params": {"arch": arch, **backbone_kwargs},
    }
    return name


def register_smp_encoders() -> list[str]:
    """Register ``vggbackbone_<arch>`` for every named arch; return the names."""
    return [register_smp_encoder(SMP_PREFIX + arch, arch) for arch in ARCHS]


register_smp_encoders()
