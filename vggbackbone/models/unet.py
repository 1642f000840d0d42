"""U-Net on :class:`~vggbackbone.VGGBackbone` with segmentation-models-pytorch's decoder.

The encoder side is VGG itself: its taps ``conv1 .. conv5`` (strides 1, 2, 4, 8, 16) are the
skip connections and ``pool5`` (stride 32) is the bottom of the "U". smp's ``UnetDecoder``
(with the centre block smp adds for VGG encoders, since pool5 is not followed by a conv) and
``SegmentationHead`` do the rest. Unlike ``smp.Unet("vgg16")``, whose first feature is conv1
and is used only for its size, ``conv1`` here is a real skip: the decoder is handed the input
image as its stride-1 "feature 0" (dropped by smp's decoder, as the identity stage of its
ResNet encoders is), so its five blocks fuse conv5, conv4, conv3, conv2 and conv1.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor, nn

from ..vgg import ArchSpec, VGGBackbone, get_config
from .core import NormalizingModel, build_trunk, check_num_classes

__all__ = ["UNetVGG", "unet_vgg"]

DEFAULT_DECODER_CHANNELS = (256, 128, 64, 32, 16)


class UNetVGG(NormalizingModel):
    """VGG encoder + smp ``UnetDecoder`` + ``SegmentationHead``.

    ``backbone`` must return ``conv1 .. conv{n}`` and ``pool{n}`` for its ``n`` blocks, in that
    order. Input ``(N, C, H, W)`` images in ``[0, 1]``, normalised inside with :attr:`normalization`
    (the backbone's: what its weights expect); output logits
    ``(N, num_classes, H, W)`` for any ``H, W`` (with the default Caffe-style ``ceil_mode``
    pools; with floor pools, ``H, W >= 2**n``).
    """

    def __init__(
        self,
        backbone: VGGBackbone,
        num_classes: int,
        decoder_channels: Sequence[int] | None = None,
        *,
        decoder_use_norm: bool | str | dict[str, Any] = "batchnorm",
        decoder_attention_type: str | None = None,
        decoder_interpolation: str = "nearest",
        center_block: bool = True,
    ) -> None:
        super().__init__(backbone.normalization)
        from segmentation_models_pytorch.base import SegmentationHead, initialization
        from segmentation_models_pytorch.decoders.unet.decoder import UnetDecoder

        n = len(backbone.config.blocks)
        expected = [f"conv{i}" for i in range(1, n + 1)] + [f"pool{n}"]
        if list(backbone.return_layers) != expected:
            raise ValueError(f"U-Net needs backbone taps {expected}, got {list(backbone.return_layers)}")
        check_num_classes(num_classes, 1, "UNetVGG")
        decoder_channels = tuple(decoder_channels or DEFAULT_DECODER_CHANNELS[-n:])
        if len(decoder_channels) != n:
            raise ValueError(
                f"{backbone.arch} has {n} blocks, so decoder_channels needs {n} values, got {decoder_channels}"
            )
        self.backbone = backbone
        self.num_classes = num_classes
        encoder_channels = [backbone.in_channels, *backbone.feature_info.channels()]
        self.decoder = UnetDecoder(
            encoder_channels=encoder_channels,
            decoder_channels=decoder_channels,
            n_blocks=n,
            use_norm=decoder_use_norm,
            add_center_block=center_block,
            attention_type=decoder_attention_type,
            interpolation_mode=decoder_interpolation,
        )
        self.segmentation_head = SegmentationHead(decoder_channels[-1], num_classes, kernel_size=3)
        initialization.initialize_decoder(self.decoder)
        initialization.initialize_head(self.segmentation_head)

    def forward(self, x: Tensor) -> Tensor:
        """``(N, C, H, W)`` in ``[0, 1]`` -> logits ``(N, num_classes, H, W)``."""
        x = self.normalize_input(x)
        feats = list(self.backbone(x).values())  # conv1 .. conv_n, pool_n
        return self.segmentation_head(self.decoder([x, *feats]))


def unet_vgg(
    arch: ArchSpec = "vgg16",
    num_classes: int = 21,
    weights_backbone: Any = None,
    *,
    decoder_channels: Sequence[int] | None = None,
    decoder_use_norm: bool | str | dict[str, Any] = "batchnorm",
    decoder_attention_type: str | None = None,
    decoder_interpolation: str = "nearest",
    in_channels: int = 3,
    batch_norm: bool | None = None,
    frozen_stages: int = 0,
    norm_layer: Callable[[int], nn.Module] | None = None,
    norm_eval: bool = False,
    width_mult: float = 1.0,
    ceil_mode: bool = True,
    normalization: Any = None,
) -> UNetVGG:
    """U-Net with VGG ``arch`` as its encoder and smp's decoder.

    Args:
        arch: any VGG arch name or a custom block spec (1..5 blocks).
        num_classes: classes including background.
        weights_backbone: backbone weights (path or torchvision weights name).
        decoder_channels: output channels of the decoder blocks, deepest first (one per VGG
            block; default ``(256, 128, 64, 32, 16)``).
        decoder_use_norm, decoder_attention_type, decoder_interpolation: smp's ``Unet`` options.
        in_channels, batch_norm, frozen_stages, norm_layer, norm_eval, width_mult, ceil_mode, normalization:
            passed to :class:`VGGBackbone`. ``ceil_mode=True`` (default) accepts any input size.

    Returns:
        :class:`UNetVGG`, mapping ``(N, in_channels, H, W)`` images in ``[0, 1]`` to logits
        ``(N, num_classes, H, W)``; it normalises its input itself (``model.normalization``:
        ``normalization`` if given, else what the weights carry, else ImageNet's).
    """
    n = len(get_config(arch, batch_norm).blocks)
    taps = [f"conv{i}" for i in range(1, n + 1)] + [f"pool{n}"]
    backbone, _ = build_trunk(
        arch,
        taps,
        weights_backbone,
        in_channels=in_channels,
        batch_norm=batch_norm,
        frozen_stages=frozen_stages,
        norm_layer=norm_layer,
        norm_eval=norm_eval,
        ceil_mode=ceil_mode,
        output_stride=2**n,  # explicit: VGGBackbone on main defaults to 32 even for fewer blocks
        width_mult=width_mult,
        normalization=normalization,
    )
    return UNetVGG(
        backbone,
        num_classes,
        decoder_channels,
        decoder_use_norm=decoder_use_norm,
        decoder_attention_type=decoder_attention_type,
        decoder_interpolation=decoder_interpolation,
    )
