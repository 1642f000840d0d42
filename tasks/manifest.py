"""The manifest of a folder's files: what the project wrote there, so it removes only that.

``<folder>/_MANIFEST.json`` (:data:`MANIFEST`; JSON: ``format``, ``by``, ``complete``, ``files``
``{relative path: {size, sha256}}``, ``dirs`` it created) is written by the run or the generator
that wrote the files (:class:`tasks.outputs.OutputFolder`, :mod:`tasks.data._build`);
:func:`remove_recorded` removes the files it lists, and only those, refusing when one changed since.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

from vggbackbone.utils import atomic_path

__all__ = [
    "COMPLETE_MARKER",
    "HOW",
    "MANIFEST",
    "UnsafeOutputError",
    "changed_files",
    "few",
    "file_record",
    "read_manifest",
    "relative_path",
    "remove_recorded",
    "write_manifest",
]

#: the manifest of a folder's files, written by the run (or generator) that wrote them
MANIFEST = "_MANIFEST.json"
#: the file a ``predict`` run writes last into its output folder: a folder without it holds an incomplete run
COMPLETE_MARKER = "_COMPLETE"
FORMAT = "vggbackbone-outputs/1"
HOW = "move it away (or delete it yourself) or pick another output folder"


class UnsafeOutputError(RuntimeError):
    """A run would delete or overwrite a file the project did not write, or write where it reads."""


def file_record(path: str | Path) -> dict[str, Any]:
    """``{"size", "sha256"}`` of a file: what a manifest keeps to know the file is still the one written."""
    with open(path, "rb") as f:
        return {"size": os.fstat(f.fileno()).st_size, "sha256": hashlib.file_digest(f, "sha256").hexdigest()}


def relative_path(rel: str | Path) -> str:
    """``rel`` as a clean relative POSIX path; a path leaving its folder is a bug, refused."""
    p = PurePosixPath(Path(rel).as_posix())
    if p.is_absolute() or ".." in p.parts or not p.parts or str(p) == ".":
        raise ValueError(f"{rel}: an output file must be a relative path inside its output folder")
    return str(p)


def read_manifest(path: str | Path) -> dict[str, Any] | None:
    """The manifest at ``path``; ``None`` when there is none; refused when the file is not one the project wrote."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        data = e
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("files"), dict):
        raise UnsafeOutputError(
            f"{path}: not a manifest the project wrote, so nothing in {path.parent} is known to be its own; {HOW}"
        )
    return data


def write_manifest(path: str | Path, manifest: Mapping[str, Any]) -> None:
    """Write a manifest atomically (``format`` added)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps({"format": FORMAT, **manifest}, indent=1, sort_keys=True))


def changed_files(folder: Path, files: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Listed files present in ``folder`` that are no longer what was written (appended files: still plain files)."""
    out = []
    for rel, rec in files.items():
        path = folder / relative_path(rel)
        replaced = path.is_symlink() or (path.exists() and not path.is_file())  # a link or folder where a file was
        if replaced or (
            path.is_file() and "sha256" in rec and (path.stat().st_size != rec["size"] or file_record(path) != rec)
        ):
            out.append(rel)
    return out


def remove_recorded(folder: str | Path, files: Mapping[str, Mapping[str, Any]], dirs: Iterable[str] = (), *,
                    first: Iterable[str] = ()) -> None:  # fmt: skip
    """Remove the listed ``files`` of ``folder`` (``first`` ones first), then the listed ``dirs`` left empty.

    Every present file is checked against its record before anything is removed: one that changed
    stops it all (:class:`UnsafeOutputError`, naming them). Files already gone are fine.
    """
    folder = Path(folder)
    changed = changed_files(folder, files)
    if changed:
        raise UnsafeOutputError(
            f"{folder}: {few(changed)} changed since the project wrote {'it' if len(changed) == 1 else 'them'}, "
            f"so nothing is removed: {HOW}"
        )
    first = [r for r in first if r in files]
    order = first + sorted(set(files) - set(first))
    for rel in order:
        (folder / relative_path(rel)).unlink(missing_ok=True)
    for rel in sorted(dirs, key=lambda d: -len(PurePosixPath(d).parts)):  # deepest first; rmdir, never rmtree
        with contextlib.suppress(OSError):  # not empty (someone else's file) or gone: left as it is
            (folder / relative_path(rel)).rmdir()


def few(names: list[str], n: int = 5) -> str:
    shown = ", ".join(names[:n])
    return shown + (f" and {len(names) - n} more" if len(names) > n else "")
