"""VGGBackbone as timm models: ``timm.create_model("vggbackbone_<arch>", features_only=True)``.

One entry point per arch of :data:`vggbackbone.ARCHS`, registered with timm's public
``register_model`` when timm is imported (``import vggbackbone`` arranges it without importing
timm, :mod:`vggbackbone._timm_hook`)::

    import timm, vggbackbone
    m = timm.create_model("vggbackbone_vgg16", features_only=True, out_indices=(2, 3, 4))
    m.feature_info.channels(), m.feature_info.reduction()   # [256, 512, 512], [4, 8, 16]
    m = timm.create_model("vggbackbone_vgg16", features_only=True, pretrained=True,
                          pretrained_cfg_overlay=dict(file="vgg16-397923af.pth"))  # offline weights

The features are smp's VGG layout (and timm's own ``vgg*`` ``features_only``: the block outputs
at strides 1 to 16, then the stride-32 map): ``[conv1, conv2, conv3, conv4, conv5, pool5]`` at
reductions ``1, 2, 4, 8, 16, 32``, returned as a list (timm's ``features_only`` contract), so
segmentation-models-pytorch's ``tu-vggbackbone_<arch>`` encoders work too. ``pretrained=True``
reads ``pretrained_cfg_overlay=dict(file=...)`` (a torchvision, timm, vggbackbone or Caffe
weights file, through :class:`~vggbackbone.VGGBackbone`'s loader), else torchvision's ImageNet
weights of the arch (downloaded through torchvision's cache). ``in_chans`` and
``output_stride`` (32, 16, 8) are honoured; other keyword arguments go to ``VGGBackbone``
(``width_mult``, ``norm_eval``, ``frozen_stages``...).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from timm.models import register_model, resolve_pretrained_cfg
from torch import Tensor, nn

from .normalization import IMAGENET
from .vgg import ARCHS, VGGBackbone

__all__ = ["TIMM_PREFIX", "TIMM_TAPS", "VGGFeatures", "timm_model_names"]

TIMM_PREFIX = "vggbackbone_"
#: The feature taps, in ``out_indices`` order.
TIMM_TAPS = ("conv1", "conv2", "conv3", "conv4", "conv5", "pool5")

#: timm reads ``default_cfgs[name]`` of the entry point's module when registering it.
default_cfgs: dict[str, dict[str, Any]] = {
    TIMM_PREFIX + arch: {
        "url": "",
        "num_classes": 0,
        "input_size": (3, 224, 224),
        "mean": IMAGENET.mean,
        "std": IMAGENET.std,
        "interpolation": "bilinear",  # torchvision's VGG transforms
        "license": "bsd-3-clause",
    }
    for arch in ARCHS
}


class VGGFeatures(nn.Module):
    """A timm ``features_only`` model: ``forward(x) -> [tensor per out_index]``.

    ``x``: ``(N, in_chans, H, W)``; feature ``i`` is ``(N, C_i, H // r_i, W // r_i)`` with
    ``C_i, r_i`` from :attr:`feature_info` (``r`` capped at ``output_stride``).
    """

    def __init__(self, backbone: VGGBackbone) -> None:
        super().__init__()
        self.backbone = backbone
        self.feature_info = backbone.feature_info

    def forward(self, x: Tensor) -> list[Tensor]:
        return list(self.backbone(x).values())


def _out_taps(out_indices: Sequence[int] | int) -> list[str]:
    n = len(TIMM_TAPS)
    indices = list(range(n - out_indices, n)) if isinstance(out_indices, int) else list(out_indices)
    bad = [i for i in indices if not -n <= i < n]
    if bad or not indices:
        raise ValueError(f"out_indices must pick among the {n} features {TIMM_TAPS} (0..{n - 1}), got {out_indices}")
    return sorted({TIMM_TAPS[i] for i in indices}, key=TIMM_TAPS.index)


def _build(arch: str, name: str, pretrained: bool, features_only: bool, **kwargs: Any) -> VGGFeatures:
    if not features_only:
        raise ValueError(f"{name} is a feature backbone: create it with features_only=True")
    cfg = resolve_pretrained_cfg(name, kwargs.pop("pretrained_cfg", None), kwargs.pop("pretrained_cfg_overlay", None))
    if kwargs.pop("cache_dir", None) is not None:
        raise ValueError(f"{name}: cache_dir is not used (weights come from a file or torchvision's cache)")
    weights = (cfg.file or "DEFAULT") if pretrained else None
    backbone = VGGBackbone(
        arch,
        return_layers=_out_taps(kwargs.pop("out_indices", tuple(range(len(TIMM_TAPS))))),
        weights=weights,
        in_channels=kwargs.pop("in_chans", 3),
        **kwargs,
    )
    model = VGGFeatures(backbone)
    norm = backbone.normalization
    model.pretrained_cfg = dict(cfg.to_dict(), mean=tuple(norm.mean), std=tuple(norm.std))
    return model


def _entry_point(arch: str) -> Callable[..., VGGFeatures]:
    name = TIMM_PREFIX + arch

    def create(pretrained: bool = False, features_only: bool = False, **kwargs: Any) -> VGGFeatures:
        return _build(arch, name, pretrained, features_only, **kwargs)

    create.__name__ = create.__qualname__ = name  # timm registers an entry point under its __name__
    create.__doc__ = f"VGGBackbone('{arch}') features ``[conv1..conv5, pool5]`` (see :mod:`vggbackbone.timm_models`)."
    return create


def timm_model_names() -> list[str]:
    """The registered names, one per arch."""
    return [TIMM_PREFIX + arch for arch in ARCHS]


for _arch in ARCHS:
    globals()[TIMM_PREFIX + _arch] = register_model(_entry_point(_arch))
