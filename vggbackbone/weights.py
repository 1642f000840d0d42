"""VGG weights mapped onto :class:`~vggbackbone.VGGBackbone`, and loaded into it strictly.

Sources understood, all mapped key by key onto this package's names:

* torchvision ``VGG`` state dicts (``features.<i>.*``, ``classifier.0/3/6.*``), also through a
  torchvision weights name (``"IMAGENET1K_V1"``), which goes through torchvision's download cache;
* timm ``vgg*`` state dicts (``features.<i>.*``, ``pre_logits.fc1/fc2.*``, ``head.fc.*``);
* files written by :meth:`VGGBackbone.save_weights` (``features.conv1.conv1_1.*``, with metadata);
* the original Caffe release (``VGG_ILSVRC_16_layers.caffemodel`` ...), read with protobuf by
  :mod:`vggbackbone.caffe` into torchvision's layout; Caffe's normalisation comes with it.

``classifier.0`` (4096 x 25088) becomes the 7x7 conv fc6 and ``classifier.3`` the 1x1 conv fc7,
as FCN convolutionalises them; the 1000-way fc8 is ignored. Files are read with
``torch.load(weights_only=True)``, safetensors or protobuf: a weights file never runs code.

:func:`read_weights` reads a source once into :class:`ReadWeights`; a backbone loads from that
(``VGGBackbone(weights=read)``), and so can the heads that need more of the file (fc6/fc7, fc8),
without reading it again. Reading the files themselves is :mod:`vggbackbone.weights_files`; the
input normalisation, :mod:`vggbackbone.normalization`; both are re-exported here.
"""

from __future__ import annotations

import os
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .config import ARCHS, VGGConfig, block_layers
from .normalization import CAFFE, IMAGENET, InputNormalization, NormalizeInput, resolve_normalization
from .weights_files import (
    FORMAT,
    FORMAT_VERSION,
    WeightsError,
    is_weights_file,
    load_state_dict_file,
    load_torchvision_state_dict,
    resolve_torchvision_weights,
    save_backbone_weights,
)

__all__ = [
    "CAFFE",
    "CLASSIFIER_KEYS",
    "FORMAT",
    "FORMAT_VERSION",
    "IMAGENET",
    "InputNormalization",
    "NormalizeInput",
    "ReadWeights",
    "WeightsError",
    "all_finite",
    "check_state_dict",
    "classifier_problem",
    "is_weights_file",
    "load_backbone_weights",
    "load_state_dict_file",
    "load_torchvision_state_dict",
    "load_vgg_state_dict",
    "read_weights",
    "resolve_normalization",
    "resolve_torchvision_weights",
    "save_backbone_weights",
    "to_canonical",
]


# ---------------------------------------------------------------------------- key maps
_PARAMS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def flat_layout(cfg: VGGConfig) -> dict[int, str]:
    """``features.<i>`` index of torchvision/timm's flat ``Sequential`` -> our module path.

    Only layers with parameters or buffers appear (convs and BatchNorms).
    """
    # torchvision/timm lay each block out as block_layers() then a max-pool, one index per layer
    flat = [f"features.conv{b}.{name}" for b in range(1, len(cfg.blocks) + 1) for name in (*block_layers(cfg, b), "")]
    return {i: path for i, path in enumerate(flat) if path.rpartition(".")[2].startswith(("conv", "bn"))}


_FLAT_KEY = re.compile(r"^features\.(\d+)\.(\w+)$")
_HEAD_MAP = {
    "classifier.0": "features.fc6.conv",  # torchvision
    "classifier.3": "features.fc7.conv",
    "pre_logits.fc1": "features.fc6.conv",  # timm
    "pre_logits.fc2": "features.fc7.conv",
}
_IGNORED_PREFIXES = ("classifier.6.", "head.fc.")  # the 1000-way fc8: not part of a backbone


def _is_native(keys: Sequence[str]) -> bool:
    return any(k.startswith(("features.conv1.", "features.fc6.", "features.fc7.")) for k in keys)


