"""Checkpoint files: atomic writes, and pretrained weights that a checkpoint replaces.

* :class:`AtomicCheckpointIO`: checkpoints written to a temp file in the same folder and renamed
  (Lightning's own writer stages through ``/tmp`` and falls back to a copy across file systems);
* :data:`WEIGHTS_IN_CHECKPOINT` / :func:`backbone_weights`: a model rebuilt from a checkpoint is
  built as the pretrained model it was, without fetching the pretrained weights again;
* :func:`read_checkpoint` / :func:`load_task`: the one way a checkpoint is read (``--ckpt_path``,
  ``export --ckpt``, ``extract --ckpt``): safely (``weights_only``), with errors that name the
  file, what it holds (task, arch) and what was expected;
* :func:`nonfinite_tensors` / :func:`check_finite`: no checkpoint, metric or output is written
  from non-finite weights.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import pickle
import re
import sys
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from pytorch_lightning.plugins.io import TorchCheckpointIO

from vggbackbone.filekind import load_failure, sniff_file
from vggbackbone.utils import atomic_path

__all__ = [
    "TASK_KEY",
    "WEIGHTS_IN_CHECKPOINT",
    "AtomicCheckpointIO",
    "CheckpointError",
    "backbone_weights",
    "check_finite",
    "check_plain_hparams",
    "code_references",
    "describe_checkpoint",
    "load_task",
    "nonfinite_tensors",
    "parser_string_options",
    "plain_data",
    "read_checkpoint",
    "task_name",
]

#: checkpoint key naming the task class that wrote it (``tasks.reid.ReIDTask``)
TASK_KEY = "task_class"


#: was (tasks whose structure depends on it, e.g. a detector's frozen BatchNorm, keep that) but
#: load no weights, since the checkpoint's state dict replaces them.
WEIGHTS_IN_CHECKPOINT = "in_checkpoint"


def backbone_weights(weights: str | None) -> str | None:
    """The weights a task should load for its ``weights_backbone`` (none when a checkpoint brings them)."""
    return None if weights == WEIGHTS_IN_CHECKPOINT else weights


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write checkpoints to a temp file beside the target, then ``os.replace`` it into place.

    A crash mid-save leaves the previous checkpoint intact: ``--ckpt_path last`` always resumes. A
    full disk is an ``OSError`` (``errno.ENOSPC``) naming the checkpoint (:func:`atomic_path`), not
    torch's ``enforce fail at inline_container.cc``. Reading (the trainer's resume) goes through
    :func:`read_checkpoint`: ``weights_only``, plain hyper-parameters, errors saying what the file is.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        if "://" in str(path):  # remote file systems: leave it to Lightning's fsspec writer
            super().save_checkpoint(checkpoint, path)
            return
        with atomic_path(path) as tmp:  # a full disk: an OSError (ENOSPC) naming the path, old file kept
            torch.save(checkpoint, tmp)

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        """What the trainer resumes from (``fit --ckpt_path``): :func:`read_checkpoint`, whatever ``weights_only``."""
        if "://" in str(path):
            return super().load_checkpoint(path, map_location=map_location, weights_only=True)
        return read_checkpoint(path, map_location=map_location)


# ---------------------------------------------------------------------------- non-finite weights
def nonfinite_tensors(tensors: Mapping[str, Any]) -> list[str]:
    """Names of the floating-point tensors of ``tensors`` holding a NaN or an infinity."""
    return [
        name
        for name, t in tensors.items()
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all())
    ]


def check_finite(tensors: Mapping[str, Any], what: str) -> None:
    """Raise ``FloatingPointError`` naming the non-finite tensors of ``tensors`` (``what`` says whose)."""
    bad = nonfinite_tensors(tensors)
    if bad:
        shown = ", ".join(bad[:8]) + (f" and {len(bad) - 8} more" if len(bad) > 8 else "")
        raise FloatingPointError(
            f"{what}: {len(bad)} of {len(tensors)} tensors hold NaN/inf ({shown}); refusing to use or write them "
            "(the training diverged: lower model.optim.lr, raise warm-up, or set trainer.gradient_clip_val)"
        )


# ---------------------------------------------------------------------------- reading
class CheckpointError(ValueError):
    """A checkpoint file that cannot be used here; the message names the file and the reason."""


#: Modules whose dataclasses a checkpoint's hyper-parameters may hold; each registers its own with
#: ``torch.serialization.add_safe_globals`` when imported (next to the dataclass).
SAFE_GLOBAL_MODULES = ("tasks.optim", "tasks.data.shapes", "tasks.data.market")


_WEIGHTS_HINT = "a weights file goes to model.weights_backbone (model.weights for classify) instead"


def read_checkpoint(path: str | Path, *, map_location: Any = "cpu") -> dict[str, Any]:
    """Read a checkpoint file safely: ``torch.load(weights_only=True)``, errors naming the file.

    A pickle that needs anything but tensors and plain data (code to run, e.g. a malicious
    ``__reduce__``) is refused, never run. A file that is not a checkpoint is a
    :class:`CheckpointError` saying what it is (:func:`vggbackbone.filekind.sniff_file`: empty, a
    Git LFS pointer, an HTML page, text, truncated, a plain weights file...; ``FileNotFoundError``
    when missing), never with torch's advice to load it unsafely. Hyper-parameters that would make
    the argument parser or Lightning import code (:func:`check_plain_hparams`) are refused naming
    the key. The project's own config dataclasses (:data:`SAFE_GLOBAL_MODULES`) are allowed
    whatever was imported before.
    """
    for module in SAFE_GLOBAL_MODULES:  # imported here, not at the top: they import nothing of ours back
        importlib.import_module(module)
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: a folder, not a checkpoint file")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    kind = sniff_file(path)
    if not kind.torch_readable:
        hint = kind.hint or (_WEIGHTS_HINT if kind.kind == "safetensors" else "")
        raise CheckpointError(f"{path}: {kind.what}, not a checkpoint{f' ({hint})' if hint else ''}")
    size = path.stat().st_size
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, EOFError, RuntimeError, zipfile.BadZipFile, OSError, ValueError,
            AttributeError, KeyError, IndexError, TypeError) as e:  # fmt: skip
        reason, phrase = load_failure(kind, e)
        if reason == "code":
            raise CheckpointError(
                f"{path}: refused: it holds Python objects other than tensors and plain data, which would run "
                f"code when read ({phrase}). Only checkpoints written by `fit` are read, and never unsafely."
            ) from None
        raise CheckpointError(f"{path}: not a readable checkpoint ({size} bytes: {phrase})") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), Mapping):
        raise CheckpointError(f"{path}: not a Lightning checkpoint of `fit`: {_holds(ckpt)}")
    check_plain_hparams(ckpt, path)
    return ckpt


def _holds(obj: Any) -> str:
    """What a loaded file that is not a Lightning checkpoint holds, for :func:`read_checkpoint`'s message."""
    if isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        first = next(iter(obj))
        return (
            f"a plain weights file (a state dict of {len(obj)} tensors, e.g. {first}, without the Lightning "
            f"keys state_dict/hyper_parameters); {_WEIGHTS_HINT}"
        )
    kind = f"a dict with keys {sorted(map(str, obj))[:6]}" if isinstance(obj, Mapping) else type(obj).__name__
    return f"no state_dict, it holds {kind}; a plain weights file goes to model.weights_backbone instead"


