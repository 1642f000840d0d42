"""What a task's ``predict`` / ``extract`` really ran, for the inference tests.

* :class:`RecordInference`: a callback that saves, per predict batch, the images, the
  embeddings and which model ran; :func:`record_arg` is the command-line option that adds it
  (a subprocess imports it from here: keep this module light at import);
* :func:`plain_reid_model`: a ReID checkpoint's model, not optimised; :func:`embed_directly`:
  that model on image files, resized as the test configs do (32x16).

Import as ``from inference_probe import ...`` (pytest puts ``tests/`` on ``sys.path``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch

__all__ = ["RecordInference", "embed_directly", "plain_reid_model", "record_arg"]


class RecordInference(pl.Callback):
    """Saves, per predict batch, the images, the model outputs (ReID embeddings) and which model
    ran (``TaskModule.inference_model``: the plain model or an ``InferenceModule``)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.images: list[torch.Tensor] = []
        self.embeddings: list[torch.Tensor] = []
        self.models: set[str] = set()

    def on_predict_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, *args: Any) -> None:
        self.images.append(batch["image"].detach().cpu().clone())
        self.embeddings.append(outputs["embedding"].detach().float().cpu())
        model = pl_module.inference_model
        self.models.add(f"{type(model).__name__}:{getattr(model, 'precision', 'plain')}")

    def on_predict_end(self, trainer: Any, pl_module: Any) -> None:
        torch.save(
            {"images": torch.cat(self.images), "embeddings": torch.cat(self.embeddings), "models": sorted(self.models)},
            self.path,
        )


def record_arg(path: Path) -> str:
    """``--trainer.callbacks=[...]`` adding a :class:`RecordInference` that saves to ``path``."""
    return (
        f'--trainer.callbacks=[{{"class_path": "inference_probe.RecordInference", "init_args": {{"path": "{path}"}}}}]'
    )


def plain_reid_model(ckpt: Path) -> torch.nn.Module:
    """The ``ReIDNet`` of a ``tasks.reid`` checkpoint, in eval mode and not optimised."""
    from tasks.reid import ReIDTask

    return ReIDTask.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True).model.eval()


def embed_directly(net: torch.nn.Module, files: list[Path]) -> np.ndarray:
    """``net`` on ``files`` read as the tasks read them, resized to 32x16, as one batch: ``(N, D)``."""
    from torchvision.transforms import v2

    from tasks.images import read_image

    tf = v2.Compose([v2.Resize((32, 16), antialias=True), v2.ToDtype(torch.float32, scale=True)])
    with torch.no_grad():
        return net(torch.stack([tf(read_image(f)) for f in files])).numpy()
