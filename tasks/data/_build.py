"""Atomic, idempotent dataset generation shared by the synthetic generators, never over someone else's files.

A generator writes only into a missing or empty folder, or one holding a dataset it generated
itself: its manifest (:data:`tasks.manifest.MANIFEST`) lists every file and folder it wrote, with
sizes and SHA-256. Anything else there (no manifest, files the manifest does not list, listed
files changed since) stops it before it generates anything: :class:`GeneratedFolderError`, naming
the folder, a few of the names found and how to proceed.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from tasks.manifest import (
    MANIFEST,
    UnsafeOutputError,
    changed_files,
    file_record,
    read_manifest,
    remove_recorded,
    write_manifest,
)

__all__ = ["GeneratedFolderError", "building", "ensure_dataset"]

C = TypeVar("C")


class GeneratedFolderError(UnsafeOutputError):
    """The folder a generator would write holds files it did not generate."""


def _raise(error: OSError) -> None:
    raise error  # a folder that cannot be listed is not known to be empty of someone else's files


def record_tree(folder: str | Path) -> dict[str, Any]:
    """``{"files": {rel: record}, "dirs": [rel]}``: every file and folder below ``folder`` (a generator's manifest)."""
    folder = Path(folder)
    files, dirs = {}, []
    for top, subdirs, names in os.walk(folder, onerror=_raise):
        rel_top = Path(top).relative_to(folder)
        dirs += [(rel_top / d).as_posix() for d in subdirs]
        files |= {(rel_top / name).as_posix(): file_record(Path(top) / name) for name in names}
    return {"files": files, "dirs": sorted(dirs)}


def foreign_entries(folder: str | Path, manifest: Mapping[str, Any] | None) -> list[str]:
    """What ``folder`` holds that ``manifest`` does not account for: unlisted files, folders or links, changed files
    (``<name> (changed since it was written)``)."""
    folder = Path(folder)
    files = dict(manifest["files"]) if manifest else {}
    dirs = set(manifest.get("dirs", ())) if manifest else set()
    out = []
    for top, subdirs, names in os.walk(folder, onerror=_raise):
        rel_top = Path(top).relative_to(folder)
        for d in subdirs:  # os.walk lists a link to a folder here, and never enters it
            rel = (rel_top / d).as_posix()
            if rel not in dirs or (Path(top) / d).is_symlink():
                out.append(rel + "/")
        for name in names:
            rel = (rel_top / name).as_posix()
            if rel != MANIFEST and rel not in files:
                out.append(rel)
    changed = changed_files(folder, {r: rec for r, rec in files.items() if (folder / r).exists()})
    return sorted(out) + [f"{rel} (changed since it was written)" for rel in changed]


def _check_replaceable(root: Path, option: str | None) -> dict[str, Any] | None:
    """Refuse a ``root`` holding anything but a dataset the generators wrote; return its manifest (or None)."""
    if root.is_symlink():
        raise GeneratedFolderError(
            f"{root}: is a symbolic link ({root.resolve()}); a generator replaces its folder, and only a real "
            "one: point data.root (or --out) at the folder itself"
        )
    if not root.exists():
        return None
    if not root.is_dir():
        raise GeneratedFolderError(f"{root}: is a file, not a folder; pick another data.root (or --out)")
    try:
        manifest = read_manifest(root / MANIFEST)
    except UnsafeOutputError:
        manifest = None
    if manifest is None and not any(root.iterdir()):
        return None
    if manifest is None:  # a few names are enough: the folder may hold millions of files
        foreign = sorted(p.name + ("/" if p.is_dir() else "") for p in root.iterdir())
    else:
        foreign = foreign_entries(root, manifest)
    if manifest is None or foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        what = "and no generator manifest" if manifest is None else f"not as its {MANIFEST} lists"
        drop = f"drop `{option}` from the config to read your own data there, or " if option else ""
        raise GeneratedFolderError(
            f"{root}: this folder is not a generated dataset: it holds {shown}, {what}. A generator writes only "
            f"into a missing or empty folder, or one it generated, and never deletes what it did not write: {drop}"
            "pick another data.root (python -m tasks.data: another --out)"
            + (". A dataset generated before generators wrote manifests has none: delete it yourself to regenerate it"
               if manifest is None else "")
        )  # fmt: skip
    return manifest


@contextmanager
def building(root: str | Path, option: str | None = None) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``root``; on success it replaces ``root``.

    ``root`` must be missing, empty or a dataset the generators wrote (checked before and again at
    the swap; ``option``, the config key that asked for generation, is named in the error). An
    interrupted or failing generation deletes the temporary folder and leaves ``root`` as it was,
    so a half-written dataset is never mistaken for a complete one. The finished folder gets its
    manifest (:data:`tasks.manifest.MANIFEST`) before it takes ``root``'s place.
    """
    root = Path(root)
    _check_replaceable(root, option)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    try:
        yield tmp
        write_manifest(tmp / MANIFEST, {"by": "tasks.data generator", "complete": True, **record_tree(tmp)})
        _swap_in(tmp, root, option=option)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)  # the temporary folder this call made and filled


def _swap_in(tmp: Path, root: Path, attempts: int = 10, option: str | None = None) -> None:
    """Rename the finished ``tmp`` to ``root``, replacing a generated dataset there, with renames only.

    Several processes may build the same ``root`` at once: Lightning's ``prepare_data`` runs on the
    first process of every node, and on a shared file system their roots are one folder. With
    ``rmtree(root); rename(tmp, root)``, a root put in place by another builder between the two
    made the rename fail; here that root is checked (a generated dataset: it holds a manifest
    listing all it holds) and moved aside too, and the rename tried again, so a complete dataset
    ends at ``root`` whoever finishes last (the builds are deterministic). What was moved aside
    loses the files its manifest lists and nothing else; a folder still holding something (a file
    added after the check) is left beside ``root`` with a warning naming it.
    """
    for attempt in range(attempts):
        manifest = _check_replaceable(root, option)
        old = root.parent / f"{tmp.name}.old"
        try:
            root.rename(old)
        except FileNotFoundError:  # nothing there, or another builder moved it first
            old = None
        try:
            tmp.rename(root)
            return
        except OSError as e:  # another builder's root arrived after ours was moved aside
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST) or attempt == attempts - 1:
                raise
        finally:
            if old is not None:
                _remove_generated(old, manifest)


def _remove_generated(old: Path, manifest: dict[str, Any] | None) -> None:
    """Remove what ``manifest`` lists from ``old`` (a dataset moved aside), then ``old`` if it is empty."""
    try:
        if manifest is not None:
            remove_recorded(old, manifest["files"], manifest.get("dirs", ()))
            (old / MANIFEST).unlink(missing_ok=True)
        old.rmdir()
    except (OSError, UnsafeOutputError) as e:
        warnings.warn(f"{old}: left in place, it holds files no generator wrote ({e})", stacklevel=3)


def _saved_config(spec: Path, cfg_type: type[C]) -> C | None:
    try:
        saved = json.loads(spec.read_text())
        fields = {f.name: f for f in dataclasses.fields(cfg_type)}  # type: ignore[arg-type]
        kwargs: dict[str, Any] = {}
        for name, f in fields.items():
            if name in saved:
                value = saved[name]
                kwargs[name] = tuple(value) if isinstance(value, list) and isinstance(f.default, tuple) else value
        return cfg_type(**kwargs)
    except (OSError, json.JSONDecodeError, TypeError, ValueError):
        return None


def ensure_dataset(
    root: str | Path, cfg: C, spec_file: str, generate: Callable[..., Path], *, progress: bool = True,
    option: str | None = None,
) -> Path:  # fmt: skip
    """Run ``generate(root, cfg)`` unless ``root/spec_file`` records the same ``cfg``.

    ``option`` (``data.synthetic``): the config key asking for the dataset, named when ``root``
    holds something else (checked before generating: :class:`GeneratedFolderError`).
    """
    root = Path(root)
    spec = root / spec_file
    if spec.is_file() and _saved_config(spec, type(cfg)) == cfg:
        return root
    _check_replaceable(root, option)
    return generate(root, cfg, progress=progress)
