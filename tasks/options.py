"""Checks of data-module options, each error naming the option, the value and what is allowed.

A bad value otherwise surfaces as an error of PyTorch or torchvision that does not say which
option is at fault (``batch_size should be a positive integer value``, ``ZeroDivisionError`` in
the PK sampler, ``p should be a floating point value in the interval [0.0, 1.0]``), or not at
all (``eval_batch_size: 0`` read as "unset"). Every data module checks its options when it is
built (:class:`tasks.module.TaskDataModule` the loader options, each task's module its own),
and the folders and files the config names when it reads them (after ``prepare_data``, which
may generate them): :func:`require_folder`, :func:`require_file`, :func:`require_exists`.
Option names are written as on the command line (``data.p``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from numbers import Integral, Real
from pathlib import Path
from typing import Any

from tasks.pathnames import display_path

__all__ = [
    "check_int",
    "check_number",
    "check_probability",
    "check_range",
    "check_size",
    "require_exists",
    "require_file",
    "require_folder",
]


def _is_int(value: Any) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(float(value))


def check_int(option: str, value: Any, minimum: int = 1, *, optional: bool = False) -> int | None:
    """``value`` as an ``int`` at least ``minimum`` (``None`` allowed with ``optional``), else a ``ValueError``."""
    if value is None and optional:
        return None
    if not _is_int(value) or value < minimum:
        unset = " or null" if optional else ""
        raise ValueError(f"{option} must be a whole number >= {minimum}{unset}, got {value!r}")
    return int(value)


def check_number(option: str, value: Any, minimum: float = 0.0, maximum: float = math.inf) -> float:
    """``value`` as a finite ``float`` in ``[minimum, maximum]``, else a ``ValueError``."""
    if not _is_real(value) or not minimum <= float(value) <= maximum:
        upper = f" and <= {maximum:g}" if math.isfinite(maximum) else ""
        raise ValueError(f"{option} must be a number >= {minimum:g}{upper}, got {value!r}")
    return float(value)


def check_probability(option: str, value: Any) -> float:
    """``value`` as a probability in ``[0, 1]``, else a ``ValueError``."""
    if not _is_real(value) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{option} is a probability: it must be a number in [0, 1], got {value!r}")
    return float(value)


def check_size(option: str, value: Any, length: int | None = None, *, optional: bool = False) -> Any:
    """An image size in pixels: a whole number >= 1, or (with ``length``) that many of them.

    Returns the value (a ``tuple`` for a sequence); ``None`` allowed with ``optional``.
    """
    if value is None and optional:
        return None
    if length is None:
        if not _is_int(value) or value < 1:
            raise ValueError(f"{option} must be a size in pixels (a whole number >= 1), got {value!r}")
        return int(value)
    if (
        not isinstance(value, Sequence)
        or isinstance(value, str)
        or len(value) != length
        or not all(_is_int(v) and v >= 1 for v in value)
    ):
        raise ValueError(f"{option} must be {length} sizes in pixels (whole numbers >= 1), got {value!r}")
    return tuple(int(v) for v in value)


def check_range(
    option: str, value: Any, minimum: float = 0.0, maximum: float = math.inf, *, positive: bool = False
) -> tuple[float, float]:
    """A ``[low, high]`` pair with ``minimum <= low <= high <= maximum`` (``positive``: ``low > minimum``)."""
    ok = (
        isinstance(value, Sequence)
        and not isinstance(value, str)
        and len(value) == 2
        and all(_is_real(v) for v in value)
    )
    if ok:
        low, high = float(value[0]), float(value[1])
        ok = (low > minimum if positive else low >= minimum) and low <= high <= maximum
    if not ok:
        bound = f"> {minimum:g}" if positive else f">= {minimum:g}"
        upper = f" <= {maximum:g}" if math.isfinite(maximum) else ""
        raise ValueError(f"{option} must be [low, high] with {bound}, low <= high{upper}, got {value!r}")
    return float(value[0]), float(value[1])


def _contents(folder: Path, limit: int = 8) -> str:
    try:
        names = sorted(display_path(n) for n in os.listdir(folder))
    except OSError:
        return ""
    if not names:
        return " (it is empty)"
    shown = ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")
    return f" (it holds: {shown})"


def require_folder(option: str, path: str | Path, *, within: tuple[str, str | Path] | None = None) -> Path:
    """``path`` must be an existing folder, else a ``FileNotFoundError`` (``NotADirectoryError``)
    naming ``option`` and the path.

    ``within``: ``(option, folder)`` that ``path`` was taken from (``("data.root", root)`` for a
    split folder): that folder is checked first, and the message lists what it holds.
    """
    path = Path(path)
    if within is not None:
        require_folder(within[0], within[1])
    if path.is_dir():
        return path
    where = f" in {within[0]} {display_path(within[1])}{_contents(Path(within[1]))}" if within is not None else ""
    if path.exists():
        raise NotADirectoryError(f"{option}: {display_path(path)} is not a folder{where}")
    raise FileNotFoundError(f"{option}: folder {display_path(path)} not found{where}")


def require_file(option: str, path: str | Path) -> Path:
    """``path`` must be an existing file, else a ``FileNotFoundError`` naming ``option`` and the path."""
    path = Path(path)
    if path.is_file():
        return path
    what = "is not a file" if path.exists() else "not found"
    raise FileNotFoundError(f"{option}: {display_path(path)} {what}")


def require_exists(option: str, path: str | Path, what: str = "file or folder") -> Path:
    """``path`` must exist (a file or a folder), else a ``FileNotFoundError`` naming ``option`` and the path."""
    path = Path(path)
    if path.exists():
        return path
    raise FileNotFoundError(f"{option}: {display_path(path)} not found (expected a {what})")
