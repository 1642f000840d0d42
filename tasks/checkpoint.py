"""Checkpoint files: atomic writes, and pretrained weights that a checkpoint replaces.

* :class:`AtomicCheckpointIO`: checkpoints written to a temp file in the same folder and renamed
  (Lightning's own writer stages through ``/tmp`` and falls back to a copy across file systems);
* :data:`WEIGHTS_IN_CHECKPOINT` / :func:`backbone_weights`: a model rebuilt from a checkpoint is
  built as the pretrained model it was, without fetching the pretrained weights again.
"""

from __future__ import annotations

from typing import Any

import torch
from pytorch_lightning.plugins.io import TorchCheckpointIO

from vggbackbone.utils import atomic_path

__all__ = ["WEIGHTS_IN_CHECKPOINT", "AtomicCheckpointIO", "backbone_weights"]


#: was (tasks whose structure depends on it, e.g. a detector's frozen BatchNorm, keep that) but
#: load no weights, since the checkpoint's state dict replaces them.
WEIGHTS_IN_CHECKPOINT = "in_checkpoint"


def backbone_weights(weights: str | None) -> str | None:
    """The weights a task should load for its ``weights_backbone`` (none when a checkpoint brings them)."""
    return None if weights == WEIGHTS_IN_CHECKPOINT else weights


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write checkpoints to a temp file beside the target, then ``os.replace`` it into place.

    A crash mid-save leaves the previous checkpoint intact: ``--ckpt_path last`` always resumes.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        if "://" in str(path):  # remote file systems: leave it to Lightning's fsspec writer
            super().save_checkpoint(checkpoint, path)
            return
        with atomic_path(path) as tmp:
            torch.save(checkpoint, tmp)