def to_canonical(state_dict: Mapping[str, Tensor], cfg: VGGConfig) -> tuple[dict[str, Tensor], list[str], str]:
    """Map a torchvision/timm/native state dict onto our key names for ``cfg``.

    Returns ``(mapped, unexpected_keys, source)`` where ``source`` is ``"native"``,
    ``"torchvision"``, ``"timm"`` or ``"flat"`` (features only).
    """
    keys = list(state_dict)
    if _is_native(keys):
        return dict(state_dict), [], "native"
    layout = flat_layout(cfg)
    mapped: dict[str, Tensor] = {}
    unexpected: list[str] = []
    source = "flat"
    for k, v in state_dict.items():
        m = _FLAT_KEY.match(k)
        if m and int(m.group(1)) in layout and m.group(2) in _PARAMS:
            mapped[f"{layout[int(m.group(1))]}.{m.group(2)}"] = v
            continue
        if k.startswith(_IGNORED_PREFIXES):
            source = "torchvision" if k.startswith("classifier") else "timm"
            continue
        head, _, param = k.rpartition(".")
        if head in _HEAD_MAP and param in ("weight", "bias"):
            source = "torchvision" if head.startswith("classifier") else "timm"
            mapped[f"{_HEAD_MAP[head]}.{param}"] = v  # reshaped to the conv shape by the loader
            continue
        unexpected.append(k)
    return mapped, unexpected, source


def _layout_keys(cfg: VGGConfig) -> set[str]:
    return {f"features.{i}.{p}" for i, path in flat_layout(cfg).items() for p in _params_of(path)}


def matching_archs(state_dict: Mapping[str, Tensor]) -> list[str]:
    """Named archs whose torchvision/timm flat layout has exactly these ``features.*`` keys.

    Usually one; ``vgg16`` and ``vgg16_c`` share a layout (C differs in kernel shapes only).
    """
    present = {k for k in state_dict if k.startswith("features.") and not k.endswith("num_batches_tracked")}
    return [name for name, cfg in ARCHS.items() if _layout_keys(cfg) == present]


def _params_of(path: str) -> tuple[str, ...]:
    return ("weight", "bias", "running_mean", "running_var") if ".bn" in path else ("weight", "bias")


# ---------------------------------------------------------------------------- read once
@dataclass
class ReadWeights:
    """A weights source read once and mapped onto ``config``'s key names (:func:`read_weights`).

    ``VGGBackbone(arch, weights=read)`` loads from it without reading the file again, and heads
    that need more of the file than the backbone's layers take it from here: fc6/fc7 in
    :attr:`state_dict` (``features.fc6.conv.*``, still in the source's shape, see
    :func:`reshape_head`), fc8 in :attr:`raw` under the source's own names.

    Attributes:
        state_dict: the tensors under this package's key names.
        unexpected: keys of the source that map onto nothing.
        normalization: what the source declares (``None``: nothing).
        meta: the file's metadata, plus ``source`` (``native``, ``torchvision``, ``timm``,
            ``flat``, ``caffemodel``) and, for flat layouts, ``layout_archs``.
        description: the file or the torchvision weights name, for messages.
        config: the arch the keys were mapped for.
        raw: the state dict as the source names it.
    """

    state_dict: dict[str, Tensor]
    unexpected: list[str]
    normalization: InputNormalization | None
    meta: dict[str, Any]
    description: str
    config: VGGConfig
    raw: dict[str, Tensor] = field(default_factory=dict, repr=False)


#: fc6/fc7 of a backbone state dict (Linear or conv shape)
CLASSIFIER_KEYS = tuple(f"features.{fc}.conv.{p}" for fc in ("fc6", "fc7") for p in ("weight", "bias"))


def classifier_problem(state_dict: Mapping[str, Tensor], description: str) -> str | None:
    """Why ``state_dict`` (this package's key names) has no usable fc6/fc7 classifier, or ``None``.

    Missing (a file saved from a backbone cut at pool5, a features-only file) or not finite
    (torchvision's ``IMAGENET1K_FEATURES`` ships NaN classifier weights).
    """
    if any(k not in state_dict for k in CLASSIFIER_KEYS):
        return f"{description} has no classifier fc6/fc7"
    if not all(all_finite(state_dict[k]) for k in CLASSIFIER_KEYS):
        return f"{description} has a classifier fc6/fc7 that is not finite (e.g. torchvision's IMAGENET1K_FEATURES)"
    return None


