"""Collectives for per-sample results, working with or without ``torch.distributed``.

* :func:`is_global_zero`: whether this process is global rank 0 (or the only one);
* :func:`all_gather_objects`: any picklable object from every rank;
* :func:`gather_unique`: ``{sample_key: result}`` dicts merged across ranks, one result per key.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch.distributed as dist

__all__ = ["all_gather_objects", "gather_unique", "is_global_zero"]


def is_global_zero() -> bool:
    """True on global rank 0, and in a process that is not part of a process group."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def all_gather_objects(obj: Any) -> list[Any]:
    """``[obj_rank0, obj_rank1, ...]`` (just ``[obj]`` when not distributed).

    Works for any picklable object, on gloo and NCCL; a collective, so every rank must call it.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_unique(items: Mapping[Any, Any]) -> dict[Any, Any]:
    """Merge ``{sample_key: result}`` dicts from every rank, keeping one result per key.

    Distributed samplers may pad by repeating samples; keying results by sample id and merging
    here makes every metric see each sample once, whatever the number of processes.
    """
    merged: dict[Any, Any] = {}
    for part in all_gather_objects(dict(items)):
        for k, v in part.items():
            merged.setdefault(k, v)
    return merged
