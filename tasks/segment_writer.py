"""What ``python -m tasks.segment predict`` writes: :class:`SegmentationWriter` (``writer.*`` in YAML)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor
from torchvision.utils import draw_segmentation_masks

from tasks.data.voc import voc_palette
from tasks.distributed import all_gather_objects
from tasks.outputs import OutputFolder
from tasks.pictures import log_picture
from tasks.skips import SkippedSample
from tasks.writer import PredictionWriter
from vggbackbone.utils import atomic_path

__all__ = ["LOGGED_OVERLAYS", "SegmentationWriter", "write_prediction"]

#: Overlays of a ``predict`` sent to the loggers that take images (the first ones rank 0 writes).
LOGGED_OVERLAYS = 4


def write_prediction(
    out_dir: Path,
    sample_id: str,
    image: Tensor,
    pred: Tensor,
    num_classes: int,
    alpha: float = 0.5,
    outputs: OutputFolder | None = None,
) -> Path:
    """Write ``<id>.png`` (palette PNG of class indices) and ``<id>_overlay.png``; return the mask path.

    ``image``: uint8 ``(3, H, W)``; ``pred``: uint8 ``(H, W)`` class indices. Files are written
    atomically; with ``outputs`` (the run's :class:`~tasks.outputs.OutputFolder` of ``out_dir``)
    recorded in its manifest, never over a file it did not write.
    """

    def opened(name: str) -> Any:
        return outputs.write(name) if outputs is not None else atomic_path(Path(out_dir) / name)

    palette = voc_palette()
    mask_path = Path(out_dir) / f"{sample_id}.png"
    png = Image.fromarray(pred.numpy(), mode="P")
    png.putpalette(palette)
    with opened(f"{sample_id}.png") as tmp:
        png.save(tmp, format="PNG")
    classes = torch.arange(1, num_classes)  # background stays unpainted
    colors = [tuple(palette[3 * k : 3 * k + 3]) for k in classes.tolist()]
    overlay = draw_segmentation_masks(image, pred[None] == classes[:, None, None], alpha=alpha, colors=colors)
    with opened(f"{sample_id}_overlay.png") as tmp:
        Image.fromarray(overlay.permute(1, 2, 0).numpy()).save(tmp, format="PNG")
    return mask_path


class SegmentationWriter(PredictionWriter):
    """Writes ``<output_dir>/<id>.png`` (palette PNG of class indices, VOC colours) and
    ``<id>_overlay.png`` (the image with the coloured mask blended in, ``model.overlay_alpha``)
    for every image ``predict`` segments, then ``<output_dir>/_COMPLETE`` last (JSON: images,
    skipped), by the protocol of :class:`tasks.writer.PredictionWriter`.

    ``predict_step`` returns ``(position in the batch, id, uint8 mask)`` per image; each is
    replaced by the mask's path once written, so ``trainer.predict`` returns the paths written and
    no mask stays in memory.
    """

    by = "segment predict"

    def __init__(self, output_dir: str = "outputs/segment") -> None:
        super().__init__(output_dir)
        self.written = 0
        self.logged = 0

    def reset(self) -> None:
        self.written = 0
        self.logged = 0

    def write_batch(self, pl_module: Any, prediction: Any, batch: Any) -> None:
        for k, (i, sid, mask) in enumerate(prediction):
            image = batch["image"][i].cpu()
            alpha = getattr(pl_module, "overlay_alpha", 0.5)
            path = write_prediction(self.output_dir, sid, image, mask, pl_module.num_classes, alpha, self.outputs)
            prediction[k] = str(path)
            if self.logged < LOGGED_OVERLAYS and pl_module.global_rank == 0:  # the first few reach the loggers
                log_picture(pl_module, "predict/overlay", self.output_dir / f"{sid}_overlay.png", step=self.logged)
                self.logged += 1
        self.written += len(prediction)

    def gather(self) -> int:
        return sum(all_gather_objects(self.written))

    def message(self, count: int, skipped: list[SkippedSample]) -> str:
        return f"predict: {count} masks and overlays written to {self.output_dir}"