def read_weights(weights: str | os.PathLike[str] | Any, cfg: VGGConfig, *, progress: bool = True) -> ReadWeights:
    """Read ``weights`` (file, torchvision name or enum) once and map it onto ``cfg``'s key names."""
    norm: InputNormalization | None = None
    if is_weights_file(weights):
        sd, meta = load_state_dict_file(weights)
        desc = str(weights)
        if "normalization" in meta:
            norm = InputNormalization.from_dict(meta["normalization"])
    else:
        w = resolve_torchvision_weights(weights, cfg)
        sd = load_torchvision_state_dict(w, progress=progress)
        meta = {}
        desc = f"torchvision {type(w).__name__}.{w.name}"
        tf = w.transforms()
        norm = InputNormalization(
            tuple(tf.mean), tuple(tf.std), "imagenet" if tuple(tf.mean) == IMAGENET.mean else w.name
        )
    mapped, unexpected, source = to_canonical(sd, cfg)
    meta.setdefault("source", source)
    if source != "native":
        meta["layout_archs"] = matching_archs(sd)
    if norm is None and source in ("torchvision", "timm", "flat"):
        norm = IMAGENET  # both libraries' ImageNet weights use these statistics
    return ReadWeights(mapped, unexpected, norm, meta, desc, cfg, sd)


def load_vgg_state_dict(
    weights: str | os.PathLike[str] | Any, cfg: VGGConfig, *, progress: bool = True
) -> tuple[dict[str, Tensor], list[str], InputNormalization | None, dict[str, Any], str]:
    """:func:`read_weights` as a tuple ``(state_dict, unexpected_keys, normalization or None,
    metadata, description)``; fc6/fc7 tensors are still in the source's shape (see :func:`reshape_head`)."""
    read = read_weights(weights, cfg, progress=progress)
    return read.state_dict, read.unexpected, read.normalization, read.meta, read.description


def reshape_head(sd: dict[str, Tensor], fc6_in_channels: int) -> dict[str, Tensor]:
    """Turn Linear fc6/fc7 weights (``(4096, C*7*7)``, ``(4096, 4096)``) into conv weights."""
    out = dict(sd)
    w6 = out.get("features.fc6.conv.weight")
    if w6 is not None and w6.dim() == 2:
        if w6.shape[1] != fc6_in_channels * 49:
            raise WeightsError(
                f"classifier fc6 weight has {w6.shape[1]} inputs, "
                f"expected {fc6_in_channels}*7*7 = {fc6_in_channels * 49}"
            )
        out["features.fc6.conv.weight"] = w6.reshape(w6.shape[0], fc6_in_channels, 7, 7)
    w7 = out.get("features.fc7.conv.weight")
    if w7 is not None and w7.dim() == 2:
        out["features.fc7.conv.weight"] = w7.reshape(*w7.shape, 1, 1)
    return out


def _full_keys(model: nn.Module) -> set[str]:
    """Every key the full (untruncated) arch would have, to tell 'not built' from 'unknown'."""
    keys: set[str] = set()
    cfg = model.config
    for path in flat_layout(cfg).values():
        for p in _params_of(path):
            keys.add(f"{path}.{p}")
        if ".bn" in path:
            keys.add(f"{path}.num_batches_tracked")
    keys |= {f"features.{fc}.conv.{p}" for fc in ("fc6", "fc7") for p in ("weight", "bias")}
    return keys


# ---------------------------------------------------------------------------- into a backbone
def load_backbone_weights(
    model: nn.Module, weights: Any, normalization: Any = None, *, progress: bool = True
) -> InputNormalization:
    """Load ``weights`` (a source, or one already read: :class:`ReadWeights`) into ``model`` (a
    :class:`~vggbackbone.VGGBackbone`) strictly; return the normalisation the weights expect.

    Keys of layers the model did not build (deeper than its deepest tap) and the classifier's
    fc8 are skipped; anything else missing, unexpected or of the wrong shape raises
    :class:`WeightsError` naming the keys.
    """
    if isinstance(weights, ReadWeights):
        if weights.config != model.config:
            raise ValueError(f"{weights.description} was read for {weights.config.name}, this backbone is {model.arch}")
        read = weights
    else:
        read = read_weights(weights, model.config, progress=progress)
    _check_source(model, read)
    own = model.state_dict()
    sd = reshape_head(read.state_dict, _fc6_in_channels(read.state_dict, model.config))
    target = f"VGGBackbone({model.arch})"
    check_state_dict(own, sd, read.description, target, unexpected=read.unexpected, not_built=_full_keys(model))
    model.load_state_dict({k: sd[k] for k in own if k in sd}, strict=False)
    return _loaded_normalization(model, read, normalization)


