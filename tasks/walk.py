"""Directory walks over users' data that follow symbolic links but never loop.

:func:`walk_files` is the one walk over a folder of images (:func:`tasks.images.list_images`:
predict and extract folders; :func:`tasks.data.classify.image_folder_split`: ImageFolder
splits); :func:`class_folders` lists an ImageFolder split's class folders the same way.

Written by hand because the library walks either loop or do not follow links:
torchvision's ``make_dataset`` walks with ``os.walk(followlinks=True)``, which follows a link
back into its own ancestors for ever (``ln -s .. train/0/up`` turned a 120-image split into
4,920 samples, 4,812 of them labelled with class 0), while ``pathlib.Path.rglob`` (Python 3.11)
and ``os.walk()`` do not enter linked folders at all, and a real dataset may be a tree of links.

The rules:

* symbolic links to files are followed (a sample is listed under the link's own path);
* a linked folder is entered unless its real folder (``os.stat``: ``(st_dev, st_ino)``) was
  already listed in this walk: a link back into an ancestor (a loop) or to a folder listed
  elsewhere under the root is skipped and reported, so no folder is ever listed twice. The
  real tree (the folders reached without following any link) is listed first, then the
  linked folders in sorted order, so a link never takes images away from where they really
  are (``train/0/more -> ../1/x`` leaves ``1/x``'s images in class 1);
* a dangling link (its target does not exist) with an image suffix is listed like a file:
  reading it fails with a reason naming the link's target (:func:`tasks.images.open_image`), so
  it is counted and listed with the unreadable images; a dangling link without an image suffix
  (a folder link, most likely) is reported with the skipped links;
* a folder that cannot be listed (permission denied) is reported, not silently left out as
  ``os.walk`` does.

What was skipped comes back in :attr:`Walk.skipped`; :meth:`Walk.warn` reports it in one
warning naming each link and its target.
"""

from __future__ import annotations

import os
import stat
import warnings
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from tasks.pathnames import display_path

__all__ = ["Walk", "WalkSkip", "class_folders", "walk_files"]


class WalkSkip(NamedTuple):
    """A link or folder a walk did not enter: its path, the link's target (``""`` for a folder) and why."""

    path: str
    target: str
    reason: str


@dataclass
class Walk:
    """What :func:`walk_files` found under :attr:`root`.

    ``files`` and ``dirs`` are relative paths as tuples of names (``("cat", "sub", "x.jpg")``), in
    the order they were found (callers sort them as they need); ``dirs`` holds every folder
    listed, the root excluded.
    """

    root: Path
    files: list[tuple[str, ...]] = field(default_factory=list)
    dirs: list[tuple[str, ...]] = field(default_factory=list)
    skipped: list[WalkSkip] = field(default_factory=list)

    def warn(self, where: str | None = None, max_listed: int = 5) -> None:
        """One warning counting the skipped links and folders and naming the first few (none: silent)."""
        if not self.skipped:
            return
        listed = "; ".join(
            f"{display_path(s.path)}{' -> ' + display_path(s.target) if s.target else ''} ({s.reason})"
            for s in self.skipped[:max_listed]
        )
        more = f" and {len(self.skipped) - max_listed} more" if len(self.skipped) > max_listed else ""
        warnings.warn(
            f"{display_path(where or self.root)}: skipped {len(self.skipped)} symbolic link(s) or folder(s) "
            f"while listing the images: {listed}{more}",
            stacklevel=2,
        )


