"""The builder core every task model shares: each rule of "a VGG task model" written once.

* :func:`build_trunk`: the :class:`~vggbackbone.VGGBackbone` built and its weights read **once**,
  returning what was read (:class:`~vggbackbone.weights.ReadWeights`) for heads that need more of
  the file: Faster R-CNN's box head and SSD's fc6/fc7 (the classifier), the classifier's fc8;
* :func:`pretrained_structure`: what a *pretrained* detector derives from being pretrained
  (frozen early blocks, frozen BatchNorm), decided from an explicit ``pretrained`` flag that a
  checkpoint stores, so a model rebuilt without its weights gets the same structure;
* :func:`~vggbackbone.utils.scale_width`: the one ``width_mult`` rounding;
* :func:`check_num_classes`, :func:`require_blocks`: the checks every builder makes;
* :class:`NormalizingModel`: the base of the task models that normalise their own ``[0, 1]``
  input (FCN, U-Net, ReID, classifier), exposing :attr:`~NormalizingModel.normalization`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn
from torchvision.ops.misc import FrozenBatchNorm2d

from ..config import VGGConfig
from ..normalization import InputNormalization, NormalizeInput
from ..utils import scale_width
from ..vgg import VGGBackbone, get_config
from ..weights import ReadWeights, read_weights

__all__ = [
    "NormalizingModel",
    "Structure",
    "build_trunk",
    "check_num_classes",
    "is_pretrained",
    "pretrained_structure",
    "require_blocks",
    "scale_width",
]


def build_trunk(
    arch: Any,
    return_layers: Any,
    weights: Any = None,
    *,
    batch_norm: bool | None = None,
    progress: bool = True,
    **backbone_kwargs: Any,
) -> tuple[VGGBackbone, ReadWeights | None]:
    """``VGGBackbone(arch, return_layers, weights, ...)`` with ``weights`` read once; returns the
    backbone and what was read (``None`` without weights), whose ``state_dict`` still holds the
    layers the backbone did not build (fc6/fc7) and whose ``raw`` the file's own keys (fc8)."""
    cfg = get_config(arch, batch_norm)
    read = None if weights is None else read_weights(weights, cfg, progress=progress)
    if batch_norm is not None:
        backbone_kwargs["batch_norm"] = batch_norm
    backbone = VGGBackbone(arch, return_layers, read, progress=progress, **backbone_kwargs)
    return backbone, read


def is_pretrained(pretrained: bool | None, *weights: Any) -> bool:
    """The ``pretrained`` flag of a builder: as given, or (``None``) whether any of ``weights`` is set."""
    if pretrained is None:
        return any(w is not None for w in weights)
    if not isinstance(pretrained, bool):
        raise TypeError(f"pretrained must be True, False or None (from the weights), got {pretrained!r}")
    return pretrained


@dataclass(frozen=True)
class Structure:
    """The backbone options a builder derived from ``pretrained`` (:func:`pretrained_structure`)."""

    frozen_stages: int
    norm_layer: Callable[[int], nn.Module] | None

    def backbone_kwargs(self) -> dict[str, Any]:
        """``frozen_stages`` and, for ``_bn`` archs, ``norm_layer``: keyword arguments of ``VGGBackbone``."""
        out: dict[str, Any] = {"frozen_stages": self.frozen_stages}
        if self.norm_layer is not None:
            out["norm_layer"] = self.norm_layer
        return out


def pretrained_structure(
    cfg: VGGConfig,
    pretrained: bool,
    frozen_stages: int | None,
    norm_layer: Callable[[int], nn.Module] | None,
    *,
    frozen_when_pretrained: int,
    builder: str,
    max_frozen: int | None = None,
) -> Structure:
    """What a pretrained detector freezes, as torchvision's detectors do: ``frozen_stages`` (when not
    given) is ``frozen_when_pretrained`` pretrained and 0 from scratch; a ``_bn`` arch's BatchNorm
    (when ``norm_layer`` is not given) is ``FrozenBatchNorm2d`` pretrained, ``BatchNorm2d`` from scratch.

    ``pretrained`` is the builder's explicit flag (:func:`is_pretrained`), not "weights were
    loaded": a model rebuilt from a checkpoint loads none, yet must be built as the pretrained
    model it was. ``max_frozen``: the most blocks ``frozen_stages`` may name (for backbones cut
    before fc6).
    """
    if frozen_stages is None:
        frozen_stages = frozen_when_pretrained if pretrained else 0
    if max_frozen is not None and not 0 <= frozen_stages <= max_frozen:
        raise ValueError(
            f"{builder}: frozen_stages must be in 0..{max_frozen} (the VGG blocks it uses), got {frozen_stages}"
        )
    if cfg.batch_norm and norm_layer is None:
        norm_layer = FrozenBatchNorm2d if pretrained else nn.BatchNorm2d
    return Structure(frozen_stages, norm_layer)


def check_num_classes(num_classes: int, minimum: int, builder: str, *, background: bool = False) -> int:
    """``num_classes`` as an ``int`` of at least ``minimum``, else a ``ValueError`` naming ``builder``.

    ``background``: the count includes the background class (torchvision's detectors).
    """
    if isinstance(num_classes, bool) or int(num_classes) != num_classes:
        raise ValueError(f"{builder}: num_classes must be a whole number, got {num_classes!r}")
    if num_classes < minimum:
        counts = " (it counts the background too)" if background else ""
        raise ValueError(f"{builder}: num_classes must be >= {minimum}{counts}, got {num_classes}")
    return int(num_classes)


def require_blocks(cfg: VGGConfig, blocks: int, builder: str, why: str) -> None:
    """A ``ValueError`` naming ``builder`` unless ``cfg`` has ``blocks`` conv blocks (``why``: what needs them)."""
    if len(cfg.blocks) != blocks:
        raise ValueError(f"{builder} needs a {blocks}-block VGG ({why}), got {len(cfg.blocks)} blocks: {cfg.name}")


class NormalizingModel(nn.Module):
    """A task model that takes ``[0, 1]`` images and normalises them itself.

    The statistics are those the backbone's weights expect (its ``normalization``), applied by
    the :class:`~vggbackbone.weights.NormalizeInput` ``input_norm`` (non-persistent buffers: a
    state dict does not carry them, they come with the weights and the builder's options).
    Subclasses call ``super().__init__(backbone.normalization)`` and :meth:`normalize_input` first in
    ``forward``.
    """

    def __init__(self, normalization: InputNormalization) -> None:
        super().__init__()
        self.input_norm = NormalizeInput(normalization)

    @property
    def normalization(self) -> InputNormalization:
        """The :class:`~vggbackbone.weights.InputNormalization` applied to the ``[0, 1]`` input."""
        return self.input_norm.normalization

    @property
    def mean(self) -> Tensor:
        """The mean as a ``(1, C, 1, 1)`` buffer on the model's device (``ReIDNet``'s and
        ``VGGClassifier``'s former buffer of this name)."""
        return self.input_norm.mean

    @property
    def std(self) -> Tensor:
        """The standard deviation as a ``(1, C, 1, 1)`` buffer on the model's device."""
        return self.input_norm.std

    def normalize_input(self, x: Tensor) -> Tensor:
        """``(x - mean) / std`` of ``(N, C, H, W)`` images in ``[0, 1]``."""
        return self.input_norm(x)
