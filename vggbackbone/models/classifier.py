"""VGG as the whole classification network: ``VGGClassifier`` and its builder ``vgg_classifier``.

The network of the paper, on a :class:`~vggbackbone.VGGBackbone` cut at its last pool::

    image (N,C,H,W) in [0,1] ─▶ normalise ─▶ VGGBackbone pool5 (N,512,H/32,W/32)
        head="linear" (torchvision):  AdaptiveAvgPool2d(7) ─▶ flatten ─▶ fc6 (Linear 512*7*7->4096)
                                      ─▶ ReLU ─▶ Dropout ─▶ fc7 (4096->4096) ─▶ ReLU ─▶ Dropout ─▶ fc8
        head="conv" (timm, the paper's dense evaluation): [adaptive-avg-pool up to 7x7 if smaller]
                                      ─▶ fc6 as a 7x7 valid conv ─▶ ReLU ─▶ Dropout ─▶ fc7 as a 1x1 conv
                                      ─▶ ReLU ─▶ global average ─▶ Dropout ─▶ fc8 ─▶ logits (N, num_classes)

``head="linear"`` is torchvision's ``VGG.forward`` op for op, so torchvision's logits come out
bit for bit; ``head="conv"`` is timm's ``VGG.forward`` (its ``ConvMlp`` pre-logits and
``ClassifierHead``), bit for bit with timm's logits. Both heads hold the same parameters
(``fc6``/``fc7``/``fc8`` as ``nn.Linear`` in torchvision's layout; the conv head views them
as 7x7 and 1x1 kernels), so any weights work with either head. At 224x224 they agree up to
float rounding; on larger images the conv head slides fc6 over pool5 and averages
(the paper's dense evaluation) while the linear head first average-pools pool5 to 7x7.

Small inputs. Whenever pool5 is smaller than 7x7 (a 32x32 image gives a 1x1 pool5), both heads
adaptive-average-pool it *up* to 7x7, which replicates each pool5 cell over a block of the
7x7 grid (a 1x1 pool5 becomes 49 copies): fc6 then sees the same vector at every position.
This is what torchvision and timm do, and it is what lets a 224x224 classifier fine-tune on
32x32 images, but fc6 has 49x more weights than such an input can tell apart. The input must
still be at least 32x32 (five stride-2 pools; ``2**num_blocks`` for shorter custom specs):
upscale smaller images (e.g. 8x8 digits) first; the backbone refuses smaller ones by name.

:class:`ExportableClassifier` is the linear head's network for ONNX with dynamic height and width.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..utils import scale_width
from ..vgg import ArchSpec, VGGBackbone, get_config
from ..weights import WeightsError, all_finite, to_canonical
from .core import NormalizingModel, build_trunk, check_num_classes

__all__ = [
    "ExportableClassifier",
    "VGGClassifier",
    "adaptive_avg_pool_matrix",
    "load_classifier_head",
    "vgg_classifier",
]

#: Where each library keeps fc8 (the class scores).
_FC8_KEYS = {"torchvision": "classifier.6", "timm": "head.fc"}


class VGGClassifier(NormalizingModel):
    """A VGG backbone (through its last pool) with the fc6/fc7/fc8 classifier.

    Args:
        backbone: a :class:`~vggbackbone.VGGBackbone` whose last returned tap is its last pool
            (``pool5`` for the paper's archs); :func:`vgg_classifier` builds it.
        num_classes: outputs of fc8; :meth:`reset_classifier` changes it later.
        fc_channels: width of fc6/fc7 (the paper's 4096).
        dropout: dropout after fc6 and fc7 (the paper's 0.5); ``0`` disables it.
        head: ``"linear"`` (torchvision's forward, the default) or ``"conv"`` (timm's forward,
            the paper's dense evaluation); see the module docstring.

    Input ``(N, in_channels, H, W)`` in ``[0, 1]``, ``H, W >= 32``; the backbone's
    :attr:`normalization` is applied here. Output: logits ``(N, num_classes)``.
    """

    def __init__(
        self,
        backbone: VGGBackbone,
        num_classes: int = 1000,
        *,
        fc_channels: int = 4096,
        dropout: float = 0.5,
        head: Literal["linear", "conv"] = "linear",
        _empty_head: bool = False,
    ) -> None:
        super().__init__(backbone.normalization)
        check_num_classes(num_classes, 1, "VGGClassifier")
        if head not in ("linear", "conv"):
            raise ValueError(f"head must be 'linear' (torchvision) or 'conv' (timm, dense), got {head!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        last = next(reversed(backbone.return_layers))
        if not last.startswith("pool"):
            raise ValueError(
                f"the classifier's backbone must end at its last pool, got taps {list(backbone.return_layers)}"
            )
        self.backbone = backbone
        self.tap = backbone.return_layers[last]
        self.head = head
        in_features = backbone.out_channels * 7 * 7
        # With weights coming (vgg_classifier), build fc6-fc8 on the meta device: no random
        # init of ~120M parameters about to be overwritten (load_classifier_head materialises them).
        device = torch.device("meta") if _empty_head else self.mean.device
        self.fc6 = nn.Linear(in_features, fc_channels, device=device)
        self.drop6 = nn.Dropout(dropout)
        self.fc7 = nn.Linear(fc_channels, fc_channels, device=device)
        self.drop7 = nn.Dropout(dropout)
        self.fc_channels = fc_channels
        self.num_classes = int(num_classes)
        self.fc8 = nn.Linear(fc_channels, num_classes, device=device)
        if not _empty_head:
            for fc in (self.fc6, self.fc7, self.fc8):
                _init_linear(fc)

    def reset_classifier(self, num_classes: int) -> None:
        """A fresh fc8 with ``num_classes`` outputs (torchvision's init), on the model's device."""
        self.num_classes = check_num_classes(num_classes, 1, "VGGClassifier.reset_classifier")
        self.fc8 = nn.Linear(self.fc_channels, num_classes, device=self.fc7.weight.device)
        _init_linear(self.fc8)

    def forward_features(self, x: Tensor) -> Tensor:
        """``(N, C, H, W)`` in ``[0, 1]`` -> the backbone's last pool ``(N, C5, H/32, W/32)``."""
        return self.backbone(self.normalize_input(x))[self.tap]

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Last-pool features -> logits ``(N, num_classes)``, or fc7's ``(N, fc_channels)``."""
        if self.head == "linear":
            # torchvision: self.avgpool (AdaptiveAvgPool2d((7, 7))) -> flatten -> classifier
            x = torch.flatten(F.adaptive_avg_pool2d(x, (7, 7)), 1)
            x = self.drop6(F.relu(self.fc6(x)))
            x = self.drop7(F.relu(self.fc7(x)))
        else:
            # timm: ConvMlp (fc1 7x7 conv, fc2 1x1 conv; pool5 brought up to >= 7x7 first) then
            # ClassifierHead (global average, dropout, fc). Same parameters viewed as kernels.
            h, w = x.shape[-2], x.shape[-1]
            if h < 7 or w < 7:
                x = F.adaptive_avg_pool2d(x, (max(7, h), max(7, w)))
            w6 = self.fc6.weight.view(self.fc_channels, -1, 7, 7)
            x = self.drop6(F.relu(F.conv2d(x, w6, self.fc6.bias)))
            w7 = self.fc7.weight.view(self.fc_channels, self.fc_channels, 1, 1)
            x = F.relu(F.conv2d(x, w7, self.fc7.bias))
            x = self.drop7(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))
        return x if pre_logits else self.fc8(x)

    def forward(self, x: Tensor) -> Tensor:
        """``(N, C, H, W)`` in ``[0, 1]`` -> logits ``(N, num_classes)``."""
        return self.forward_head(self.forward_features(x))

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, head={self.head!r}"


def _init_linear(fc: nn.Linear) -> None:
    # torchvision's VGG initialisation of its classifier
    nn.init.normal_(fc.weight, 0, 0.01)
    nn.init.zeros_(fc.bias)


def load_classifier_head(model: VGGClassifier, state_dict: dict[str, Tensor], desc: str = "weights") -> list[str]:
    """Copy fc6/fc7/fc8 from a torchvision, timm or this package's backbone state dict into ``model``.

    fc6/fc7 must fit (a :class:`~vggbackbone.WeightsError` otherwise): they are what
    fine-tuning keeps. fc8 loads when its shape matches ``num_classes``; when it does not (a
    different number of classes), or when the file has no fc8, or when fc6/fc7 are missing or
    not finite (torchvision's ``IMAGENET1K_FEATURES``), those layers keep their fresh
    initialisation and a warning names the skipped keys. Returns the keys left fresh.
    """
    mapped, _, source = to_canonical(state_dict, model.backbone.config)
    new: dict[str, Tensor] = {}
    for fc in ("fc6", "fc7"):
        for p in ("weight", "bias"):
            t = mapped.get(f"features.{fc}.conv.{p}")
            if t is not None:
                new[f"{fc}.{p}"] = t.reshape(t.shape[0], -1) if p == "weight" else t
    fc8_prefix = _FC8_KEYS.get(source)  # this package's backbone files and features-only files have no fc8
    for p in ("weight", "bias"):
        if fc8_prefix is not None and f"{fc8_prefix}.{p}" in state_dict:
            new[f"fc8.{p}"] = state_dict[f"{fc8_prefix}.{p}"]

    own = {k: v for k, v in model.state_dict().items() if k.split(".")[0] in ("fc6", "fc7", "fc8")}
    wrong = [
        f"{k}: file {tuple(new[k].shape)} vs model {tuple(v.shape)}"
        for k, v in own.items()
        if k in new and new[k].shape != v.shape and not k.startswith("fc8.")
    ]
    if wrong:
        raise WeightsError(f"{desc}: classifier fc6/fc7 do not fit VGGClassifier({model.backbone.arch}): {wrong}")
    skipped: dict[str, str] = {}
    for k in own:
        if k not in new:
            skipped[k] = "not in the file"
        elif new[k].shape != own[k].shape:
            skipped[k] = f"file has {tuple(new[k].shape)} (another number of classes), model {tuple(own[k].shape)}"
        elif not all_finite(new[k]):
            skipped[k] = "not finite in the file"
    # a layer loads whole or not at all: skip weight and bias together
    for layer in {k.split(".")[0] for k in skipped}:
        for p in ("weight", "bias"):
            skipped.setdefault(f"{layer}.{p}", "its other parameter was skipped")
    device = model.mean.device
    # assign: the file's tensors become the parameters (no second 0.5 GB copy for vgg16's fc6)
    to_load = {k: v.to(device=device, dtype=own[k].dtype) for k, v in new.items() if k in own and k not in skipped}
    for name in ("fc6", "fc7", "fc8"):
        layer = getattr(model, name)
        if layer.weight.is_meta:  # built empty by vgg_classifier
            layer.to_empty(device=device)
            if f"{name}.weight" in skipped:
                _init_linear(layer)
        elif f"{name}.weight" in skipped:
            _init_linear(layer)  # fresh, as the docstring promises, whatever it held before
    model.load_state_dict(to_load, strict=False, assign=True)
    if skipped:
        lines = "; ".join(f"{k} ({why})" for k, why in skipped.items())
        warnings.warn(f"{desc}: {len(skipped)} classifier key(s) left freshly initialised: {lines}", stacklevel=3)
    return sorted(skipped)


def vgg_classifier(
    arch: ArchSpec = "vgg16",
    num_classes: int = 1000,
    weights: str | Path | Any | None = None,
    *,
    in_channels: int = 3,
    width_mult: float = 1.0,
    fc_channels: int | None = None,
    dropout: float = 0.5,
    head: Literal["linear", "conv"] = "linear",
    normalization: Any = None,
    progress: bool = True,
    **backbone_kwargs: Any,
) -> VGGClassifier:
    """The VGG classification network (backbone + fc6/fc7/fc8) as a :class:`VGGClassifier`.

    Args:
        arch: any :class:`~vggbackbone.VGGBackbone` arch: a paper config (``"vgg16"``,
            ``"vgg11_bn"``...) or a block spec such as d2l's VGG-11
            ``((1, 64), (1, 128), (2, 256), (2, 512), (2, 512))``.
        num_classes: classes (1000 for ImageNet files).
        weights: ``None`` (torchvision's random init); a torchvision weights name
            (``"IMAGENET1K_V1"``); or a ``.pth``/``.safetensors`` state dict of a *whole*
            torchvision or timm VGG of the same arch (classifier included) or of this package's
            backbone (a fresh fc8 then). A :class:`VGGClassifier`'s own ``state_dict()`` goes
            back through ``model.load_state_dict``. The convolutions load strictly through the
            backbone's key map; fc6/fc7/fc8 as :func:`load_classifier_head` says (fc8 is fresh,
            with a warning, when ``num_classes`` differs from the file's: fine-tuning).
        in_channels: image channels (1 for grayscale; pretrained RGB weights need 3).
        width_mult: channel multiplier of the convolutions (rounded to multiples of 8).
        fc_channels: fc6/fc7 width; default ``4096 * width_mult`` as the backbone's.
        dropout: after fc6 and fc7 (paper: 0.5).
        head: ``"linear"`` = torchvision's forward, ``"conv"`` = timm's (dense); see the module.
        normalization: input normalisation (default: from the weights; ImageNet for RGB,
            ``mean = std = 0.5`` for other channel counts without weights).
        **backbone_kwargs: passed to :class:`~vggbackbone.VGGBackbone` (``frozen_stages``,
            ``norm_layer``, ``norm_eval``, ``batch_norm`` for block specs, ``ceil_mode``...).
    """
    for bad in ("return_layers", "output_stride", "fc_dropout"):
        if bad in backbone_kwargs:
            raise ValueError(f"vgg_classifier does not take {bad!r}: the classifier needs the plain last pool")
    cfg = get_config(arch, backbone_kwargs.get("batch_norm"))
    last_pool = [t for t in VGGBackbone.available_taps(cfg) if t.startswith("pool")][-1]
    backbone, read = build_trunk(
        arch,
        [last_pool],
        weights,
        in_channels=in_channels,
        width_mult=width_mult,
        normalization=normalization,
        progress=progress,
        **backbone_kwargs,
    )
    model = VGGClassifier(
        backbone,
        num_classes,
        fc_channels=fc_channels or scale_width(4096, width_mult),
        dropout=dropout,
        head=head,
        _empty_head=read is not None,
    )
    if read is not None:  # fc6-fc8 from the same file: its own key names (fc8 is not a backbone key)
        load_classifier_head(model, read.raw, read.description)
    return model


def adaptive_avg_pool_matrix(size: int, out: int, like: Tensor) -> Tensor:
    """``(out, size)`` matrix ``P`` with ``P @ v`` = ``adaptive_avg_pool1d(v, out)``: bin ``i``
    averages ``[floor(i * size / out), ceil((i + 1) * size / out))``, as PyTorch's kernel does."""
    i = torch.arange(out, device=like.device)
    start = (i * size) // out
    end = ((i + 1) * size + out - 1) // out
    idx = torch.arange(size, device=like.device)
    mask = ((idx[None] >= start[:, None]) & (idx[None] < end[:, None])).to(like.dtype)
    return mask / mask.sum(1, keepdim=True)


class ExportableClassifier(nn.Module):
    """A linear-head :class:`VGGClassifier` (eval) whose 7x7 adaptive average pool is two matrix
    products, so an ONNX graph with dynamic height/width stays exact.

    Written by hand because the ONNX exporter lowers ``adaptive_avg_pool2d`` to a fixed-kernel
    pooling for the traced size only: exported with dynamic axes, the graph silently gives other
    numbers at other sizes (the export's onnxruntime check caught it). Same parameters, same
    logits up to float rounding.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        m = self.model
        f = m.forward_features(x)
        ph = adaptive_avg_pool_matrix(f.shape[-2], 7, f)
        pw = adaptive_avg_pool_matrix(f.shape[-1], 7, f)
        f = torch.einsum("oh,nchw,pw->ncop", ph, f, pw).flatten(1)
        f = m.drop6(F.relu(m.fc6(f)))
        f = m.drop7(F.relu(m.fc7(f)))
        return m.fc8(f)
