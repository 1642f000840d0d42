"""Perceptual losses on a frozen VGG: :class:`PerceptualLoss`, :class:`StyleLoss`, :class:`LPIPS`.

Each wraps a :class:`~vggbackbone.VGGBackbone` that returns the requested layers under their
Caffe names (``relu2_2``, ``conv5_4`` before its ReLU, ...). The VGG is frozen: always in eval
mode (``.train()`` does not change it), ``requires_grad=False`` on every weight, so gradients
reach the *images* only. Plain PyTorch; works under ``torch.autocast`` and ``torch.compile``.

The input range is always an explicit choice, ``input_range=(0, 1)`` or ``(-1, 1)``: images
outside it (beyond a ``1e-3`` tolerance for float overshoot), or non-finite, are refused with
an error rather than silently giving a different loss (a ``[0, 1]`` image fed to a ``[-1, 1]``
metric scores deceptively well). Images are mapped from that range to what the VGG weights
expect (``[0, 1]`` RGB then the weights' mean/std; LPIPS: ``[-1, 1]`` then its scaling layer).

Layer names used by the classic papers are listed in ``docs/perceptual.md``.

>>> loss_fn = PerceptualLoss("vgg16", {"relu2_2": 1.0}, input_range=(0, 1), weights="IMAGENET1K_V1")
>>> loss = loss_fn(output, target)                     # scalar, differentiable w.r.t. output
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .vgg import ArchSpec, VGGBackbone
from .weights import WeightsError, load_state_dict_file

__all__ = ["GATYS_STYLE_LAYERS", "LPIPS", "LPIPS_LAYERS", "PerceptualLoss", "StyleLoss", "gram_matrix"]

#: Gatys et al. 2016, style: relu1_1 .. relu5_1 of VGG-19, each weighted 1/5.
GATYS_STYLE_LAYERS: dict[str, float] = {f"relu{i}_1": 0.2 for i in range(1, 6)}
#: LPIPS (Zhang et al. 2018) on VGG-16: the last ReLU of each block.
LPIPS_LAYERS: tuple[str, ...] = ("relu1_2", "relu2_2", "relu3_3", "relu4_3", "relu5_3")
#: Tolerance on the declared input range (float overshoot of a generator's tanh, resizing...).
RANGE_TOLERANCE = 1e-3

_RANGES = ((0.0, 1.0), (-1.0, 1.0))


def _parse_range(input_range: Any) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in input_range)
    except (TypeError, ValueError):
        lo = hi = math.nan
    if (lo, hi) not in _RANGES:
        raise ValueError(f"input_range must be (0, 1) or (-1, 1): the range your images are in, got {input_range!r}")
    return lo, hi


def _check_range(x: Tensor, input_range: tuple[float, float], what: str) -> None:
    """Refuse images outside ``input_range`` (+- :data:`RANGE_TOLERANCE`) or non-finite."""
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"{what}: expected (N, 3, H, W) RGB images, got shape {tuple(x.shape)}")
    lo, hi = torch.aminmax(x.detach())
    lo, hi = float(lo), float(hi)
    r0, r1 = input_range
    # written as "not inside" so that NaN (which compares False) is refused too
    if not (lo >= r0 - RANGE_TOLERANCE and hi <= r1 + RANGE_TOLERANCE):
        hint = (
            " (they look like [0, 1] images: declare input_range=(0, 1))"
            if r0 < 0 and lo >= -RANGE_TOLERANCE
            else " (they look like [-1, 1] images: declare input_range=(-1, 1))"
            if r0 == 0 and lo >= -1 - RANGE_TOLERANCE and hi <= 1 + RANGE_TOLERANCE
            else ""
        )
        raise ValueError(
            f"{what}: values span [{lo:.6g}, {hi:.6g}], outside the declared input_range={input_range} "
            f"(tolerance {RANGE_TOLERANCE}){hint}"
        )


def _parse_layers(
    layers: Mapping[str, float] | Sequence[str] | str,
    layer_weights: Sequence[float] | None,
) -> dict[str, float]:
    """``{name: weight}`` or ``[names]`` (+ ``layer_weights`` of the same length) -> dict."""
    if isinstance(layers, str):
        layers = [layers]
    if isinstance(layers, Mapping):
        if layer_weights is not None:
            raise ValueError("give layer weights either in the layers dict or as layer_weights, not both")
        out = {str(k): float(v) for k, v in layers.items()}
    else:
        names = [str(n) for n in layers]
        if layer_weights is None:
            weights = [1.0] * len(names)
        else:
            weights = [float(w) for w in layer_weights]
            if len(weights) != len(names):
                raise ValueError(
                    f"{len(names)} layers {names} but {len(weights)} layer_weights {weights}: the counts must agree"
                )
        if len(set(names)) != len(names):
            raise ValueError(f"a layer is listed twice: {names}")
        out = dict(zip(names, weights, strict=True))
    if not out:
        raise ValueError("no layers requested")
    bad = {k: w for k, w in out.items() if not math.isfinite(w) or w < 0}
    if bad:
        raise ValueError(f"layer weights must be finite and >= 0, got {bad}")
    return out


class _FrozenVGG(nn.Module):
    """A VGGBackbone returning ``layers`` (Caffe names), frozen and always in eval mode."""

    def __init__(self, arch: ArchSpec, layers: Sequence[str], weights: Any, **backbone_kwargs: Any) -> None:
        super().__init__()
        valid = VGGBackbone.available_taps(arch, every_layer=True)
        unknown = [n for n in layers if n not in valid]
        if unknown:
            raise ValueError(f"unknown VGG layer(s) {unknown} for {arch!r}; valid names: {list(valid)}")
        self.net = VGGBackbone(arch, return_layers=list(layers), weights=weights, **backbone_kwargs)
        self.net.requires_grad_(False)
        self.net.eval()
        self.layers = tuple(layers)

    def train(self, mode: bool = True) -> _FrozenVGG:
        # The VGG is a fixed measuring instrument: dropout/BatchNorm never switch to training.
        super().train(mode)
        self.net.eval()
        return self

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return self.net(x)


class _VGGLoss(nn.Module):
    """Shared part: input range, the VGG and its normalisation."""

    def __init__(
        self,
        arch: ArchSpec,
        layers: dict[str, float],
        input_range: Any,
        weights: Any,
        normalization: Any,
        **backbone_kwargs: Any,
    ) -> None:
        super().__init__()
        self.input_range = _parse_range(input_range)
        self.layer_weights = layers
        self.vgg = _FrozenVGG(arch, list(layers), weights, normalization=normalization, **backbone_kwargs)
        norm = self.vgg.net.normalization  # the weights' own, or the override
        self.normalization = norm
        lo, hi = self.input_range
        # x in [lo, hi] -> [0, 1] -> (. - mean) / std, folded into one affine map per channel
        mean, std = torch.tensor(norm.mean), torch.tensor(norm.std)
        self.register_buffer("scale", (1.0 / ((hi - lo) * std)).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("shift", (-(lo / (hi - lo)) / std - mean / std).view(1, -1, 1, 1), persistent=False)

    def features(self, x: Tensor, what: str = "input") -> dict[str, Tensor]:
        """Images in ``input_range`` -> ``{layer: (N, C, h, w)}`` (checked, normalised)."""
        _check_range(x, self.input_range, f"{type(self).__name__} {what}")
        return self.vgg(x * self.scale + self.shift)


def _criterion(name: str) -> Any:
    if name == "l1":
        return F.l1_loss
    if name == "mse":
        return F.mse_loss
    raise ValueError(f"criterion must be 'l1' or 'mse', got {name!r}")


class PerceptualLoss(_VGGLoss):
    """Feature reconstruction loss: ``sum_l w_l * criterion(phi_l(input), phi_l(target))``.

    ``criterion`` is averaged over every element of a layer (Johnson et al.'s
    ``1/(C H W) ||phi(y) - phi(y_hat)||^2`` with ``"mse"``), computed in float32 even under
    autocast.

    Args:
        arch: VGG arch (``"vgg16"``: Johnson et al.; ``"vgg19"``: SRGAN/ESRGAN, Gatys et al.).
        layers: ``{layer: weight}``, or a list of layer names (weights from ``layer_weights``,
            default 1 each). Names are Caffe's: ``relu2_2``, ``conv5_4`` (before its ReLU),
            ``pool4``... Default: Johnson et al.'s content layer ``relu2_2``.
        criterion: ``"l1"`` or ``"mse"``.
        input_range: required: ``(0, 1)`` or ``(-1, 1)``, the range of the images passed in.
        weights: the VGG's weights (torchvision name, e.g. ``"IMAGENET1K_V1"``, or a file; see
            :class:`~vggbackbone.VGGBackbone`); ``None`` is a randomly initialised VGG.
        layer_weights: one weight per name when ``layers`` is a list; the counts must agree.
        normalization: override the weights' input normalisation (rarely needed).

    ``forward(input, target)``: ``(N, 3, H, W)`` each, in ``input_range`` -> scalar loss.
    """

    def __init__(
        self,
        arch: ArchSpec = "vgg16",
        layers: Mapping[str, float] | Sequence[str] | str = ("relu2_2",),
        criterion: Literal["l1", "mse"] = "l1",
        *,
        input_range: tuple[float, float],
        weights: Any = "IMAGENET1K_V1",
        layer_weights: Sequence[float] | None = None,
        normalization: Any = None,
    ) -> None:
        crit = _criterion(criterion)
        super().__init__(arch, _parse_layers(layers, layer_weights), input_range, weights, normalization)
        self._crit_name = criterion
        self._crit = crit

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        if input.shape != target.shape:
            raise ValueError(f"input {tuple(input.shape)} and target {tuple(target.shape)} differ in shape")
        fx, fy = self.features(input, "input"), self.features(target, "target")
        loss = input.new_zeros((), dtype=torch.float32)
        for name, w in self.layer_weights.items():
            loss = loss + w * self._crit(fx[name].float(), fy[name].float())
        return loss

    def extra_repr(self) -> str:
        return f"layers={self.layer_weights}, criterion={self._crit_name!r}, input_range={self.input_range}"


def gram_matrix(feat: Tensor) -> Tensor:
    """``(N, C, H, W) -> (N, C, C)``: ``F F^T / (C H W)`` (Johnson et al. 2016, eq. 3), in float32.

    Gatys et al. use the unnormalised ``F F^T`` and put ``1 / (4 C^2 (HW)^2)`` in the loss; with
    ``"mse"`` (a mean over ``C^2`` entries) the normalised Gram gives the same loss up to a
    constant per layer. Computed with autocast off: bf16 Gram sums of ``H*W`` products lose
    too many digits.
    """
    n, c, h, w = feat.shape
    f = feat.float().reshape(n, c, h * w)
    with torch.autocast(device_type=feat.device.type, enabled=False):
        return torch.bmm(f, f.transpose(1, 2)) / (c * h * w)


class StyleLoss(_VGGLoss):
    """Style reconstruction loss: ``sum_l w_l * criterion(G_l(input), G_l(target))``.

    ``G_l`` is :func:`gram_matrix` (normalised by ``C H W`` as Johnson et al.). Default: VGG-19
    and Gatys et al.'s layers ``relu1_1 .. relu5_1``, weight 1/5 each, squared error.
    Arguments as :class:`PerceptualLoss`. ``target`` may have another size than ``input``
    (Gram matrices are ``C x C`` whatever ``H, W``); batch sizes must match or ``target`` be one
    style image for the whole batch.
    """

    def __init__(
        self,
        arch: ArchSpec = "vgg19",
        layers: Mapping[str, float] | Sequence[str] | str = GATYS_STYLE_LAYERS,
        criterion: Literal["l1", "mse"] = "mse",
        *,
        input_range: tuple[float, float],
        weights: Any = "IMAGENET1K_V1",
        layer_weights: Sequence[float] | None = None,
        normalization: Any = None,
    ) -> None:
        crit = _criterion(criterion)
        super().__init__(arch, _parse_layers(layers, layer_weights), input_range, weights, normalization)
        self._crit_name = criterion
        self._crit = crit

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        if target.shape[0] not in (1, input.shape[0]):
            raise ValueError(f"target batch {target.shape[0]} must be 1 or the input's {input.shape[0]}")
        fx, fy = self.features(input, "input"), self.features(target, "target")
        loss = input.new_zeros((), dtype=torch.float32)
        for name, w in self.layer_weights.items():
            gx, gy = gram_matrix(fx[name]), gram_matrix(fy[name])
            loss = loss + w * self._crit(gx, gy.expand_as(gx))
        return loss

    def extra_repr(self) -> str:
        return f"layers={self.layer_weights}, criterion={self._crit_name!r}, input_range={self.input_range}"


def _lpips_weights_file() -> Path:
    spec = importlib.util.find_spec("lpips")  # locate the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "LPIPS needs the linear-layer weights shipped in the `lpips` package: pip install 'vggbackbone[lpips]' "
            "(or pip install lpips), or pass lin_weights=<path to vgg.pth>"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "weights" / "v0.1" / "vgg.pth"


class LPIPS(nn.Module):
    """LPIPS v0.1 (Zhang et al., CVPR 2018) on VGG-16, equal to ``lpips.LPIPS(net="vgg")``.

    ``d(x0, x1) = sum_l mean_hw( w_l . (n(phi_l(x0)) - n(phi_l(x1)))^2 )`` where ``phi_l`` are
    ``relu1_2, relu2_2, relu3_3, relu4_3, relu5_3``, ``n`` normalises each position's channel
    vector to unit length and ``w_l`` are the learned linear (1x1 conv) weights.

    LPIPS is defined on ``[-1, 1]`` images (it shifts and scales them by its own
    ``ScalingLayer``, not ImageNet mean/std). ``input_range=(0, 1)`` maps ``x -> 2x - 1`` first,
    exactly as the package's ``normalize=True``; ``input_range=(-1, 1)`` takes images as they are.
    Feeding ``[0, 1]`` images to the package without ``normalize=True`` silently gives lower
    (better-looking) distances; here such input is refused unless declared.

    Args:
        net: only ``"vgg"`` (VGG-16); AlexNet/SqueezeNet LPIPS are in the ``lpips`` package.
        input_range: required, ``(0, 1)`` or ``(-1, 1)``.
        weights: VGG-16 weights, default torchvision's ``"IMAGENET1K_V1"`` (what ``lpips`` uses).
        lin_weights: the linear layers' file; default ``lpips/weights/v0.1/vgg.pth`` from the
            installed ``lpips`` package (read locally, no download, ``weights_only``).

    ``forward(x0, x1)``: ``(N, 3, H, W)`` each -> distances ``(N, 1, 1, 1)`` (as ``lpips``).
    """

    def __init__(
        self,
        net: str = "vgg",
        *,
        input_range: tuple[float, float],
        weights: Any = "IMAGENET1K_V1",
        lin_weights: str | Path | None = None,
    ) -> None:
        super().__init__()
        if net not in ("vgg", "vgg16"):
            raise ValueError(f"LPIPS here is the VGG-16 variant (net='vgg'); for net={net!r} use the lpips package")
        self.input_range = _parse_range(input_range)
        self.vgg = _FrozenVGG("vgg16", LPIPS_LAYERS, weights)
        # lpips.ScalingLayer: (x - shift) / scale on [-1, 1] input
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        channels = self.vgg.net.feature_info.channels()
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in channels)
        path = Path(lin_weights) if lin_weights is not None else _lpips_weights_file()
        if not path.is_file():
            raise FileNotFoundError(f"LPIPS linear weights not found: {path}")
        sd = load_state_dict_file(path)[0]  # safely; a file that is not one says what it is
        expected = {f"lin{i}.model.1.weight": (1, c, 1, 1) for i, c in enumerate(channels)}
        got = {k: tuple(v.shape) for k, v in sd.items()}
        if got != expected:
            raise WeightsError(f"{path}: expected LPIPS v0.1 VGG linear layers {expected}, found {got}")
        with torch.no_grad():
            for i, lin in enumerate(self.lins):
                lin.weight.copy_(sd[f"lin{i}.model.1.weight"])
        self.lins.requires_grad_(False)

    def train(self, mode: bool = True) -> LPIPS:
        super().train(mode)
        self.vgg.train(False)
        return self

    @staticmethod
    def _unit(feat: Tensor, eps: float = 1e-10) -> Tensor:
        # lpips.normalize_tensor
        return feat / (torch.sqrt(torch.sum(feat**2, dim=1, keepdim=True)) + eps)

    def forward(self, x0: Tensor, x1: Tensor) -> Tensor:
        if x0.shape != x1.shape:
            raise ValueError(f"LPIPS images differ in shape: {tuple(x0.shape)} vs {tuple(x1.shape)}")
        _check_range(x0, self.input_range, "LPIPS x0")
        _check_range(x1, self.input_range, "LPIPS x1")
        if self.input_range == (0.0, 1.0):
            x0, x1 = 2 * x0 - 1, 2 * x1 - 1
        f0 = self.vgg((x0 - self.shift) / self.scale)
        f1 = self.vgg((x1 - self.shift) / self.scale)
        val: Tensor | int = 0
        for name, lin in zip(LPIPS_LAYERS, self.lins, strict=True):
            diff = (self._unit(f0[name]) - self._unit(f1[name])) ** 2
            val = val + lin(diff).mean([2, 3], keepdim=True)
        assert isinstance(val, Tensor)
        return val
