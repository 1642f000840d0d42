"""Whole-SSD weights files: torchvision's ``ssd300_vgg16`` and this package's own.

* :func:`load_ssd_weights`: a state dict file into an :func:`~vggbackbone.models.ssd_vgg` model,
  strictly; torchvision's keys through an explicit map (:func:`_torchvision_key_map`);
* :func:`save_ssd_weights`: the model's state dict with the input normalisation it applies.

Files are read with ``torch.load(weights_only=True)`` or safetensors (never run code).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

from torch import Tensor, nn
from torchvision.models.detection.ssd import SSD

from ..normalization import InputNormalization
from ..weights import check_state_dict
from ..weights_files import FORMAT, WeightsError, load_state_dict_file, write_state_dict_file

__all__ = ["TORCHVISION_SSD_NORMALIZATION", "load_ssd_weights", "save_ssd_weights"]

#: The input statistics of torchvision's ssd300_vgg16 (Caffe VGG16: 0-255 RGB minus the mean).
TORCHVISION_SSD_NORMALIZATION = InputNormalization(
    (0.48235, 0.45882, 0.40784), (1.0 / 255.0, 1.0 / 255.0, 1.0 / 255.0), "torchvision_ssd"
)

_TV_PREFIX = re.compile(r"^backbone\.(features|extra)\.(\d+(?:\.\d+)*)$")


def _param_prefixes(module: nn.Module) -> list[str]:
    """Names of the sub-modules holding parameters/buffers, in registration (forward) order."""
    return [n for n, m in module.named_modules() if any(True for _ in m.parameters(recurse=False))]


def _torchvision_key_map(sd: Mapping[str, Tensor], model: SSD) -> dict[str, str]:
    """torchvision ``ssd300_vgg16`` keys -> this model's keys.

    torchvision's backbone is ``features`` (VGG ``features[:pool4]``, flat indices) then
    ``extra.0`` (pool4, conv5_x, then pool5/fc6/fc7 as ``extra.0.7``) and ``extra.1..4``
    (conv8..conv11): its parameter layers, in network order, are this model's ``body`` convs,
    ``fc.fc6``, ``fc.fc7`` and ``extra.convK.convK_{1,2}`` in the same order; the L2Norm scale
    ``scale_weight`` is ``l2norm.weight``; the head keys are the same (torchvision's ``SSDHead``).
    """
    prefixes: list[str] = []
    for k in sd:
        if k.startswith(("backbone.features.", "backbone.extra.")):
            p = k.rsplit(".", 1)[0]
            if not _TV_PREFIX.match(p):
                raise WeightsError(f"unexpected key {k!r} in a torchvision SSD state dict")
            if p not in prefixes:
                prefixes.append(p)

    def order(p: str) -> tuple[int, tuple[int, ...]]:  # network order, whatever order the file has
        m = _TV_PREFIX.match(p)
        assert m is not None
        return (0 if m.group(1) == "features" else 1, tuple(int(i) for i in m.group(2).split(".")))

    prefixes.sort(key=order)
    bb = model.backbone
    ours = [f"backbone.{n}" for n in _param_prefixes(bb) if n != "l2norm"]
    if len(prefixes) != len(ours):
        raise WeightsError(
            f"the torchvision SSD state dict has {len(prefixes)} backbone layers with weights, this "
            f"ssd_vgg({bb.body.arch}, size={bb.size}) has {len(ours)}: build ssd_vgg('vgg16', size=300) for it"
        )
    key_map = {"backbone.scale_weight": "backbone.l2norm.weight"}
    for theirs, mine in zip(prefixes, ours, strict=True):
        for k in sd:
            if k.rsplit(".", 1)[0] == theirs:
                key_map[k] = f"{mine}.{k.rsplit('.', 1)[1]}"
    for k in sd:
        if k.startswith("head."):
            key_map[k] = k
    return key_map


def load_ssd_weights(model: SSD, weights: str | os.PathLike[str]) -> InputNormalization | None:
    """Load a whole-SSD state dict file into ``model`` (built by :func:`ssd_vgg`), strictly.

    Understands torchvision's ``ssd300_vgg16`` state dicts (through an explicit key map, see
    :func:`_torchvision_key_map`) and files of this package (``model.state_dict()`` or
    :func:`save_ssd_weights`). Read with ``torch.load(weights_only=True)`` or safetensors.
    Returns the input normalisation the file declares (torchvision's SSD statistics for a
    torchvision file), or ``None`` when it declares none. Raises
    :class:`~vggbackbone.WeightsError` naming missing, unexpected or mis-shaped keys.
    """
    sd, meta = load_state_dict_file(weights)
    norm: InputNormalization | None = None
    if "backbone.scale_weight" in sd:  # torchvision's SSDFeatureExtractorVGG
        key_map = _torchvision_key_map(sd, model)
        sd = {key_map[k]: v for k, v in sd.items()}
        norm = TORCHVISION_SSD_NORMALIZATION
        source = "torchvision ssd300_vgg16"
    else:
        source = "vggbackbone ssd_vgg"
        if "normalization" in meta:
            norm = InputNormalization.from_dict(meta["normalization"])
    check_state_dict(model.state_dict(), sd, f"{weights} ({source} layout)", "this ssd_vgg")
    model.load_state_dict(sd, strict=False)  # strict in effect: only num_batches_tracked may be absent
    return norm


def save_ssd_weights(model: SSD, path: str | os.PathLike[str]) -> Path:
    """Write ``model``'s state dict with its input normalisation (``.pth``/``.safetensors``), atomically.

    Loads back with ``ssd_vgg(..., weights=path)``, normalisation included.
    """
    t = model.transform
    declared = getattr(model, "normalization", None)
    name = declared.name if isinstance(declared, InputNormalization) else "custom"
    norm = InputNormalization(tuple(t.image_mean), tuple(t.image_std), name)  # what the model really applies
    meta = {"format": FORMAT, "model": "ssd_vgg", "normalization": norm.to_dict()}
    return write_state_dict_file(path, model.state_dict(), meta)