def _key(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def _has_suffix(name: str, suffixes: tuple[str, ...]) -> bool:
    return name.lower().endswith(suffixes)


def _describe(root: Path, parts: tuple[str, ...]) -> str:
    return str(root.joinpath(*parts)) if parts else str(root)


def walk_files(root: str | Path, suffixes: Sequence[str]) -> Walk:
    """Files under ``root`` (recursively) whose names end with one of ``suffixes`` (any case).

    Follows links to files and to folders, never into a folder already listed (see the module
    docstring); raises ``FileNotFoundError`` / ``NotADirectoryError`` when ``root`` is not a folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise NotADirectoryError(f"{root}: not a folder") if root.exists() else FileNotFoundError(f"{root}: not found")
    sfx = tuple(s.lower() for s in suffixes)
    walk = Walk(root)
    visited: dict[tuple[int, int], tuple[str, ...]] = {_key(os.stat(root)): ()}
    above = {_key(os.stat(p)): p for p in root.resolve().parents}  # a link up there is a loop too
    links: deque[tuple[str, ...]] = deque()

    def scan(top: tuple[str, ...]) -> None:
        """List the real tree below ``top``, queueing the links to folders it holds."""
        stack = [top]
        while stack:
            here = stack.pop()
            try:
                with os.scandir(root.joinpath(*here)) as it:
                    entries = sorted(it, key=lambda e: e.name)
            except OSError as e:
                walk.skipped.append(WalkSkip(_describe(root, here), "", f"cannot list this folder: {e.strerror or e}"))
                continue
            subdirs = []
            for entry in entries:
                parts = (*here, entry.name)
                if entry.is_symlink():
                    try:
                        st = os.stat(entry.path)
                    except OSError as e:  # dangling, or a chain of links that loops (ELOOP)
                        if _has_suffix(entry.name, sfx):
                            walk.files.append(parts)  # read later: a counted skip naming the target
                        else:
                            walk.skipped.append(
                                WalkSkip(entry.path, _readlink(entry.path), f"dangling link: {e.strerror or e}")
                            )
                        continue
                    if stat.S_ISDIR(st.st_mode):
                        links.append(parts)
                    elif _has_suffix(entry.name, sfx):
                        walk.files.append(parts)
                    continue
                try:
                    if entry.is_dir(follow_symlinks=False):
                        key = _key(entry.stat(follow_symlinks=False))
                        if key in visited:  # a bind mount of a folder listed already
                            walk.skipped.append(WalkSkip(entry.path, "", _seen(root, visited[key], parts)))
                            continue
                        visited[key] = parts
                        walk.dirs.append(parts)
                        subdirs.append(parts)
                    elif entry.is_file(follow_symlinks=False) and _has_suffix(entry.name, sfx):
                        walk.files.append(parts)
                except OSError as e:  # removed while listing
                    walk.skipped.append(WalkSkip(entry.path, "", f"cannot read: {e.strerror or e}"))
            stack.extend(reversed(subdirs))

    scan(())
    while links:
        parts = links.popleft()
        path = root.joinpath(*parts)
        try:
            key = _key(os.stat(path))
        except OSError as e:  # changed since it was listed
            walk.skipped.append(WalkSkip(str(path), _readlink(path), f"dangling link: {e.strerror or e}"))
            continue
        if key in visited or key in above:
            why = (
                _seen(root, visited[key], parts)
                if key in visited
                else f"a loop: it leads to {above[key]}, which holds {root}"
            )
            walk.skipped.append(WalkSkip(str(path), _readlink(path), why))
            continue
        visited[key] = parts
        walk.dirs.append(parts)
        scan(parts)
    return walk


def _readlink(path: str | Path) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return "?"


def _seen(root: Path, first: tuple[str, ...], parts: tuple[str, ...]) -> str:
    """Why a folder is not entered: a loop (it is an ancestor of the link) or listed elsewhere already."""
    if parts[: len(first)] == first:
        return f"a loop: it leads back to {_describe(root, first)}, which holds it"
    return f"the same folder as {_describe(root, first)}, listed already"


def class_folders(root: str | Path) -> list[str]:
    """The class folders of an ImageFolder split: ``root``'s sub-folders, linked ones included,
    sorted by name (as torchvision's ``find_classes``), except links that lead back to ``root`` or
    one of its ancestors, or to a folder already among them (:func:`walk_files` skips and reports
    those when it lists the images)."""
    root = Path(root)
    seen = {_key(os.stat(p)) for p in (root, *root.resolve().parents)}
    real, linked = [], []
    with os.scandir(root) as it:
        for entry in sorted(it, key=lambda e: e.name):
            try:
                if entry.is_symlink():
                    if entry.is_dir():
                        linked.append(entry)
                elif entry.is_dir(follow_symlinks=False):
                    real.append(entry.name)
                    seen.add(_key(entry.stat(follow_symlinks=False)))
            except OSError:
                continue
    for entry in linked:
        try:
            key = _key(os.stat(entry.path))
        except OSError:
            continue
        if key not in seen:
            seen.add(key)
            real.append(entry.name)
    return sorted(real)
