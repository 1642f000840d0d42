"""Unreadable samples: skipped, counted on every process, reported once.

* :class:`SkippedSample`: what a dataset returns instead of a sample it could not read;
  :func:`drop_skipped` splits a list of items for a collate function;
* :class:`SkipCounter`: the readable images and the skipped samples of one phase (training, or
  evaluation and ``predict``) on this process; :meth:`SkipCounter.report` gathers every process's
  and warns once (:func:`warn_skipped`). :class:`tasks.module.TaskModule` keeps one for training
  and one for evaluation and counts every batch itself;
* :func:`readable_count`, :func:`skipped_of`: what a task batch (a dict or a batch object) says.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from torch import Tensor

from tasks.distributed import all_gather_objects, is_global_zero
from tasks.pathnames import display_path

__all__ = ["SkipCounter", "SkippedSample", "drop_skipped", "readable_count", "skipped_of", "skips_text", "warn_skipped"]


class SkippedSample(NamedTuple):
    """Returned by a dataset instead of a sample it could not read (a collate drops it).

    A ``NamedTuple`` so it survives Lightning's batch transfer (frozen dataclasses do not).
    """

    path: str
    reason: str


def drop_skipped(samples: Sequence[Any]) -> tuple[list[Any], list[SkippedSample]]:
    """Split a list of dataset items into readable samples and :class:`SkippedSample` markers."""
    kept = [s for s in samples if not isinstance(s, SkippedSample)]
    skipped = [s for s in samples if isinstance(s, SkippedSample)]
    return kept, skipped


def warn_skipped(skipped: Sequence[SkippedSample], where: str, max_listed: int = 5) -> None:
    """One warning that counts the skipped files and names the first few."""
    if not skipped:
        return
    listed = "; ".join(f"{display_path(s.path)} ({s.reason})" for s in skipped[:max_listed])
    more = f" and {len(skipped) - max_listed} more" if len(skipped) > max_listed else ""
    warnings.warn(f"{where}: skipped {len(skipped)} unreadable image(s): {listed}{more}", stacklevel=2)


def readable_count(batch: Any) -> int:
    """Number of readable images in a task batch (``image``/``images`` of a dict or a batch object); -1: unknown."""
    images = batch.get("image") if isinstance(batch, Mapping) else getattr(batch, "images", None)
    if isinstance(images, Tensor):
        return int(images.shape[0]) if images.numel() else 0
    if isinstance(images, (list, tuple)):
        return len(images)
    return -1


def skipped_of(batch: Any) -> list[Any]:
    """The unreadable samples a task batch reports (``skipped`` of a dict or a batch object)."""
    skipped = batch.get("skipped") if isinstance(batch, Mapping) else getattr(batch, "skipped", None)
    return list(skipped) if isinstance(skipped, (list, tuple)) else []


def skips_text(skips: Sequence[SkippedSample], where: str = "on this process") -> str:
    """``3 skipped on this process, e.g. a.jpg: cannot identify image file`` for an error message."""
    if not skips:
        return f"none readable {where}"
    return f"{len(skips)} skipped {where}, e.g. {skips[0].path}: {skips[0].reason}"


class SkipCounter:
    """The readable images and skipped samples of one phase on this process, reported once for all.

    ``count(batch)`` a task batch (its readable images and its ``skipped`` pairs), or ``add`` the
    ``(path, reason)`` pairs a task finds itself (an image too small for the network);
    ``report(where)`` is a collective (every rank calls it): it gathers every rank's list, warns
    once on global rank 0 with the count and the first few files (:func:`warn_skipped`), clears
    the list, and returns the gathered one. :attr:`readable` counts the readable images since the
    last :meth:`reset` (``-1`` once a batch of unknown size came), :attr:`batches` the batches counted.
    """

    def __init__(self) -> None:
        self.items: list[SkippedSample] = []
        self.readable = 0
        self.batches = 0

    def reset(self) -> None:
        """Start a phase: nothing counted, nothing skipped."""
        self.items, self.readable, self.batches = [], 0, 0

    def add(self, skipped: Sequence[Sequence[str]]) -> None:
        self.items += [SkippedSample(str(s[0]), str(s[1])) for s in skipped]

    def count(self, batch: Any) -> None:
        """Count a task batch: its readable images and the unreadable ones it lists."""
        n = readable_count(batch)
        self.readable = -1 if n < 0 or self.readable < 0 else self.readable + n
        self.batches += 1
        self.add(skipped_of(batch))

    def report(self, where: str, warn: bool = True) -> list[SkippedSample]:
        """Every process's skipped samples (a collective), warned once on global rank 0 unless ``warn`` is false."""
        gathered = [s for part in all_gather_objects(self.items) for s in part]
        self.items = []
        if warn and is_global_zero():
            warn_skipped(gathered, where)
        return gathered