# ---------------------------------------------------------------------------- plain hyper-parameters
#: mapping keys through which jsonargparse (``class_path``, ``init_args``, ``dict_kwargs``, sub-config
#: ``__path__``...) or Lightning's ``load_from_checkpoint`` (``_instantiator``, ``_class_path``) would
#: import a module: never restored from a checkpoint
CODE_KEYS = frozenset(
    {"class_path", "init_args", "dict_kwargs", "_class_path", "_instantiator", "__path__", "__orig__",
     "__default_config__"}
)  # fmt: skip
#: Lightning's own ``_instantiator`` value (its LightningCLI writes it): inert here, the CLI drops it and
#: :func:`load_task` never lets Lightning use it
LIGHTNING_INSTANTIATOR = "pytorch_lightning.cli.instantiate_module"
#: the checkpoint entries whose values an argument parser or ``load_from_checkpoint`` reads
HPARAMS_KEYS = ("hyper_parameters", "datamodule_hyper_parameters")


def _short(value: Any, limit: int = 240) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _as_yaml(text: str) -> Any:
    """What jsonargparse reads in a string value: it parses strings as YAML (``"{class_path: x}"`` is a mapping)."""
    if len(text) > 1_000_000 or not any(c in text for c in ":{[-"):
        return None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return None


