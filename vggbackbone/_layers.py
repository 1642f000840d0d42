"""The layers of :class:`~vggbackbone.VGGBackbone` and how its ``features`` are laid out.

* :class:`_Stage` / :class:`_Pool`: one block or pool of ``features``, able to return some of
  its layers' outputs (taps inside a block);
* :func:`_make_block`: block ``i`` under its Caffe layer names (``conv3_1``, ``bn3_1``,
  ``relu3_1``...); :class:`_FC`: fc6/fc7 as convolutions;
* :func:`build_features`: every stage up to the deepest tap, with the stride, dilation and
  channels of each tap (``feature_info``) and the smallest input the network accepts.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import TAPS, VGGConfig, block_layers
from .utils import scale_width

__all__ = ["FCPadding", "Features", "build_features"]


class _Stage(nn.Sequential):
    """A ``Sequential`` stage of ``features`` that can also return some of its layers' outputs.

    ``taps`` maps a child name (``conv3_1``, ``relu``...) to its output key; empty for the
    usual block taps, whose stage then runs as a plain ``Sequential``.
    """

    __annotations__ = {"taps": dict[str, str]}  # a real type for TorchScript (may be empty)

    def __init__(self, layers: OrderedDict[str, nn.Module], taps: Mapping[str, str] | None = None) -> None:
        super().__init__(layers)
        self.taps = dict(taps or {})
        # A returned layer output must not be changed by a later in-place op: the ReLU that ends a
        # conv [-> bn] group with a returned pre-activation (conv3_1, bn3_1) runs out of place.
        # Counted from the conv, not only from the layer just before the ReLU, so the tap stays
        # intact when a BatchNorm is later folded into its conv and replaced by nn.Identity.
        # Every other ReLU stays in place (the default taps cost nothing extra).
        returned_before = False
        for name, layer in self._modules.items():
            if isinstance(layer, nn.ReLU):
                if returned_before:
                    layer.inplace = False
                returned_before = False
            elif name in self.taps:
                returned_before = True

    def forward_taps(self, x: Tensor, out: dict[str, Tensor]) -> Tensor:
        """``forward`` that also stores the outputs of the tapped children in ``out``."""
        for name, layer in self.named_children():
            x = layer(x)
            if name in self.taps:
                out[self.taps[name]] = x
        return x


class _Pool(nn.MaxPool2d):
    """``nn.MaxPool2d`` with :class:`_Stage`'s interface (every stage has ``forward_taps``, so the
    backbone's loop compiles under TorchScript without ``isinstance`` on module types)."""

    def forward_taps(self, x: Tensor, out: dict[str, Tensor]) -> Tensor:
        return self.forward(x)


