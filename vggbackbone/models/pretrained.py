"""A trained task model as a folder, rebuilt without Lightning: :func:`save_pretrained` /
:func:`from_pretrained` (Hugging Face's layout: ``config.json`` + ``model.safetensors``).

>>> from vggbackbone.models import create_model, save_pretrained, from_pretrained
>>> model = create_model("unet", arch="vgg11", num_classes=3, width_mult=0.125)
>>> save_pretrained(model, "unet-demo")                       # doctest: +SKIP
>>> same = from_pretrained("unet-demo")                       # doctest: +SKIP

``config.json`` names the builder by its registry name (:func:`~vggbackbone.models.create_model`)
and holds its options as plain JSON, never code: ``from_pretrained`` looks the name up in the
registry (an unknown name is refused, listing the registered ones) and calls the builder with
those options and no weights; the weights come from ``model.safetensors`` (strict load).
The input normalisation the weights expect is recorded as an option (``normalization``), and a
pretrained detector's structure as ``pretrained: true``, so the folder rebuilds the same model.

Written plainly rather than with ``huggingface_hub``'s ``PyTorchModelHubMixin``: the mixin is a
base class whose ``__init__`` arguments become the config, which torchvision's detectors (built
by functions, not subclasses of ours) cannot take; ``safetensors``' ``save_model``/``load_model``
(a core dependency) handle tied tensors.
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model
from torch import Tensor, nn

from ..normalization import InputNormalization
from ..utils import atomic_path
from ..vgg import VGGBackbone
from .registry import BUILD_CONFIG_ATTR, model_entry, record_build

__all__ = [
    "BUILD_CONFIG_ATTR",
    "CONFIG_FILE",
    "FORMAT",
    "WEIGHTS_FILE",
    "export_pretrained",
    "from_pretrained",
    "read_pretrained_config",
    "save_pretrained",
]

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = "vggbackbone-pretrained"
#: Options that load weights: never in a folder's config (its weights are the safetensors file).
_WEIGHT_OPTIONS = ("weights", "weights_backbone")


def _normalization(model: nn.Module) -> InputNormalization | None:
    norm = getattr(model, "normalization", None)
    if isinstance(norm, InputNormalization):
        return norm
    backbones = [m for m in model.modules() if isinstance(m, VGGBackbone)]
    return backbones[0].normalization if backbones else None


def _plain(value: Any, where: str) -> Any:
    """``value`` as JSON data (tuples as lists), or a ``ValueError`` naming the option."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v, where) for v in value]
    if isinstance(value, Mapping) and all(isinstance(k, str) for k in value):
        return {k: _plain(v, f"{where}.{k}") for k, v in value.items()}
    raise ValueError(f"option {where} = {value!r} cannot be written as JSON: build the model with plain options")


def _config(model: nn.Module, name: str, options: Mapping[str, Any]) -> dict[str, Any]:
    entry = model_entry(name)  # an unknown name is an error listing the registered ones
    params = inspect.signature(entry.builder).parameters
    opts = dict(options)
    weights = [opts.get(k) for k in _WEIGHT_OPTIONS]
    if "pretrained" in params and opts.get("pretrained") is None:
        opts["pretrained"] = any(w is not None for w in weights)  # the structure of a pretrained model
    for key in _WEIGHT_OPTIONS:
        opts.pop(key, None)
    norm = _normalization(model)
    if norm is not None and "normalization" in params:
        opts["normalization"] = norm.to_dict()
    tuples = sorted(k for k, v in opts.items() if isinstance(v, tuple))
    return {
        "format": FORMAT,
        "version": 1,
        "model": name,
        "task": entry.task,
        "options": {k: _plain(v, k) for k, v in opts.items()},
        "tuple_options": tuples,
    }


