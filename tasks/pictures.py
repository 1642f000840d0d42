"""Pictures of a run (ReID retrieval grids, classification confusion matrices, the drawings of
detection and segmentation ``predict``) sent to every logger that takes images:
:func:`log_picture`, the one helper every task calls.

Lightning's loggers take images in three different ways, so the helper names them:

* ``TensorBoardLogger``: ``experiment.add_image(tag, image, step, dataformats="HWC")``;
* ``MLFlowLogger`` (no image method of its own): the run's ``MlflowClient.log_image`` writes the
  picture as the artifact ``pictures/<tag>/step_<step>.png``;
* ``WandbLogger``: ``log_image(key=tag, images=[image], step=step)`` (``media/images`` of the run).

``CSVLogger`` takes no images; the picture stays the file the task wrote.
"""

from __future__ import annotations

import os

import numpy as np
import pytorch_lightning as pl
from PIL import Image
from pytorch_lightning.loggers import MLFlowLogger, TensorBoardLogger, WandbLogger

__all__ = ["log_picture"]


def log_picture(
    module: pl.LightningModule, tag: str, path: str | os.PathLike[str], step: int | None = None
) -> list[str]:
    """Send the picture file at ``path`` (PNG, JPEG) to each of ``module.loggers`` that takes images,
    under ``tag`` at ``step`` (default: the global step). Returns the class names of the loggers
    that got it (none without a trainer)."""
    loggers = [lg for lg in module.loggers if isinstance(lg, (TensorBoardLogger, MLFlowLogger, WandbLogger))]
    if not loggers:
        return []
    with Image.open(path) as im:
        image = np.asarray(im.convert("RGB"))  # (H, W, 3) uint8
    step = module.global_step if step is None else step
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(tag, image, step, dataformats="HWC")
        elif isinstance(logger, MLFlowLogger):
            logger.experiment.log_image(logger.run_id, image, artifact_file=f"pictures/{tag}/step_{step:06d}.png")
        else:
            logger.log_image(key=tag, images=[image], step=step)
    return [type(lg).__name__ for lg in loggers]
