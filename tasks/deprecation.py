"""Old names that keep working: renamed options and renamed classes, each warned about once.

* :func:`renamed`: an option given under its old name (``data.format`` -> ``data.layout``);
* :func:`old_names`: a module ``__getattr__`` that serves renamed classes
  (``tasks.segment.SegmentationModel`` -> ``SegmentationTask``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["RenamedOptionWarning", "old_names", "renamed", "warn_once"]

_warned: set[tuple[str, str]] = set()


class RenamedOptionWarning(UserWarning):
    """An option or class was used under its old name (it still works; the message names the new one)."""


def renamed(owner: str, old: str, new: str, old_value: Any, new_value: Any, default: Any, convert: Any = None) -> Any:
    """The value of option ``new``, also accepting it under its old name ``old`` (warned once per process).

    ``old_value`` is ``None`` when the old name was not used. Giving both (``new_value`` not at its
    ``default``) is an error. ``convert`` maps an old-style value to the new type (e.g. a bool flip
    to a probability).
    """
    if old_value is None:
        return new_value
    if new_value != default:
        raise ValueError(f"{owner}: {old} is the old name of {new}; give only {new}")
    if (owner, old) not in _warned:
        _warned.add((owner, old))
        warnings.warn(f"{owner}: option {old!r} is renamed {new!r}; write {new} instead", RenamedOptionWarning, 3)
    return convert(old_value) if convert is not None else old_value


def warn_once(owner: str, key: str, message: str) -> None:
    """A :class:`RenamedOptionWarning` with ``message``, once per process for ``(owner, key)``."""
    if (owner, key) not in _warned:
        _warned.add((owner, key))
        warnings.warn(message, RenamedOptionWarning, stacklevel=3)


def old_names(
    module: str, names: Mapping[str, Callable[[], Any]], new_names: Mapping[str, str] | None = None
) -> Callable[[str], Any]:
    """A module ``__getattr__``: ``names[old]()`` returns what the old name now is (warned once).

    ``new_names``: how the warning names the new home of an old name that is not a class or a
    function (a constant), e.g. ``{"VOC_CLASSES": "tasks.data.voc.VOC_SEGMENTATION_CLASSES"}``.
    """

    def __getattr__(name: str) -> Any:
        if name not in names:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        obj = names[name]()
        if (module, name) not in _warned:
            _warned.add((module, name))
            new = (new_names or {}).get(name) or getattr(obj, "__qualname__", repr(obj))
            warnings.warn(f"{module}.{name} is renamed {new}; import that instead", RenamedOptionWarning, 2)
        return obj

    return __getattr__
