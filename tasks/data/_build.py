"""Atomic, idempotent dataset generation shared by the synthetic generators."""

from __future__ import annotations

import dataclasses
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
        if root.exists():
            shutil.rmtree(root)
        tmp.rename(root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


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
