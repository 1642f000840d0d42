"""File names that are not valid UTF-8, in every output that records a path.

On Linux a file name is bytes; Python reads a name that is not valid UTF-8 (``caf\\xe9.jpg``,
written by a Latin-1 system) as a ``str`` holding a lone surrogate per bad byte
(``"caf\\udce9.jpg"``, the ``surrogateescape`` error handler, PEP 383). Such a string opens the
file, but it cannot be encoded as UTF-8: writing it to a UTF-8 text file, a JSON with
``ensure_ascii=False``, ``print`` or a hash raises ``UnicodeEncodeError``. The rule here, one for
every output:

* text outputs (CSV, JSON, messages) get :func:`display_path`: the name with each byte that is
  not UTF-8 written as ``\\xNN`` (``caf\\xe9.jpg``), always valid UTF-8 and readable; for such
  names the exact bytes go beside it in hex (:func:`path_hex`: ``path_hex`` column of the
  classification CSV, ``file_name_hex`` of detection's ``images.json``), the way back to the
  file: ``os.fsdecode(bytes.fromhex(h))``. Names that are valid UTF-8 are written as they are
  and their hex field is empty (CSV) or absent (JSON);
* NumPy outputs (ReID ``extract``'s ``.npz``) keep Python's own string: NumPy's unicode arrays
  hold lone surrogates, so ``paths[i]`` opens the file and ``os.fsencode(paths[i])`` gives the
  exact bytes (lossless);
* output file names made from an input name (detection's ``images/<name>.jpg``, segmentation's
  ``<name>.png``) are written with the same bytes as the input's name (Python encodes the
  surrogates back to the original bytes).
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["display_path", "fs_bytes", "is_utf8", "name_fields", "path_hex"]


def fs_bytes(path: str | Path | bytes) -> bytes:
    """The name as the file system has it (``os.fsencode``)."""
    return os.fsencode(path)


def is_utf8(path: str | Path | bytes) -> bool:
    """Whether the name's bytes are valid UTF-8 (then :func:`display_path` is the name itself)."""
    try:
        fs_bytes(path).decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def display_path(path: str | Path | bytes) -> str:
    """The name as valid UTF-8 text: bytes that are not UTF-8 written ``\\xNN`` (``caf\\xe9.jpg``).

    Total: never raises for any name; the identity for names that are valid UTF-8.
    """
    if isinstance(path, str) and path.isascii():
        return path
    return fs_bytes(path).decode("utf-8", "backslashreplace")


def path_hex(path: str | Path | bytes) -> str:
    """The name's exact bytes in hex where they are not valid UTF-8; ``""`` otherwise.

    Back to the file: ``os.fsdecode(bytes.fromhex(h))``.
    """
    return "" if is_utf8(path) else fs_bytes(path).hex()


def name_fields(path: str | Path | bytes, key: str = "file_name") -> dict[str, str]:
    """``{key: display_path(path)}``, plus ``{key + "_hex": <bytes in hex>}`` where the name is not UTF-8 (JSON)."""
    out = {key: display_path(path)}
    if not is_utf8(path):
        out[f"{key}_hex"] = fs_bytes(path).hex()
    return out
