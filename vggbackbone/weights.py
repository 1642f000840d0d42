"""Loading and saving VGG weights, and the input normalisation that travels with them.

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
"""

from __future__ import annotations

import json
import os
import pickle
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .config import ARCHS, VGGConfig, block_layers
from .filekind import error_text, load_failure, sniff_file
from .utils import atomic_path

__all__ = [
    "CAFFE",
    "IMAGENET",
    "InputNormalization",
    "NormalizeInput",
    "WeightsError",
    "all_finite",
    "is_weights_file",
    "load_state_dict_file",
    "load_torchvision_state_dict",
    "load_vgg_state_dict",
    "resolve_normalization",
    "resolve_torchvision_weights",
]

FORMAT = "vggbackbone"
FORMAT_VERSION = 1


class WeightsError(ValueError):
    """A weights file that cannot be used for the requested backbone."""


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


# ---------------------------------------------------------------------------- reading files
def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _unwrap(obj: Any, source: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Find the tensor dict inside a checkpoint-like object; return it with any metadata."""
    meta: dict[str, Any] = {}
    if isinstance(obj, Mapping) and obj.get("format") == FORMAT:
        meta = {k: v for k, v in obj.items() if k != "state_dict"}
        obj = obj["state_dict"]
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping) or not obj:
        raise WeightsError(f"{source}: expected a non-empty state dict (name -> tensor), got {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not isinstance(v, Tensor)]
    if bad:
        raise WeightsError(f"{source}: entries that are not tensors: {bad[:5]}")
    sd = dict(obj)
    if all(k.startswith("module.") for k in sd):  # saved from DataParallel / DDP
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return sd, meta


def load_state_dict_file(path: str | os.PathLike[str]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read a ``.pth``/``.pt``/``.bin`` (``weights_only``), ``.safetensors`` or ``.caffemodel`` file safely.

    Returns ``(state_dict, metadata)``. Pickled objects other than tensors and plain containers
    are refused with :class:`WeightsError` and never executed.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    kind = sniff_file(path)  # an empty file, an LFS pointer, an HTML page...: said so before torch reads it
    if not kind.torch_readable and kind.kind != "safetensors":
        raise WeightsError(f"{path}: {kind.what}, not a weights file{f' ({kind.hint})' if kind.hint else ''}")
    if path.suffix == ".caffemodel" and kind.kind == "binary":  # the Caffe release: protobuf only, runs no code
        return _read_caffemodel(path)
    if path.suffix == ".safetensors" or kind.kind == "safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                raw_meta = f.metadata() or {}
                sd = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no items())
        except (SafetensorError, OSError, ValueError) as e:
            raise WeightsError(f"{path}: not a readable safetensors file ({kind.what}: {e})") from e
        meta: dict[str, Any] = {}
        if raw_meta.get("format") == FORMAT:
            meta = {k: json.loads(v) if k in ("normalization", "arch") else v for k, v in raw_meta.items()}
        sd, _ = _unwrap(sd, str(path))
        return sd, meta
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, KeyError, ValueError, IndexError) as e:
        reason, phrase = load_failure(kind, e)
        if reason == "code":
            raise WeightsError(
                f"{path}: refused to load: the file pickles Python objects, not just tensors ({phrase}), and weights "
                "are only read as tensors and plain data, so a file never runs code. Save model.state_dict() instead."
            ) from None
        size = path.stat().st_size
        raise WeightsError(f"{path}: not a readable PyTorch weights file ({size} bytes: {phrase})") from None
    return _unwrap(obj, str(path))


def _read_caffemodel(path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """A VGG ``.caffemodel`` (:func:`vggbackbone.caffe.read_caffemodel`) as a torchvision-layout
    state dict, its metadata declaring Caffe's input normalisation (BGR 0-255 minus the mean)."""
    from .caffe import CaffeModelError, read_caffemodel

    try:
        sd, info = read_caffemodel(path)
    except CaffeModelError as e:
        raise WeightsError(str(e)) from e
    return sd, {**info, "normalization": CAFFE.to_dict()}


def resolve_torchvision_weights(name: Any, cfg: VGGConfig) -> Any:
    """torchvision's weights enum member for ``cfg``'s arch: ``name`` is a member already, or its
    name (``"IMAGENET1K_V1"``, ``"VGG16_Weights.IMAGENET1K_V1"``, ``"DEFAULT"``).

    Raises :class:`WeightsError` when torchvision has no weights for the arch or no such name.
    """
    import torchvision
    from torchvision.models import WeightsEnum

    if isinstance(name, WeightsEnum):
        return name
    if cfg.name not in torchvision.models.list_models(module=torchvision.models):
        raise WeightsError(f"torchvision has no pretrained weights for {cfg.name}; pass a state dict file instead")
    enum = torchvision.models.get_model_weights(cfg.name)
    short = str(name).split(".")[-1]
    if short == "DEFAULT":
        return enum.DEFAULT
    try:
        return enum[short]
    except KeyError:
        raise WeightsError(
            f"{name!r} is neither an existing file nor a torchvision weights name for {cfg.name} "
            f"(available: {[w.name for w in enum]})"
        ) from None


def load_torchvision_state_dict(w: Any, *, progress: bool = True) -> dict[str, Tensor]:
    """The state dict of torchvision weights ``w`` (an enum member, see
    :func:`resolve_torchvision_weights`), through torch hub's download cache.

    ``w.get_state_dict()`` but with ``weights_only=True``: torchvision's own call unpickles the
    cached file with ``weights_only=False``, so a tampered cache file could run code. Raises
    :class:`WeightsError` naming the cached file when it is not a plain tensors file.
    """
    from torch.hub import get_dir, load_state_dict_from_url

    cached = Path(get_dir()) / "checkpoints" / os.path.basename(w.url)
    try:
        obj = load_state_dict_from_url(w.url, progress=progress, check_hash=True, weights_only=True)
    except pickle.UnpicklingError as e:
        raise WeightsError(
            f"{cached}: refused to load torchvision weights {type(w).__name__}.{w.name}: the cached file pickles "
            f"Python objects, not just tensors ({error_text(e)})"
        ) from None
    except (RuntimeError, EOFError) as e:
        raise WeightsError(f"{cached}: not a readable PyTorch weights file ({error_text(e)})") from None
    return _unwrap(obj, str(cached))[0]


def is_weights_file(weights: Any) -> bool:
    """Whether ``weights`` names a file rather than torchvision weights: a path that exists, or a
    string shaped like one (a path separator, or a ``.pth``/``.pt``/``.bin``/``.safetensors``/``.ckpt``
    suffix, so a missing file is reported as such, not as an unknown torchvision name)."""
    if not isinstance(weights, (str, os.PathLike)):
        return False
    s = str(weights)
    return (
        Path(s).exists()
        or os.sep in s
        or "/" in s
        or Path(s).suffix in (".pth", ".pt", ".bin", ".safetensors", ".ckpt", ".caffemodel")
    )


def load_vgg_state_dict(
    weights: str | os.PathLike[str] | Any, cfg: VGGConfig, *, progress: bool = True
) -> tuple[dict[str, Tensor], list[str], InputNormalization | None, dict[str, Any], str]:
    """Read ``weights`` (file, torchvision name or enum) and map it onto ``cfg``'s key names.

    Returns ``(state_dict, unexpected_keys, normalization or None, metadata, description)``;
    fc6/fc7 tensors are still in the source's shape (see :func:`reshape_head`).
    """
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
    return mapped, unexpected, norm, meta, desc


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


# ---------------------------------------------------------------------------- into a backbone
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


def load_backbone_weights(
    model: nn.Module, weights: Any, normalization: Any = None, *, progress: bool = True
) -> InputNormalization:
    """Load ``weights`` into ``model`` (a :class:`~vggbackbone.VGGBackbone`) strictly; return the
    normalisation the weights expect.

    Keys of layers the model did not build (deeper than its deepest tap) and the classifier's
    fc8 are skipped; anything else missing, unexpected or of the wrong shape raises
    :class:`WeightsError` naming the keys.
    """
    sd, unexpected, norm, meta, desc = load_vgg_state_dict(weights, model.config, progress=progress)
    file_arch = meta.get("arch")
    if file_arch is not None and file_arch != model.arch:
        raise WeightsError(f"{desc}: saved from arch {file_arch}, but this backbone is {model.arch}")

    layout_archs = meta.get("layout_archs")
    if layout_archs and _layout_keys(model.config) != _layout_keys(ARCHS[layout_archs[0]]):
        # Mapped through our layout, another arch's flat indices would land on the wrong layers.
        raise WeightsError(
            f"{desc} is a {' or '.join(layout_archs)} state dict ({meta['source']} layout), "
            f"but this backbone is {model.arch}: build VGGBackbone({layout_archs[-1]!r}, ...) for this file"
        )

    own = model.state_dict()
    full = _full_keys(model)
    # channels of the input to fc6 = last block's width
    last_block = f"features.conv{len(model.config.blocks)}"
    fc6_in = next(
        (
            v.shape[0]
            for k, v in reversed(sd.items())
            if k.startswith(last_block) and k.endswith("weight") and v.dim() == 4
        ),
        0,
    )
    sd = reshape_head(sd, fc6_in or model.config.blocks[-1].channels)

    unexpected = unexpected + [k for k in sd if k not in own and k not in full]
    missing = [k for k in own if k not in sd and not k.endswith("num_batches_tracked")]
    if unexpected or missing:
        raise WeightsError(
            f"{desc} does not match VGGBackbone({model.arch})\n"
            f"  missing keys ({len(missing)}): {missing[:8]}{' ...' if len(missing) > 8 else ''}\n"
            f"  unexpected keys ({len(unexpected)}): {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}"
        )
    shapes = [
        f"{k}: file {tuple(sd[k].shape)} vs model {tuple(v.shape)}"
        for k, v in own.items()
        if k in sd and sd[k].shape != v.shape
    ]
    if shapes:
        raise WeightsError(
            f"{desc} has tensors of the wrong shape for VGGBackbone({model.arch}):\n  " + "\n  ".join(shapes[:8])
        )
    nonfinite = [k for k in own if k in sd and not all_finite(sd[k])]
    if nonfinite:
        hint = (
            " (torchvision's IMAGENET1K_FEATURES ships NaN classifier weights): request taps up to pool5 only"
            if all(k.startswith(("features.fc6.", "features.fc7.")) for k in nonfinite)
            else ""
        )
        raise WeightsError(f"{desc} has non-finite values in {nonfinite[:4]}{hint}")
    own_sd = {k: sd[k] for k in own if k in sd}
    model.load_state_dict(own_sd, strict=False)

    caffemodel = meta.get("source") == "caffemodel"
    if normalization is None and not caffemodel:
        return norm if norm is not None else resolve_normalization(None, model.in_channels)
    requested = norm if normalization is None else resolve_normalization(normalization, model.in_channels)
    if caffemodel and requested.name != "caffe":
        raise WeightsError(
            f"{desc}: a .caffemodel takes BGR 0-255 input minus the mean pixel (normalization 'caffe', implied); "
            f"got normalization {requested.name!r}: leave it unset, or give Caffe statistics (space: bgr255)"
        )
    if requested.name == "caffe" and meta["source"] != "native":
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


def save_backbone_weights(model: nn.Module, path: str | os.PathLike[str]) -> Path:
    """Write ``model``'s weights with ``format``/``arch``/``normalization`` metadata, atomically."""
    path = Path(path)
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    norm = model.normalization.to_dict()
    with atomic_path(path) as tmp:
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file

            meta = {
                "format": FORMAT,
                "format_version": str(FORMAT_VERSION),
                "arch": json.dumps(model.arch),
                "normalization": json.dumps(norm),
            }
            save_file(sd, str(tmp), metadata=meta)
        else:
            torch.save(
                {
                    "format": FORMAT,
                    "format_version": FORMAT_VERSION,
                    "arch": model.arch,
                    "normalization": norm,
                    "state_dict": sd,
                },
                tmp,
            )
    return path