def _check_source(model: nn.Module, read: ReadWeights) -> None:
    """The file's arch (its metadata, or its flat layout) must be the model's."""
    file_arch = read.meta.get("arch")
    if file_arch is not None and file_arch != model.arch:
        raise WeightsError(f"{read.description}: saved from arch {file_arch}, but this backbone is {model.arch}")
    layout_archs = read.meta.get("layout_archs")
    if layout_archs and _layout_keys(model.config) != _layout_keys(ARCHS[layout_archs[0]]):
        # Mapped through our layout, another arch's flat indices would land on the wrong layers.
        raise WeightsError(
            f"{read.description} is a {' or '.join(layout_archs)} state dict ({read.meta['source']} layout), "
            f"but this backbone is {model.arch}: build VGGBackbone({layout_archs[-1]!r}, ...) for this file"
        )


def _fc6_in_channels(sd: Mapping[str, Tensor], cfg: VGGConfig) -> int:
    """Channels of the input to fc6 = the last block's width, read from the file (else the arch's)."""
    last_block = f"features.conv{len(cfg.blocks)}"
    found = (
        v.shape[0]
        for k, v in reversed(sd.items())
        if k.startswith(last_block) and k.endswith("weight") and v.dim() == 4
    )
    return next(found, 0) or cfg.blocks[-1].channels


def check_state_dict(
    own: Mapping[str, Tensor],
    sd: Mapping[str, Tensor],
    desc: str,
    target: str,
    *,
    unexpected: Sequence[str] = (),
    not_built: Collection[str] = (),
) -> None:
    """A strict load of ``sd`` (from ``desc``) into ``own`` (``target``'s state dict), checked first:
    every key present (``num_batches_tracked`` may be absent), none unknown (``not_built``: keys of
    layers the model left out, allowed), shapes equal, values finite; else a :class:`WeightsError`
    naming the keys."""
    unexpected = [*unexpected, *(k for k in sd if k not in own and k not in not_built)]
    missing = [k for k in own if k not in sd and not k.endswith("num_batches_tracked")]
    if unexpected or missing:
        raise WeightsError(
            f"{desc} does not match {target}\n"
            f"  missing keys ({len(missing)}): {missing[:8]}{' ...' if len(missing) > 8 else ''}\n"
            f"  unexpected keys ({len(unexpected)}): {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}"
        )
    shapes = [
        f"{k}: file {tuple(sd[k].shape)} vs model {tuple(v.shape)}"
        for k, v in own.items()
        if k in sd and sd[k].shape != v.shape
    ]
    if shapes:
        raise WeightsError(f"{desc} has tensors of the wrong shape for {target}:\n  " + "\n  ".join(shapes[:8]))
    nonfinite = [k for k in own if k in sd and not all_finite(sd[k])]
    if nonfinite:
        hint = (
            " (torchvision's IMAGENET1K_FEATURES ships NaN classifier weights): request taps up to pool5 only"
            if all(k.startswith(("features.fc6.", "features.fc7.")) for k in nonfinite)
            else ""
        )
        raise WeightsError(f"{desc} has non-finite values in {nonfinite[:4]}{hint}")


def _loaded_normalization(model: nn.Module, read: ReadWeights, normalization: Any) -> InputNormalization:
    """The normalisation of the loaded model: ``normalization`` if given, else the file's; Caffe's
    BGR weights get conv1_1's input channels flipped so the model takes RGB."""
    caffemodel = read.meta.get("source") == "caffemodel"
    if normalization is None and not caffemodel:
        return read.normalization if read.normalization is not None else resolve_normalization(None, model.in_channels)
    requested = read.normalization if normalization is None else resolve_normalization(normalization, model.in_channels)
    if caffemodel and requested.name != "caffe":
        raise WeightsError(
            f"{read.description}: a .caffemodel takes BGR 0-255 input minus the mean pixel (normalization 'caffe', "
            f"implied); got normalization {requested.name!r}: leave it unset, or give Caffe statistics (space: bgr255)"
        )
    if requested.name == "caffe" and read.meta["source"] != "native":
        # Weights trained on BGR input: flip conv1_1's input channels so the model takes RGB.
        # This package's own files are already stored RGB-first (flipped when first loaded).
        conv = model.features["conv1"][0]
        with torch.no_grad():
            conv.weight.copy_(conv.weight.flip(1))
    return requested


def all_finite(t: Tensor) -> bool:
    """Whether every entry of ``t`` is finite (always true for integer tensors)."""
    if not t.is_floating_point():
        return True
    # fast path: a finite sum means finite entries (one pass, no 100M-element bool mask)
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())