def code_references(value: Any, key: str, string_options: Mapping[str, str] | None = None) -> Iterator[tuple[str, str]]:
    """``(key path, why)`` for every part of ``value`` that an argument parser would resolve to code.

    A mapping key of :data:`CODE_KEYS` at any depth (in dicts, lists, dataclasses, and in strings,
    which jsonargparse parses as YAML); with ``string_options`` (option path relative to ``key``
    -> how the parser reads a string there, e.g. ``{"optim": "as a config file path"}``), any
    string under those options.
    """
    if isinstance(value, Mapping):
        for k, v in value.items():
            sub = f"{key}.{k}"
            if str(k) in CODE_KEYS and not (k == "_instantiator" and v == LIGHTNING_INSTANTIATOR and "." not in key):
                yield sub, f"{_short(v)} names code to import"
            yield from code_references(v, sub, string_options)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            yield from code_references(getattr(value, f.name), f"{key}.{f.name}", string_options)
    elif isinstance(value, (list, tuple, set, frozenset)):
        for i, v in enumerate(value):
            yield from code_references(v, f"{key}[{i}]", string_options)
    elif isinstance(value, str):
        option = re.sub(r"\[\d+\]", "", key).split(".", 1)[-1]
        how = (string_options or {}).get(option)
        if how:
            yield key, f"the string {_short(value)} would be read {how}"
            return
        parsed = _as_yaml(value)
        if isinstance(parsed, (Mapping, list)):
            for sub, why in code_references(parsed, key):
                yield sub, f"{why} (in the YAML string {_short(value)})"


def parser_string_options(parser: Any, prefix: str) -> dict[str, str]:
    """Options under ``prefix`` whose string values ``parser`` (jsonargparse) resolves to more than a string.

    ``{option: how}``: a nested group or an option typed by a class, a callable or ``type`` takes a
    string as an import path (``"some.module.X"``) or a config file to read; such a string from a
    checkpoint is refused. Read from the parser's actions, as jsonargparse decides (its
    ``ActionTypeHint`` predicates; ``_enable_path`` is the flag of options that load a string as a file).
    """
    from jsonargparse._typehints import ActionTypeHint

    out: dict[str, str] = {}
    for action in getattr(parser, "_actions", ()):
        dest = str(getattr(action, "dest", ""))
        if not dest.startswith(f"{prefix}."):
            continue
        option = dest[len(prefix) + 1 :]
        typehint = getattr(action, "_typehint", None)
        if isinstance(action, ActionTypeHint) and typehint is not None:
            if (
                ActionTypeHint.is_subclass_typehint(typehint, all_subtypes=False, also_lists=True)
                or ActionTypeHint.is_return_subclass_typehint(typehint)
                or ActionTypeHint.is_callable_typehint(typehint)
                or typehint is type
                or getattr(typehint, "__origin__", None) is type
            ):
                out[option] = "as an import path or a config file by the argument parser"
            elif getattr(action, "_enable_path", False):
                out[option] = "as a config file path by the argument parser"
        elif type(action).__name__ == "_ActionConfigLoad":  # a nested group (a dataclass such as optim)
            out[option] = "as a config file path by the argument parser"
    return out


