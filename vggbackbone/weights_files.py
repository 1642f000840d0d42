"""Weights files read and written safely: the formats, not what the keys mean.

* :func:`load_state_dict_file`: a ``.pth``/``.pt``/``.bin`` (``torch.load(weights_only=True)``),
  ``.safetensors`` or ``.caffemodel`` (protobuf, :mod:`vggbackbone.caffe`) file -> tensors and
  metadata; a file that pickles code is refused, never run;
* :func:`resolve_torchvision_weights` / :func:`load_torchvision_state_dict`: torchvision's
  weights names, through torch hub's download cache, read ``weights_only`` too;
* :func:`is_weights_file`: a path, or a torchvision weights name;
* :func:`save_backbone_weights`: this package's own files (``format``/``arch``/``normalization``
  metadata), written atomically.

The key maps onto :class:`~vggbackbone.VGGBackbone`'s names are in :mod:`vggbackbone.weights`,
which re-exports these names.
"""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .config import VGGConfig
from .filekind import error_text, load_failure, sniff_file
from .normalization import CAFFE
from .utils import atomic_path

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "WeightsError",
    "is_weights_file",
    "load_state_dict_file",
    "load_torchvision_state_dict",
    "resolve_torchvision_weights",
    "save_backbone_weights",
    "write_state_dict_file",
]

FORMAT = "vggbackbone"
FORMAT_VERSION = 1


class WeightsError(ValueError):
    """A weights file that cannot be used for the requested backbone."""


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
            meta = {k: json.loads(v) if k in _JSON_META else v for k, v in raw_meta.items()}
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


#: metadata keys a safetensors file holds as JSON (the others are plain strings)
_JSON_META = ("normalization", "arch")


def write_state_dict_file(
    path: str | os.PathLike[str], state_dict: Mapping[str, Tensor], meta: Mapping[str, Any]
) -> Path:
    """Write ``state_dict`` with this package's ``meta`` (``format`` first), atomically: as
    safetensors (``.safetensors``: metadata strings, JSON for ``normalization``/``arch``) or with
    ``torch.save`` (``{**meta, "state_dict": ...}``). :func:`load_state_dict_file` reads both."""
    path = Path(path)
    sd = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    with atomic_path(path) as tmp:
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(sd, str(tmp), metadata={k: json.dumps(v) if k in _JSON_META else str(v) for k, v in meta.items()})
        else:
            torch.save({**meta, "state_dict": sd}, tmp)
    return path


def save_backbone_weights(model: nn.Module, path: str | os.PathLike[str]) -> Path:
    """Write ``model``'s weights with ``format``/``arch``/``normalization`` metadata, atomically."""
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "arch": model.arch,
        "normalization": model.normalization.to_dict(),
    }
    return write_state_dict_file(path, model.state_dict(), meta)
