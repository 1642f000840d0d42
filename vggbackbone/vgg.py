"""VGG feature-extraction backbone.

Every configuration of Simonyan & Zisserman, "Very Deep Convolutional Networks for Large-Scale
Image Recognition" (ICLR 2015), Table 1, as a backbone with named taps:

========  ====================  =========================================
tap       stride (os=32)        what it is
========  ====================  =========================================
conv1     1                     last ReLU of block 1 (after LRN in A-LRN)
pool1     2                     max-pool after block 1
conv2     2                     last ReLU of block 2
pool2     4
conv3     4
pool3     8
conv4     8
pool4     16
conv5     16
pool5     32
fc6       32                    classifier fc6 as a 7x7 conv (4096 ch), after its ReLU
fc7       32                    classifier fc7 as a 1x1 conv (4096 ch), after its ReLU
========  ====================  =========================================

fc6 is *unpadded* by default (``fc_padding="valid"``), the paper's dense evaluation (Sec. 3.2)
and FCN's: at 224x224 ``fc7`` is ``(N, 4096, 1, 1)`` and equals torchvision's
``classifier[:5]``; an ``H x W`` input gives ``(floor(H/32) - 6) x (floor(W/32) - 6)`` cells, cell
``(i, j)`` seeing pool5 cells ``i..i+6, j..j+6``. ``fc_padding="same"`` pads fc6 by 3 (times its
dilation) so fc6/fc7 keep pool5's size and alignment, border cells seeing zeros.

Every layer is a tap too, under its Caffe name: ``conv3_1`` (the convolution's output, before
BN/ReLU), ``bn3_1`` (``_bn`` archs), ``relu3_1``, ``lrn1`` (A-LRN), ``relu6``/``relu7`` (= ``fc6``/
``fc7``); :func:`vggbackbone.config.layer_taps` lists them in network order. A returned tensor
is what that layer computed, never changed by a later in-place op: the ReLU right after a
returned pre-activation runs out of place, every other ReLU stays in place.

Module names follow the Caffe prototxt everyone knows (``features.conv5.conv5_3``), so a tap
name is also the module that produces it. Torchvision and timm state dicts load through an
explicit key map (:mod:`vggbackbone.weights`).
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ._features import FeatureInfo
from ._layers import FCPadding, _is_tracing, build_features
from .config import (
    ARCHS,
    PAPER_COLUMN,
    TAPS,
    ArchSpec,
    BlockSpec,
    VGGConfig,
    get_config,
    layer_taps,
    tap_location,
)
from .weights import load_backbone_weights, resolve_normalization, save_backbone_weights

__all__ = [
    "ARCHS",
    "PAPER_COLUMN",
    "TAPS",
    "ArchSpec",
    "BlockSpec",
    "VGGBackbone",
    "VGGConfig",
    "get_config",
]


class VGGBackbone(nn.Module):
    """A VGG feature extractor returning an ``OrderedDict`` of named taps.

    Args:
        arch: ``"vgg11" | "vgg11_lrn" | "vgg13" | "vgg16_c" | "vgg16" | "vgg19"`` (paper columns
            A, A-LRN, B, C, D, E), ``"vgg11_bn" | "vgg13_bn" | "vgg16_bn" | "vgg19_bn"``, or a
            custom block spec ``[(num_convs, out_channels), ...]`` (1 to 5 blocks of 3x3 convs).
        return_layers: taps to return, a dict ``tap -> output key`` (as torchvision's
            ``IntermediateLayerGetter``) or a list of tap names (keys = tap names): the block
            taps of the table above or any layer by its Caffe name (``conv3_1``, ``bn3_1``,
            ``relu3_1``...). Default: ``conv1..conv5``. Outputs come in network order. Layers
            deeper than the deepest tap are not built.
        weights: ``None``; a torchvision weights name (``"IMAGENET1K_V1"``, ``"DEFAULT"``, or a
            ``torchvision.models.VGG16_Weights`` member, downloaded through torchvision's
            cache); or a path to a ``.pth``/``.safetensors`` state dict saved from
            torchvision's or timm's VGG of the same arch, or by :meth:`save_weights`; or the
            original Caffe release, a ``.caffemodel`` (``VGG_ILSVRC_16_layers``/``19``, read with
            protobuf by :mod:`vggbackbone.caffe`; Caffe normalisation implied).
        in_channels: input channels (weights with 3 input channels need ``in_channels=3``).
        batch_norm: only for custom block specs (named archs carry it in the name).
        norm_layer: BatchNorm constructor for ``_bn`` archs, e.g.
            ``torchvision.ops.misc.FrozenBatchNorm2d`` (default ``nn.BatchNorm2d``).
        frozen_stages: blocks ``1..k`` get ``requires_grad=False`` and stay in eval mode
            (6 and 7 also freeze fc6, fc7). ``0`` trains everything.
        norm_eval: keep every BatchNorm in eval mode (running statistics frozen) in ``train()``.
        output_stride: 32 (plain VGG; the default, ``2**num_blocks`` for shorter custom specs),
            16 or 8. Pools past that stride become 3x3/1 max-pools and the following convs are
            dilated (DeepLab): at 8, conv5 runs at stride 8 with dilation 2, pool5/fc6/fc7 at
            stride 8 (fc6 dilation 4).
        ceil_mode: max-pool rounding. ``False`` (torchvision): tap ``k`` of an ``H x W`` input
            is ``floor(H / s) x floor(W / s)``; ``True`` (Caffe): ``ceil``.
        width_mult: multiply every channel count (rounded to a multiple of 8) for small models.
        fc_channels: fc6/fc7 width (default ``4096 * width_mult``).
        fc_dropout: dropout between fc6 and fc7 (the paper's 0.5); ``0`` disables it.
        fc_padding: ``"valid"`` (default): fc6 is an unpadded 7x7 conv, the paper's dense
            evaluation (``fc7`` of a 224x224 image is ``(N, 4096, 1, 1)``, torchvision's
            ``classifier[:5]``; inputs need at least 224 px, or ``32 * (6 * d + 1)`` with fc6
            dilation ``d`` under ``output_stride``). ``"same"``: fc6 padded by ``3 * d``, so
            fc6/fc7 are stride-aligned dense maps of pool5's size (FCN uses this).
        normalization: the input normalisation the weights expect, as
            :class:`~vggbackbone.weights.InputNormalization`, ``"imagenet"`` or ``"caffe"``.
            Default: taken from the weights (torchvision and timm: ImageNet mean/std). ``"caffe"``
            declares weights trained on BGR 0-255 input minus the BGR mean (the original VGG
            release, mmdet's ``vgg16_caffe``): the first conv's input channels are flipped on
            load so the backbone still takes RGB, and :attr:`normalization` gives the
            equivalent mean/std on ``[0, 1]`` RGB input.

    Attributes:
        out_channels: channels of the deepest returned tap (torchvision's convention).
        feature_info: :class:`~vggbackbone._features.FeatureInfo` of the returned taps.
        normalization: :class:`~vggbackbone.weights.InputNormalization` to apply to ``[0, 1]``
            RGB images before this backbone.

    Input ``(N, in_channels, H, W)``; ``H, W`` at least the stride of the deepest strided pool
    that runs (eager mode raises a clear error otherwise).
    """

    # real types for TorchScript (the dict or list may be empty)
    __annotations__ = {"_stage_taps": dict[str, str], "_inner_stages": list[str]}

    def __init__(
        self,
        arch: ArchSpec = "vgg16",
        return_layers: Mapping[str, str] | Sequence[str] | None = None,
        weights: str | Path | Any | None = None,
        *,
        in_channels: int = 3,
        batch_norm: bool | None = None,
        norm_layer: Callable[[int], nn.Module] | None = None,
        frozen_stages: int = 0,
        norm_eval: bool = False,
        output_stride: int | None = None,
        ceil_mode: bool = False,
        width_mult: float = 1.0,
        fc_channels: int | None = None,
        fc_dropout: float = 0.5,
        fc_padding: FCPadding = "valid",
        normalization: Any = None,
        progress: bool = True,
    ) -> None:
        super().__init__()
        cfg = get_config(arch, batch_norm)
        self.arch = cfg.name
        self.config = cfg
        self.width_mult = width_mult
        self.in_channels = in_channels
        self.return_layers = _return_layers(cfg, return_layers)
        self.output_stride = _output_stride(cfg, output_stride)
        if frozen_stages < 0 or frozen_stages > len(cfg.blocks) + 2:
            raise ValueError(f"frozen_stages must be in 0..{len(cfg.blocks) + 2}, got {frozen_stages}")
        if fc_padding not in ("valid", "same"):
            raise ValueError(f"fc_padding must be 'valid' or 'same', got {fc_padding!r}")
        self.fc_padding = fc_padding
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        norm: Callable[[int], nn.Module] | None = None
        if cfg.batch_norm:
            norm = norm_layer if norm_layer is not None else nn.BatchNorm2d
        elif norm_layer is not None:
            raise ValueError(f"{cfg.name} has no BatchNorm; pick a _bn arch to use norm_layer")

        where = {t: tap_location(t) for t in self.return_layers}
        # With weights, every parameter and buffer comes from the file (the load is strict), so
        # build on the meta device: no random init of ~130M parameters that would be overwritten.
        device = torch.get_default_device()  # where the loaded weights go (honours `with torch.device(...)`)
        with torch.device("meta") if weights is not None else contextlib.nullcontext():
            built = build_features(
                cfg, where, self.return_layers, in_channels=in_channels, norm_layer=norm,
                output_stride=self.output_stride, ceil_mode=ceil_mode, width_mult=width_mult,
                fc_channels=fc_channels, fc_dropout=fc_dropout, fc_padding=fc_padding,
            )  # fmt: skip
            self.features = nn.ModuleDict(built.stages)
        self.min_input_size = built.min_size
        self._min_input_reason = built.min_reason
        # stage outputs to return (the block taps); layers inside a stage are returned by the stage
        self._stage_taps: dict[str, str] = {t: k for t, k in self.return_layers.items() if where[t][1] is None}
        self._inner_stages: list[str] = sorted({st for st, layer in where.values() if layer})
        self.feature_info = FeatureInfo(
            [
                dict(built.info[t], module=".".join(filter(None, ("features", *where[t]))), key=key)
                for t, key in self.return_layers.items()
            ]
        )
        self.out_channels: int = built.info[next(reversed(self.return_layers))]["num_chs"]
        self.normalization = resolve_normalization(normalization, in_channels)
        if weights is None:
            self._init_weights()
        else:
            self.to_empty(device=device)
            for name, buf in self.named_buffers():
                if name.endswith("num_batches_tracked"):  # the only key a file may lack
                    buf.zero_()
            self.normalization = load_backbone_weights(self, weights, normalization, progress=progress)
        self._freeze()

    # ------------------------------------------------------------------ construction helpers
    @staticmethod
    def available_taps(arch: ArchSpec | VGGConfig = "vgg16", every_layer: bool = False) -> tuple[str, ...]:
        """Block tap names that ``arch`` offers (``conv1, pool1, ..., fc7``), in network order;
        with ``every_layer``, also each layer by its Caffe name (``conv1_1``, ``bn1_1``,
        ``relu1_1``, ..., ``relu6``, ``relu7``), see :func:`vggbackbone.config.layer_taps`."""
        cfg = arch if isinstance(arch, VGGConfig) else get_config(arch)
        if every_layer:
            return layer_taps(cfg)
        n = len(cfg.blocks)
        return tuple(t for t in TAPS if t.startswith("fc") or int(t[4:]) <= n)

    def _init_weights(self) -> None:
        # torchvision's VGG initialisation; fc6/fc7 as its Linear layers.
        for name, m in self.named_modules():
            if isinstance(m, nn.Conv2d):
                if name.startswith("features.fc"):
                    nn.init.normal_(m.weight, 0, 0.01)
                else:
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _frozen_modules(self) -> list[nn.Module]:
        names = [f"conv{i}" for i in range(1, self.frozen_stages + 1)] + [
            f"pool{i}" for i in range(1, self.frozen_stages + 1)
        ]
        if self.frozen_stages >= len(self.config.blocks) + 1:
            names.append("fc6")
        if self.frozen_stages >= len(self.config.blocks) + 2:
            names.append("fc7")
        return [self.features[n] for n in names if n in self.features]

    def _freeze(self) -> None:
        for m in self._frozen_modules():
            m.eval()
            for p in m.parameters():
                p.requires_grad_(False)
        if self.norm_eval:
            self.train(self.training)

    def train(self, mode: bool = True) -> VGGBackbone:
        """Set train mode; frozen stages and (with ``norm_eval``) BatchNorm layers stay in eval."""
        super().train(mode)
        if mode:
            for m in self._frozen_modules():
                m.eval()
            if self.norm_eval:
                for m in self.modules():
                    if isinstance(m, nn.modules.batchnorm._BatchNorm):
                        m.eval()
        return self

    # ------------------------------------------------------------------ forward
    @torch.jit.unused
    def _check_input(self, x: Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"VGGBackbone({self.arch}) expects (N, {self.in_channels}, H, W) input, got {tuple(x.shape)}"
            )
        h, w = x.shape[-2:]
        if h < self.min_input_size or w < self.min_input_size:
            deepest = next(reversed(self.return_layers))
            raise ValueError(
                f"VGGBackbone({self.arch}): input {h}x{w} is smaller than {self.min_input_size}, "
                f"{self._min_input_reason} (deepest tap '{deepest}'); resize or pad the image to at least "
                f"{self.min_input_size}x{self.min_input_size}"
            )

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """``x``: ``(N, C, H, W)`` -> ``OrderedDict`` of the requested taps (see the class table)."""
        if not torch.jit.is_scripting():  # noqa: SIM102 (TorchScript needs this exact form)
            if not _is_tracing(x):
                self._check_input(x)
        out: dict[str, Tensor] = OrderedDict()
        for name, stage in self.features.items():
            # forward_taps also returns some of the stage's layers; stage(x) keeps fx's module calls
            x = stage.forward_taps(x, out) if name in self._inner_stages else stage(x)
            if name in self._stage_taps:
                out[self._stage_taps[name]] = x
        return out

    # ------------------------------------------------------------------ weights
    def save_weights(self, path: str | Path) -> Path:
        """Save this backbone's weights (``.safetensors`` or ``.pth``) with arch and normalisation.

        The file is written atomically and loads back with ``VGGBackbone(arch, weights=path)``.
        """
        return save_backbone_weights(self, path)

    def extra_repr(self) -> str:
        return (
            f"arch={self.arch}, return_layers={self.return_layers}, output_stride={self.output_stride}, "
            f"fc_padding={self.fc_padding}"
        )


def _return_layers(cfg: VGGConfig, return_layers: Mapping[str, str] | Sequence[str] | str | None) -> dict[str, str]:
    """``return_layers`` as ``{tap: output key}`` in network order, checked (default ``conv1..convN``)."""
    if return_layers is None:
        return_layers = [f"conv{i}" for i in range(1, len(cfg.blocks) + 1)]
    if isinstance(return_layers, str):
        return_layers = [return_layers]
    rl = dict(return_layers) if isinstance(return_layers, Mapping) else {t: t for t in return_layers}
    taps = VGGBackbone.available_taps(cfg, every_layer=True)
    unknown = [t for t in rl if t not in taps]
    if unknown or not rl:
        raise ValueError(
            f"{cfg.name}: unknown tap(s) {unknown or '(none requested)'}; available taps: "
            f"{list(VGGBackbone.available_taps(cfg))} and every layer by its Caffe name: {list(taps)}"
        )
    if len(set(rl.values())) != len(rl):
        raise ValueError(f"return_layers maps two taps to the same output key: {rl}")
    return {t: str(rl[t]) for t in sorted(rl, key=taps.index)}


def _output_stride(cfg: VGGConfig, output_stride: int | None) -> int:
    """``output_stride`` checked: 8 (or more) up to ``2**num_blocks``, the default (no dilation)."""
    n_blocks = len(cfg.blocks)
    allowed = [2**k for k in range(min(3, n_blocks), n_blocks + 1)]
    if output_stride is None:
        output_stride = 2**n_blocks  # no dilation (32 for the paper's five blocks)
    if output_stride not in allowed:
        raise ValueError(f"output_stride must be one of {allowed}, got {output_stride}")
    return output_stride
