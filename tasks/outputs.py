"""Files a run writes, and only those: the project never deletes or overwrites a file it did not write.

Every writer of the tasks (``predict`` outputs, ``extract``'s embeddings file) and every demo
dataset generator records what it writes in a manifest, ``<folder>/_MANIFEST.json``
(:data:`MANIFEST`; JSON: ``format``, ``by``, ``complete``, ``files`` ``{relative path: {size,
sha256}}``, ``dirs`` it created):

* a new run first removes what the previous run's manifest lists, and only that, never by
  pattern; a listed file that changed since (other size or SHA-256) stops the run, untouched;
* a file a run would write over that no manifest of the folder lists stops the run, named;
* an output folder that is, holds or lies inside one of the run's inputs (symlinks resolved)
  stops the run, naming both (:func:`check_apart`);
* while a run writes, each process appends what it writes to its journal
  (``<manifest>.a<attempt>.r<rank>``, one JSON line per file, *before* the file takes its name), so
  the files of a killed run are known to the next; at the end global rank 0 writes the manifest
  atomically, then the ``_COMPLETE`` marker (:data:`COMPLETE_MARKER`) last: a folder without it
  holds an incomplete run.

:class:`OutputFolder` is that protocol for the writers (:mod:`tasks.writer`, ``extract``); the
manifest file itself is :mod:`tasks.manifest` (:func:`read_manifest`, :func:`write_manifest`,
:func:`remove_recorded`, also used by the dataset generators, :mod:`tasks.data._build`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import IO, Any

import torch.distributed as dist

from tasks.distributed import all_gather_objects
from tasks.manifest import (
    COMPLETE_MARKER,
    HOW,
    MANIFEST,
    UnsafeOutputError,
    changed_files,
    few,
    file_record,
    read_manifest,
    relative_path,
    remove_recorded,
    write_manifest,
)
from vggbackbone.utils import atomic_path

__all__ = [
    "COMPLETE_MARKER",
    "MANIFEST",
    "OutputFolder",
    "UnsafeOutputError",
    "changed_files",
    "check_apart",
    "file_record",
    "gather_count",
    "input_paths",
    "predict_inputs",
    "read_manifest",
    "remove_recorded",
    "require_some",
    "write_manifest",
]


def input_paths(source: str | Path | None) -> list[Path]:
    """What a run reads, for :func:`check_apart`: a folder, one image, or an image list and the listed images."""
    if source is None:
        return []
    src = Path(source)
    if src.is_dir() or not src.is_file():
        return [src]
    from tasks.images import IMAGE_EXTENSIONS, list_images

    if src.suffix.lower() in IMAGE_EXTENSIONS:
        return [src]
    try:
        _, files = list_images(src)
    except (OSError, ValueError):  # the reader reports it, naming the list
        return [src]
    return [src, *files]


def predict_inputs(datamodule: Any) -> list[Path]:
    """What a task's ``predict`` reads: ``data.predict_images`` (with what a list names), else ``data.root``."""
    source = getattr(datamodule, "predict_images", None)
    if source:
        return input_paths(source)
    root = getattr(datamodule, "root", None)
    return [Path(root)] if root else []


