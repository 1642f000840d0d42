"""Atomic, idempotent dataset generation shared by the synthetic generators."""

from __future__ import annotations

import dataclasses
import errno
import json
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

__all__ = ["building", "ensure_dataset"]

C = TypeVar("C")


@contextmanager
def building(root: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``root``; on success it replaces ``root``.

    An interrupted or failing generation deletes the temporary folder and leaves ``root`` as it
    was, so a half-written dataset is never mistaken for a complete one.
    """
    root = Path(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    try:
        yield tmp
        _swap_in(tmp, root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _swap_in(tmp: Path, root: Path, attempts: int = 10) -> None:
    """Rename the finished ``tmp`` to ``root``, replacing what is there, with renames only.

    Several processes may build the same ``root`` at once: Lightning's ``prepare_data`` runs on the
    first process of every node, and on a shared file system their roots are one folder. With
    ``rmtree(root); rename(tmp, root)``, a root put in place by another builder between the two
    made the rename fail; here that root is moved aside too and the rename tried again, so a
    complete dataset ends at ``root`` whoever finishes last (the builds are deterministic).
    """
    for attempt in range(attempts):
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
                shutil.rmtree(old, ignore_errors=True)


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
    root: str | Path, cfg: C, spec_file: str, generate: Callable[..., Path], *, progress: bool = True
) -> Path:
    """Run ``generate(root, cfg)`` unless ``root/spec_file`` records the same ``cfg``."""
    root = Path(root)
    spec = root / spec_file
    if spec.is_file() and _saved_config(spec, type(cfg)) == cfg:
        return root
    return generate(root, cfg, progress=progress)