def _make_block(
    cfg: VGGConfig,
    idx: int,
    in_ch: int,
    channels: int,
    *,
    dilation: int,
    norm_layer: Callable[[int], nn.Module] | None,
    taps: Mapping[str, str],
    last: str | None = None,
) -> _Stage:
    """Block ``idx`` (1-based): conv{idx}_{j} [-> bn{idx}_{j}] -> relu{idx}_{j} ... [-> lrn{idx}].

    ``taps``: the block's layers to return (name -> key); ``last``: stop after that layer.
    """
    kernels = {f"conv{idx}_{j}": k for j, k in enumerate(cfg.blocks[idx - 1].kernels, start=1)}
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    for name in block_layers(cfg, idx):
        if name in kernels:
            k = kernels[name]
            d = dilation if k > 1 else 1
            layers[name] = nn.Conv2d(in_ch, channels, k, padding=d * (k // 2), dilation=d)
            in_ch = channels
        elif name.startswith("bn"):
            assert norm_layer is not None  # block_layers lists bn only for batch-norm configs
            layers[name] = norm_layer(channels)
        elif name.startswith("relu"):
            layers[name] = nn.ReLU(inplace=True)
        else:
            # A-LRN: Krizhevsky's LRN (n=5, alpha=1e-4, beta=0.75, k=2) after the first layer.
            # PyTorch divides alpha by n, as Caffe does.
            layers[name] = nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=2.0)
        if name == last:
            break
    return _Stage(layers, taps)


FCPadding = Literal["valid", "same"]


class _FC(_Stage):
    """fc6/fc7 as a convolution: [drop ->] conv -> relu (the tap is the ReLU output).

    ``padding="valid"``: no padding (a 7x7 fc6 on a 7x7 map is the Linear layer); ``"same"``:
    ``dilation * (kernel // 2)``, so the output keeps the input's size.
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel: int,
        dilation: int,
        dropout: float | None,
        padding: FCPadding,
        taps: Mapping[str, str] | None = None,
    ) -> None:
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        if dropout is not None:
            layers["drop"] = nn.Dropout(dropout)
        pad = dilation * (kernel // 2) if padding == "same" else 0
        layers["conv"] = _FCConv(in_ch, out_ch, kernel, padding=pad, dilation=dilation)
        layers["relu"] = nn.ReLU(inplace=True)
        super().__init__(layers, taps)


class _FCConv(nn.Conv2d):
    """fc6/fc7's convolution; where it covers its whole input (one output cell), a matrix product.

    An unpadded 7x7 fc6 on a 7x7 pool5 map (224 px input) and fc7 on its 1x1 output are the
    classifier's Linear layers. Computed as ``F.linear`` there, they give torchvision's
    ``classifier`` outputs bit for bit (a convolution sums the same products in another order,
    ~1e-6 apart). Traced or compiled graphs keep the convolution (no shape-dependent branch).
    """

    def forward(self, x: Tensor) -> Tensor:
        if not torch.jit.is_scripting():  # noqa: SIM102 (TorchScript needs this exact form)
            if (
                not _is_tracing(x)
                and self.padding == (0, 0)
                and x.dim() == 4
                and tuple(x.shape[-2:]) == tuple(self.kernel_size)
            ):
                return F.linear(x.flatten(1), self.weight.flatten(1), self.bias)[:, :, None, None]
        return self._conv_forward(x, self.weight, self.bias)


def _is_tracing(x: Tensor) -> bool:
    """True under torch.jit.trace, torch.compile/export or torch.fx tracing (shapes are symbolic)."""
    return torch.jit.is_tracing() or torch.compiler.is_compiling() or isinstance(x, torch.fx.Proxy)


@dataclass
class Features:
    """What :func:`build_features` lays out: the stages, each tap's ``{num_chs, reduction}`` and the
    smallest input side (with the reason, for the error message)."""

    stages: OrderedDict[str, nn.Module] = field(default_factory=OrderedDict)
    info: dict[str, dict[str, Any]] = field(default_factory=dict)
    min_size: int = 1
    min_reason: str = ""


def build_features(
    cfg: VGGConfig,
    where: Mapping[str, tuple[str, str | None]],
    keys: Mapping[str, str],
    *,
    in_channels: int,
    norm_layer: Callable[[int], nn.Module] | None,
    output_stride: int,
    ceil_mode: bool,
    width_mult: float,
    fc_channels: int | None,
    fc_dropout: float,
    fc_padding: FCPadding,
) -> Features:
    """The ``features`` stages of ``cfg`` up to the deepest tap of ``where`` (tap -> (stage, layer
    or None)); ``keys``: tap -> output key. Pools past ``output_stride`` become 3x3/1 and the
    layers after them dilated (DeepLab)."""
    last_stage, last_layer = list(where.values())[-1]  # nothing after this is built
    build = TAPS[: TAPS.index(last_stage) + 1]

    def inner(stage: str) -> dict[str, str]:
        """The stage's layers to return: layer name -> output key."""
        return {layer: keys[t] for t, (st, layer) in where.items() if st == stage and layer}

    out = Features()
    in_ch, stride, dilation = in_channels, 1, 1
    for i, spec in enumerate(cfg.blocks, start=1):
        if f"conv{i}" not in build:
            break
        ch = scale_width(spec.channels, width_mult)
        last = last_layer if last_stage == f"conv{i}" else None
        out.stages[f"conv{i}"] = block = _make_block(
            cfg, i, in_ch, ch, dilation=dilation, norm_layer=norm_layer, taps=inner(f"conv{i}"), last=last
        )
        out.info[f"conv{i}"] = {"num_chs": ch, "reduction": stride}
        out.info.update({t: out.info[f"conv{i}"] for t in block.taps})
        in_ch = ch
        if f"pool{i}" not in build:
            break
        if stride < output_stride:
            out.stages[f"pool{i}"] = _Pool(2, 2, ceil_mode=ceil_mode)
            stride *= 2
            out.min_size, out.min_reason = (stride if not ceil_mode else 1), f"the stride of pool{i}"
        else:  # DeepLab: keep resolution, dilate what follows
            out.stages[f"pool{i}"] = _Pool(3, 1, padding=1)
            dilation *= 2
        out.info[f"pool{i}"] = {"num_chs": ch, "reduction": stride}
    fc_ch = fc_channels or scale_width(4096, width_mult)
    if "fc6" in build:
        out.stages["fc6"] = _FC(in_ch, fc_ch, 7, dilation, None, fc_padding, inner("fc6"))
        out.info["fc6"] = out.info["relu6"] = {"num_chs": fc_ch, "reduction": stride}
        if fc_padding == "valid":  # the pool5 map must hold one dilated 7x7 window
            cells = 6 * dilation + 1
            need = stride * cells if not ceil_mode else stride * (cells - 1) + 1
            out.min_size = max(out.min_size, need)
            out.min_reason = (
                f"the smallest input whose pool{len(cfg.blocks)} map holds fc6's unpadded {cells}x{cells} "
                "window (fc_padding='valid'; fc_padding='same' pads it)"
            )
    if "fc7" in build:
        dropout = fc_dropout if fc_dropout > 0 else None
        out.stages["fc7"] = _FC(fc_ch, fc_ch, 1, 1, dropout, fc_padding, inner("fc7"))
        out.info["fc7"] = out.info["relu7"] = {"num_chs": fc_ch, "reduction": stride}
    return out