def check_apart(output: str | Path, inputs: Iterable[str | Path], what: str = "output folder") -> None:
    """Refuse an ``output`` that is an input, lies inside an input folder, or holds an input (symlinks resolved)."""
    out = Path(output).resolve()
    seen: set[Path] = set()
    for inp in inputs:
        real = Path(inp).resolve()
        parent = real if real.is_dir() else real.parent
        if parent in seen and real != out:
            continue  # images of one folder of a list: one check of the folder does for "inside"
        seen.add(parent)
        if real == out:
            relation = "is"
        elif real.is_dir() and out.is_relative_to(real):
            relation = "lies inside"
        elif real.is_relative_to(out):
            relation = "holds"
        else:
            continue
        shown_out = f"{output} ({out})" if Path(output) != out else str(out)
        shown_in = f"{inp} ({real})" if Path(inp) != real else str(real)
        raise UnsafeOutputError(
            f"the {what} {shown_out} {relation} the input {shown_in}: a run never writes where it reads; "
            f"pick an {what} apart from the input"
        )


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class OutputFolder:
    """The files one run writes into ``folder``, recorded in ``folder/<manifest>`` (see the module doc).

    Args:
        folder: the output folder.
        by: who writes (``"detect predict"``), named in the manifest and in errors.
        manifest: the manifest's name (a writer of one file beside others names its own,
            ``.<file>.manifest.json``).
        complete: the marker written last by :meth:`finish`; ``None`` for none.

    Use: :meth:`begin` (every process), :meth:`write` / :meth:`open_append` per file (any
    process), :meth:`finish` (every process).
    """

    def __init__(
        self, folder: str | Path, by: str, manifest: str = MANIFEST, complete: str | None = COMPLETE_MARKER
    ) -> None:
        self.folder, self.by, self.manifest_name, self.complete = Path(folder), by, manifest, complete
        self.output, self.what = self.folder, "output folder"  # what must stay apart from the inputs
        self.attempt, self.resumed = 0, False
        self._world = 1
        self._records: dict[str, dict[str, Any]] = {}  # written by this process in this attempt
        self._removed: set[str] = set()
        self._known: dict[str, dict[str, Any]] = {}  # written by earlier attempts of a resumed run
        self._journal: IO[str] | None = None

    @classmethod
    def beside(cls, path: str | Path, by: str) -> OutputFolder:
        """The record of one output file among others (a CSV, an ``.npz``): its manifest is
        ``.<name>.manifest.json`` beside it, no ``_COMPLETE``; the file must stay apart from the inputs."""
        path = Path(path)
        out = cls(path.parent, by, manifest=f".{path.name}.manifest.json", complete=None)
        out.output, out.what = path, "output file"
        return out

    @property
    def manifest_path(self) -> Path:
        return self.folder / self.manifest_name

    def _journal_path(self, attempt: int, rank: int) -> Path:
        return self.folder / f"{self.manifest_name}.a{attempt}.r{rank}"

    def _read_journal(self, path: Path) -> tuple[dict[str, dict[str, Any]], set[str]]:
        """``(files, folders)`` a journal records (a file removed later is dropped)."""
        files: dict[str, dict[str, Any]] = {}
        dirs: set[str] = set()
        if not path.is_file():
            return files, dirs
        for line in path.read_text().splitlines():
            try:
                entry = json.loads(line)
                rel = relative_path(entry.pop("path"))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):  # a line cut by a kill
                continue
            if entry.get("dir"):
                dirs.add(rel)
            elif entry.get("removed"):
                files.pop(rel, None)
            else:
                files[rel] = entry
        return files, dirs

    def _journals(self, manifest: Mapping[str, Any]) -> list[Path]:
        return [self._journal_path(a, r) for a, w in enumerate(manifest.get("attempts", [])) for r in range(w)]

    def _all_records(self, manifest: Mapping[str, Any]) -> tuple[dict[str, dict[str, Any]], set[str]]:
        """``(files, folders)`` the manifest and its journals record."""
        files, dirs = dict(manifest["files"]), set(manifest.get("dirs", ()))
        for journal in self._journals(manifest):
            more, more_dirs = self._read_journal(journal)
            files.update(more)
            dirs |= more_dirs
        return files, dirs

    def begin(self, *, inputs: Iterable[str | Path] = (), expected: Iterable[str] = (), resume_key: Any = None) -> bool:
        """Start a run (a collective): refuse an output among ``inputs``; resume or clean; return whether resumed.

        Global rank 0 removes what the previous run's manifest (and its journals) lists, unless
        that run is incomplete with the same ``resume_key`` (then its files are kept, and known
        to this run). ``expected``: names this run will write, refused now (not after the work)
        when they exist and no manifest lists them.
        """
        rank, world = _rank_world()
        resume_key = json.loads(json.dumps(resume_key))  # as the manifest will hold it (tuples are lists)
        outcome: dict[str, Any] = {}
        if rank == 0:
            try:
                outcome = self._begin(list(inputs), list(expected), resume_key, world)
            except Exception as e:  # every process raises it, none waits forever
                outcome = {"error": e}
        shared = all_gather_objects(outcome)[0]
        if "error" in shared:
            raise shared["error"] if rank == 0 else UnsafeOutputError(str(shared["error"]))
        self.attempt, self.resumed, self._known, self._world = (
            shared["attempt"],
            shared["resumed"],
            shared["known"],
            world,
        )
        self._records, self._removed, self._journal = {}, set(), None
        return self.resumed

    def _begin(self, inputs: list[str | Path], expected: list[str], resume_key: Any, world: int) -> dict[str, Any]:
        if inputs:
            check_apart(self.output, inputs, self.what)
        if self.folder.exists() and not self.folder.is_dir():
            raise UnsafeOutputError(f"{self.folder}: the output folder is a file; pick another output folder")
        old = read_manifest(self.manifest_path)
        base = {"by": self.by, "complete": False, "resume_key": resume_key}
        resume = old is not None and not old.get("complete") and resume_key is not None
        if resume and old.get("resume_key") == resume_key:
            known, dirs = self._all_records(old)
            attempts = [*old.get("attempts", []), world]
        else:
            known, dirs, attempts = {}, set(), [world]
            if old is not None:
                files, old_dirs = self._all_records(old)
                journals = {j.name: {"size": None} for j in self._journals(old)}  # no sha256: removed as they are
                marker = [self.complete] if self.complete else []
                remove_recorded(self.folder, files | journals, old_dirs, first=marker)
            self.folder.mkdir(parents=True, exist_ok=True)
        attempt = len(attempts) - 1
        names = [*expected, *([self.complete] if self.complete else [])]
        names += [self._journal_path(attempt, r).name for r in range(world)]
        there = [n for n in names if n not in known and ((self.folder / n).exists() or (self.folder / n).is_symlink())]
        if there:
            one = len(there) == 1
            raise UnsafeOutputError(
                f"{self.folder}: {few(there)} {'is' if one else 'are'} there and no manifest of the project lists "
                f"{'it' if one else 'them'} ({self.manifest_name}): {self.by} never overwrites a file it did not "
                f"write; {HOW}"
            )
        write_manifest(self.manifest_path, base | {"files": known, "dirs": sorted(dirs), "attempts": attempts})
        return {"attempt": attempt, "resumed": attempt > 0, "known": known}

    def _log(self, rel: str, entry: Mapping[str, Any]) -> None:
        if self._journal is None:
            self._journal = open(self._journal_path(self.attempt, _rank_world()[0]), "a")  # noqa: SIM115 (closed in finish/close)
        self._journal.write(json.dumps({"path": rel, **entry}) + "\n")
        self._journal.flush()

    def _claim(self, rel: str | Path) -> tuple[str, Path]:
        rel = relative_path(rel)
        path = self.folder / rel
        for parent in reversed(PurePosixPath(rel).parents[:-1]):  # the folders this run creates are its own
            if (self.folder / parent).is_symlink():  # it would lead the files out, maybe among the inputs
                raise UnsafeOutputError(f"{self.folder / parent}: a symbolic link in the output folder; {HOW}")
            if not (self.folder / parent).exists():
                self._log(str(parent), {"dir": True})
                (self.folder / parent).mkdir(parents=True, exist_ok=True)
        if (path.exists() or path.is_symlink()) and not self._ours(rel):
            raise UnsafeOutputError(
                f"{path}: already there, and not written by this run of {self.by} nor listed in its "
                f"manifest: the project never overwrites a file it did not write; {HOW}"
            )
        return rel, path

    def _ours(self, rel: str) -> bool:
        if rel in self._records or rel in self._known:
            return True
        return any(rel in self._read_journal(self._journal_path(self.attempt, r))[0] for r in range(self._world))

    def known_files(self) -> list[str]:
        """Files an earlier attempt of this (resumed) run wrote, relative to the folder."""
        return sorted(self._known)

    def recorded(self) -> list[str]:
        """Every file this run records so far, all processes and earlier attempts (a collective)."""
        names = set(self._known)
        for records, removed in all_gather_objects((self._records, sorted(self._removed))):
            names = (names - set(removed)) | set(records)
        return sorted(names)

    @contextmanager
    def write(self, rel: str | Path) -> Iterator[Path]:
        """A temporary path whose content becomes ``folder/rel`` atomically, recorded (journal first)."""
        rel, path = self._claim(rel)
        with atomic_path(path) as tmp:
            yield tmp
            record = file_record(tmp)
            self._log(rel, record)
            self._records[rel] = record
            self._removed.discard(rel)

    def open_append(self, rel: str | Path, mode: str = "ab", **text: Any) -> IO[Any]:
        """Open ``folder/rel`` for appending (a record file growing batch by batch), recorded first.

        ``text``: ``open``'s ``encoding``/``errors`` for a text mode.
        """
        rel, path = self._claim(rel)
        self._log(rel, {"appended": True})
        self._records[rel] = {"appended": True}
        return open(path, mode, **text)

    def discard(self, rel: str | Path) -> None:
        """Remove a file this run (or an earlier attempt of it) wrote, e.g. shards once merged."""
        rel = relative_path(rel)
        if not self._ours(rel):
            raise UnsafeOutputError(f"{self.folder / rel}: not written by this run of {self.by}; not removed")
        self._log(rel, {"removed": True})
        (self.folder / rel).unlink(missing_ok=True)
        self._records.pop(rel, None)
        self._removed.add(rel)

    def close(self) -> None:
        """Close this process's journal (an interrupted run: its records stay for the next run)."""
        if self._journal is not None:
            self._journal.close()
            self._journal = None

    def finish(self, summary: Mapping[str, Any] | None = None, remove_dirs: Iterable[str] = ()) -> None:
        """End the run (a collective): rank 0 writes the manifest, then ``complete`` (JSON ``summary``) last.

        ``remove_dirs``: folders this run created and emptied (e.g. a shard folder), removed if empty.
        """
        self.close()
        parts = all_gather_objects((self._records, sorted(self._removed)))
        if _rank_world()[0] != 0:
            return
        old = read_manifest(self.manifest_path) or {"files": {}, "attempts": []}
        files, dirs = self._all_records(old)
        for records, removed in parts:
            for rel in removed:
                files.pop(rel, None)
            files.update(records)
        for rel in map(relative_path, remove_dirs):
            try:
                (self.folder / rel).rmdir()
                dirs.discard(rel)
            except OSError:  # not empty: someone else's file is there
                pass
        content = json.dumps(dict(summary or {}), indent=2).encode()
        if self.complete:
            files[self.complete] = {"size": len(content), "sha256": hashlib.sha256(content).hexdigest()}
        kept = {k: v for k, v in old.items() if k not in ("format", "files", "dirs")}
        write_manifest(
            self.manifest_path, kept | {"by": self.by, "complete": True, "files": files, "dirs": sorted(dirs)}
        )
        for journal in self._journals(old):  # their records are in the manifest now
            journal.unlink(missing_ok=True)
        if self.complete:
            with atomic_path(self.folder / self.complete) as tmp:
                tmp.write_bytes(content)


def gather_count(count: int) -> int:
    """The sum of ``count`` over every process (a collective)."""
    return sum(all_gather_objects(int(count)))


def require_some(
    count: int, what: str, source: Any, skipped: list[Any], on_error: Callable[[], None] | None = None
) -> None:
    """Refuse a run that produced nothing: ``count`` (summed over processes) 0: ``RuntimeError`` naming ``source``."""
    if count:
        return
    if on_error is not None:
        on_error()
    first = "; ".join(f"{s.path}: {s.reason}" for s in skipped[:3])
    detail = (
        f"all {len(skipped)} image(s) unreadable ({first}{', ...' if len(skipped) > 3 else ''})"
        if skipped
        else "no image"
    )
    raise RuntimeError(f"{what}: nothing produced from {source}: {detail}; nothing marked complete")
