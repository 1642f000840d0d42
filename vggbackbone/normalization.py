"""The input normalisation that travels with VGG weights: ``(image - mean) / std`` on ``[0, 1]`` RGB.

* :class:`InputNormalization` (what weights expect), :data:`IMAGENET` (torchvision's and timm's
  weights) and :data:`CAFFE` (the original release: BGR 0-255 minus the mean pixel, written on
  ``[0, 1]`` RGB input);
* :func:`resolve_normalization`: ``None``/``"imagenet"``/``"caffe"``/a dict -> one of them;
* :class:`NormalizeInput`: the first module of a task model that normalises its own input.

Also importable from :mod:`vggbackbone.weights`, their former home.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["CAFFE", "IMAGENET", "InputNormalization", "NormalizeInput", "resolve_normalization"]


@dataclass(frozen=True)
class InputNormalization:
    """What the weights expect: ``(image - mean) / std`` on ``[0, 1]`` RGB images.

    ``name`` says where it comes from (``"imagenet"``, ``"caffe"``, ``"custom"``...).
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    name: str = "custom"

    def __call__(self, images: Tensor) -> Tensor:
        """Normalise ``(N, C, H, W)`` or ``(C, H, W)`` images in ``[0, 1]``."""
        shape = (-1, 1, 1)
        mean = torch.as_tensor(self.mean, dtype=images.dtype, device=images.device).view(shape)
        std = torch.as_tensor(self.std, dtype=images.dtype, device=images.device).view(shape)
        return (images - mean) / std

    def to_dict(self) -> dict[str, Any]:
        return {"mean": list(self.mean), "std": list(self.std), "name": self.name}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> InputNormalization:
        """From ``{mean, std[, name][, space]}``; ``space`` says how ``mean``/``std`` are written:

        * ``"rgb01"`` (default, what :meth:`to_dict` writes): RGB order, on ``[0, 1]`` images;
        * ``"rgb255"``: RGB order, on ``0-255`` images;
        * ``"bgr255"``: Caffe's convention, BGR order on ``0-255`` images (e.g. py-faster-rcnn's
          ``PIXEL_MEANS`` ``[102.9801, 115.9465, 122.7717]`` with ``std`` ``[1, 1, 1]``). The
          result is named ``"caffe"``: weights trained on BGR input get their conv1_1 channels
          flipped when loaded, so the model still takes RGB.

        An unknown key, or a mean above 1 on ``[0, 1]`` images, raises ``ValueError``.
        """
        unknown = sorted(set(d) - {"mean", "std", "name", "space"})
        if unknown:
            raise ValueError(f"normalization: unknown key(s) {unknown}; accepted: mean, std, name, space")
        missing = [k for k in ("mean", "std") if k not in d]
        if missing:
            raise ValueError(f"normalization: missing {missing} in {dict(d)}")
        space = d.get("space", "rgb01")
        if space not in ("rgb01", "rgb255", "bgr255"):
            raise ValueError(f"normalization: space must be 'rgb01', 'rgb255' or 'bgr255', got {space!r}")
        mean = [float(v) for v in d["mean"]]
        std = [float(v) for v in d["std"]]
        name = str(d.get("name", "caffe" if space == "bgr255" else "custom"))
        if space == "bgr255":
            if name != "caffe":
                raise ValueError(f"normalization: space 'bgr255' is Caffe's convention, named 'caffe' (got {name!r})")
            mean, std = mean[::-1], std[::-1]
        if space == "rgb01" and any(abs(m) > 1 for m in mean):
            raise ValueError(
                f"normalization: mean {mean} is not on [0, 1] images; for 0-255 statistics add "
                "space: rgb255 (RGB order) or space: bgr255 (Caffe's BGR order)"
            )
        if space != "rgb01":
            mean, std = [m / 255 for m in mean], [v / 255 for v in std]
        return cls(tuple(mean), tuple(std), name)


#: torchvision's and timm's ImageNet weights.
IMAGENET = InputNormalization((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "imagenet")
#: The original Caffe VGG release: BGR 0-255 minus the BGR mean, expressed on RGB [0, 1] input
#: (the BGR order is folded into the first conv when such weights are loaded).
CAFFE = InputNormalization((123.68 / 255, 116.779 / 255, 103.939 / 255), (1 / 255, 1 / 255, 1 / 255), "caffe")


class NormalizeInput(nn.Module):
    """``(x - mean) / std`` on ``(N, C, H, W)`` images in ``[0, 1]``: a task model's first module.

    The statistics are non-persistent buffers (a state dict does not carry them: they come with
    the weights, see :func:`resolve_normalization`); :attr:`normalization` is what it applies.
    """

    def __init__(self, normalization: InputNormalization) -> None:
        super().__init__()
        self.normalization = normalization
        self.register_buffer("mean", torch.tensor(normalization.mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(normalization.std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"name={self.normalization.name!r}, mean={self.normalization.mean}, std={self.normalization.std}"


def resolve_normalization(normalization: Any, in_channels: int = 3) -> InputNormalization:
    """``None``/``"imagenet"``/``"caffe"``/dict/``InputNormalization`` -> ``InputNormalization``.

    ``None`` means ImageNet statistics for RGB input and ``mean=std=0.5`` (``[-1, 1]``) otherwise.
    """
    if isinstance(normalization, InputNormalization):
        norm = normalization
    elif isinstance(normalization, Mapping):
        norm = InputNormalization.from_dict(normalization)
    elif normalization in (None, "imagenet"):
        if in_channels != 3 and normalization is None:
            return InputNormalization((0.5,) * in_channels, (0.5,) * in_channels, "unit")
        norm = IMAGENET
    elif normalization == "caffe":
        norm = CAFFE
    else:
        raise ValueError(
            f"normalization must be None, 'imagenet', 'caffe', a dict or InputNormalization, got {normalization!r}"
        )
    if len(norm.mean) != in_channels or len(norm.std) != in_channels:
        raise ValueError(f"normalization {norm} has {len(norm.mean)} channels, the backbone takes {in_channels}")
    return norm