def save_pretrained(
    model: nn.Module,
    directory: str | os.PathLike[str],
    *,
    name: str | None = None,
    options: Mapping[str, Any] | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``model`` to ``directory`` as ``config.json`` + ``model.safetensors``; returns the folder.

    ``name``/``options``: the registry name and builder options; default: those
    :func:`~vggbackbone.models.create_model` recorded on the model (a model built by calling a
    builder directly needs them given). ``metadata``: plain JSON kept under ``metadata`` (the
    task CLIs' ``export`` puts the class names there). A ``config.json`` in ``directory`` that is
    not such a folder's is never overwritten. Files are written atomically, the config last.
    """
    recorded = getattr(model, BUILD_CONFIG_ATTR, None)
    if name is None or options is None:
        if recorded is None:
            raise ValueError(
                f"{type(model).__name__} was not built by vggbackbone.models.create_model: "
                "pass name= (its registry name) and options= (the builder's arguments)"
            )
        name = recorded["name"] if name is None else name
        options = recorded["options"] if options is None else options
    config = _config(model, name, options)
    if metadata:
        config["metadata"] = _plain(dict(metadata), "metadata")
    folder = Path(directory)
    existing = folder / CONFIG_FILE
    if existing.exists() and _read_json(existing).get("format") != FORMAT:
        raise FileExistsError(f"{existing} exists and is not a {FORMAT} config: not overwriting it")
    if (folder / WEIGHTS_FILE).exists() and not existing.exists():
        raise FileExistsError(f"{folder / WEIGHTS_FILE} exists without a {CONFIG_FILE}: not overwriting it")
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / WEIGHTS_FILE) as tmp:
        save_model(model, str(tmp), metadata={"format": "pt"}, force_contiguous=True)
    with atomic_path(existing) as tmp:
        tmp.write_text(json.dumps(config, indent=2) + "\n")
    return folder


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a JSON file ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def read_pretrained_config(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The checked ``config.json`` of a folder written by :func:`save_pretrained`."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: not a folder written by save_pretrained")
    config = _read_json(path)
    if config.get("format") != FORMAT or config.get("version") != 1:
        raise ValueError(
            f"{path}: not a {FORMAT} config (format {config.get('format')!r}, version {config.get('version')!r})"
        )
    if not isinstance(config.get("model"), str) or not isinstance(config.get("options"), dict):
        raise ValueError(f"{path}: 'model' must be a registry name and 'options' an object")
    loaded = [k for k in _WEIGHT_OPTIONS if config["options"].get(k) is not None]
    if loaded:
        raise ValueError(f"{path}: option {loaded[0]!r} would load weights; the folder's weights are {WEIGHTS_FILE}")
    return config


def from_pretrained(directory: str | os.PathLike[str], *, device: str = "cpu") -> nn.Module:
    """The model of a folder written by :func:`save_pretrained`: built by its registered builder
    (looked up by name; an unknown name is a ``ValueError``) and loaded strictly from
    ``model.safetensors``, in eval mode on ``device``."""
    folder = Path(directory)
    config = read_pretrained_config(folder)
    entry = model_entry(config["model"])
    options = dict(config["options"])
    for key in config.get("tuple_options", []):
        if isinstance(options.get(key), list):
            options[key] = tuple(tuple(v) if isinstance(v, list) else v for v in options[key])
    model = record_build(entry.builder(**options), entry.name, options)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} not found")
    load_model(model, str(weights), strict=True, device=device)
    return model.to(device).eval()


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor):
        return isinstance(b, Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, Mapping):
        return isinstance(b, Mapping) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def export_pretrained(
    model: nn.Module,
    directory: str | os.PathLike[str],
    example_input: Any,
    *,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """:func:`save_pretrained`, then :func:`from_pretrained` of the folder must give the same outputs
    as ``model`` on ``example_input`` (a detector's: a list of ``(3, H, W)`` images), else a
    ``ValueError`` naming the folder. What ``python -m tasks.<task> export --format pretrained`` runs."""
    folder = save_pretrained(model, directory, metadata=metadata)
    device = next(iter(model.parameters())).device
    rebuilt = from_pretrained(folder, device=str(device))
    with torch.no_grad():
        same = _same(model.eval()(example_input), rebuilt(example_input))
    if not same:
        raise ValueError(f"{folder}: the model rebuilt from it computes something else than the exported one")
    return folder
