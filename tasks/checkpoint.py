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

import importlib
import inspect
import pickle
import re
import sys
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from pytorch_lightning.plugins.io import TorchCheckpointIO

from vggbackbone.utils import atomic_path

__all__ = [
    "TASK_KEY",
    "WEIGHTS_IN_CHECKPOINT",
    "AtomicCheckpointIO",
    "CheckpointError",
    "backbone_weights",
    "check_finite",
    "describe_checkpoint",
    "load_task",
    "nonfinite_tensors",
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

    A crash mid-save leaves the previous checkpoint intact: ``--ckpt_path last`` always resumes.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        if "://" in str(path):  # remote file systems: leave it to Lightning's fsspec writer
            super().save_checkpoint(checkpoint, path)
            return
        with atomic_path(path) as tmp:
            torch.save(checkpoint, tmp)


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


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint file safely: ``torch.load(weights_only=True)``, errors naming the file.

    A pickle that needs anything but tensors and plain data (code to run, e.g. a malicious
    ``__reduce__``) is refused, never run; a missing, empty, truncated or non-checkpoint file
    is a :class:`CheckpointError` (``FileNotFoundError`` when missing) saying so. The project's
    own config dataclasses (:data:`SAFE_GLOBAL_MODULES`) are allowed whatever was imported before.
    """
    for module in SAFE_GLOBAL_MODULES:  # imported here, not at the top: they import nothing of ours back
        importlib.import_module(module)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{path}: empty file (0 bytes), not a checkpoint (an interrupted copy?)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))  # the callable the pickle asks for
        reason = f"it asks for {found.group(1)}" if found else str(e).splitlines()[0][:200]
        raise CheckpointError(
            f"{path}: refused: it holds Python objects other than tensors and plain data, which would run "
            f"code when read ({reason}). Only checkpoints written by `fit` are read, and never unsafely."
        ) from None
    except (EOFError, RuntimeError, zipfile.BadZipFile, OSError, ValueError, AttributeError) as e:
        raise CheckpointError(
            f"{path}: not a readable checkpoint ({size} bytes: truncated, corrupt or another kind of file; "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no detail'})"
        ) from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), Mapping):
        kind = f"a dict with keys {sorted(map(str, ckpt))[:6]}" if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(
            f"{path}: not a Lightning checkpoint of `fit` (no state_dict; it holds {kind}); "
            "a plain weights file goes to model.weights_backbone instead"
        )
    return ckpt


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
    ckpt = read_checkpoint(path)
    check_task(ckpt, task_class, path)
    kwargs = {"map_location": "cpu", "weights_only": True} | kwargs
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