def plain_data(value: Any) -> Any:
    """``value`` with dataclasses (``OptimConfig``...) as dicts and tuples as lists: what a YAML file would give.

    A checkpoint stores the config dataclasses themselves; the argument parser takes a group such as
    ``optim`` as a mapping (an instance there is kept as is and fails at instantiation).
    """
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain_data(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {k: plain_data(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_data(v) for v in value]
    return value


def check_plain_hparams(
    ckpt: Mapping[str, Any], path: str | Path, string_options: Mapping[str, str] | None = None
) -> None:
    """Refuse a checkpoint whose hyper-parameters are more than plain data (a :class:`CheckpointError`
    naming the file and each key path): what :func:`code_references` finds in :data:`HPARAMS_KEYS`.

    Checkpoints come from strangers: a ``{"class_path": "some.module.X"}`` under any option would
    make jsonargparse import ``some.module`` (its top-level code runs) before the option is refused.
    """
    found = [
        ref
        for key in HPARAMS_KEYS
        for ref in code_references(ckpt.get(key), key, string_options if key == "hyper_parameters" else None)
    ]
    if found:
        shown = "; ".join(f"{where}: {why}" for where, why in found[:5])
        more = f" (and {len(found) - 5} more)" if len(found) > 5 else ""
        raise CheckpointError(
            f"{path}: refused: {shown}{more}. Values restored from a checkpoint are plain data: nothing a "
            "checkpoint names is imported or run."
        )


def describe_checkpoint(ckpt: Mapping[str, Any]) -> str:
    """``task tasks.reid.ReIDTask, arch vgg16``: what a checkpoint holds, for error messages."""
    hp = ckpt.get("hyper_parameters") or {}
    parts = [f"task {ckpt.get(TASK_KEY) or 'unrecorded'}"]
    for key in ("family", "head", "arch"):
        if key in hp:
            parts.append(f"{key} {hp[key]}")
    return ", ".join(parts)


def task_name(task_class: type) -> str:
    """``tasks.reid.ReIDTask``: the importable name of a task class, also under ``python -m tasks.reid``."""
    module = task_class.__module__
    if module == "__main__":  # python -m tasks.<task>: the module runs as __main__
        spec = getattr(sys.modules.get("__main__"), "__spec__", None)
        module = spec.name if spec is not None else module
    return f"{module}.{task_class.__qualname__}"


def check_task(ckpt: Mapping[str, Any], task_class: type, path: str | Path) -> None:
    """Refuse a checkpoint written by another task than ``task_class`` (naming both).

    Checkpoints record their task class (:data:`TASK_KEY`); for one that does not, the stored
    hyper-parameters must all be arguments of ``task_class`` (unless it takes ``**kwargs``).
    """
    expected = task_name(task_class)
    stored = ckpt.get(TASK_KEY)
    if stored is not None:
        # by class name (the module differs between `python -m tasks.reid` and an import); a subclass may load it
        if str(stored).rsplit(".", 1)[-1] not in {c.__qualname__.rsplit(".", 1)[-1] for c in task_class.__mro__}:
            raise CheckpointError(f"{path}: a checkpoint of {describe_checkpoint(ckpt)}, expected one of {expected}")
        return
    hp = ckpt.get("hyper_parameters") or {}
    params = inspect.signature(task_class).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    unknown = sorted(k for k in hp if k not in params and not k.startswith("_"))
    if unknown:
        raise CheckpointError(
            f"{path}: its hyper-parameters {unknown} are not options of {expected} ({describe_checkpoint(ckpt)}): "
            "a checkpoint of another task?"
        )


def load_task(task_class: type, path: str | Path, **kwargs: Any) -> Any:
    """``task_class.load_from_checkpoint(path)``, after :func:`read_checkpoint` and :func:`check_task`.

    A model that cannot take the checkpoint's weights (another arch, another number of classes)
    is an error naming the file, what it holds and the first mismatching tensors.
    """
    ckpt = read_checkpoint(path)  # refuses hyper-parameters naming code (class_path, _class_path, _instantiator...)
    check_task(ckpt, task_class, path)
    # _instantiator=None: the task is built by its own __init__ from the plain hyper-parameters, never
    # through the instantiator a checkpoint may name (Lightning's runs them through jsonargparse)
    kwargs = {"map_location": "cpu", "weights_only": True} | kwargs | {"_instantiator": None}
    hparams = ckpt.get("hyper_parameters") or {}
    for old in getattr(task_class, "moved_options", {}):  # an older checkpoint's predict_dir...: a run setting
        if old in hparams and old not in kwargs:  # of its day (writer.* now), not part of the model
            kwargs[old] = None
    try:
        return task_class.load_from_checkpoint(path, **kwargs)
    except (RuntimeError, TypeError, KeyError, ValueError) as e:
        raise CheckpointError(
            f"{path}: cannot build {task_class.__qualname__} from this checkpoint ({describe_checkpoint(ckpt)}): "
            f"{type(e).__name__}: {str(e).splitlines()[0][:500]}"
        ) from e


def state_dict_mismatch(expected: Mapping[str, Any], stored: Mapping[str, Any]) -> list[str]:
    """Tensors of ``stored`` whose shape differs from ``expected``'s, missing or unexpected, as readable lines."""
    lines = []
    for k, v in stored.items():
        if k in expected and hasattr(v, "shape") and tuple(v.shape) != tuple(expected[k].shape):
            lines.append(f"{k}: {tuple(v.shape)} in the checkpoint, {tuple(expected[k].shape)} in the model")
    missing = [k for k in expected if k not in stored]
    unexpected = [k for k in stored if k not in expected]
    if missing:
        lines.append(f"{len(missing)} tensor(s) of the model not in the checkpoint, e.g. {missing[0]}")
    if unexpected:
        lines.append(f"{len(unexpected)} tensor(s) of the checkpoint not in the model, e.g. {unexpected[0]}")
    return lines
