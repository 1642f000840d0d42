"""What ``python -m tasks.detect predict`` writes: :class:`DetectionWriter` (``writer.*`` in YAML)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pytorch_lightning.callbacks import BasePredictionWriter
from torch import Tensor

from tasks.data.detection import DetectionBatch
from tasks.distributed import all_gather_objects, gather_unique, is_global_zero
from tasks.images import SkippedSample
from tasks.outputs import COMPLETE_MARKER, OutputFolder, predict_inputs, require_some
from tasks.pathnames import name_fields
from vggbackbone.metrics import detections_to_coco

__all__ = ["DetectionWriter"]


_COLORS = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
           (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255), (170, 110, 40)]  # fmt: skip


class DetectionWriter(BasePredictionWriter):
    """Writes what ``predict`` finds: ``detections.json`` and drawn images.

    * ``<output_dir>/detections.json``: COCO results (``image_id``, ``category_id``, ``bbox``
      xywh, ``score``), every detection the model returns, gathered from all processes;
    * ``<output_dir>/images.json``: ``[{id, file_name, width, height}]`` for those ids;
    * ``<output_dir>/images/<name>.jpg``: each image with boxes scoring at least
      ``score_threshold``, labelled ``class score``; ``<output_dir>/grid.jpg``: the first 16.

    Every file is written atomically and recorded in ``<output_dir>/_MANIFEST.json``
    (:class:`tasks.outputs.OutputFolder`). A run into a folder that holds an earlier run's output
    first removes the files that run's manifest lists, and only those, so a killed run never
    leaves the earlier ``detections.json`` beside new pictures; a file no manifest lists is never
    removed nor overwritten (the run stops, naming it), and an ``output_dir`` that is, holds or
    lies inside the input images is refused. ``<output_dir>/_COMPLETE`` (JSON: images,
    detections) is written last: a folder without it holds an incomplete run. A run in which no
    image could be read fails, marking nothing complete.
    """

    #: written last, once every other file is in place
    COMPLETE = COMPLETE_MARKER

    def __init__(
        self, output_dir: str = "outputs/detect", score_threshold: float = 0.5, draw: bool = True, line_width: int = 2
    ) -> None:
        super().__init__("batch")
        self.output_dir = Path(output_dir)
        self.score_threshold = score_threshold
        self.draw = draw
        self.line_width = line_width
        self._detections: dict[int, dict[str, np.ndarray]] = {}
        self._images: dict[int, dict[str, Any]] = {}
        self._grid: list[Tensor] = []
        self._skipped: list[tuple[str, str]] = []
        self.outputs = OutputFolder(self.output_dir, "detect predict")

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "predict":
            return
        self.outputs = OutputFolder(self.output_dir, "detect predict")
        # the earlier run's files (its manifest's, the marker first) go: from here on the folder says "incomplete"
        inputs = predict_inputs(trainer.datamodule)
        self.outputs.begin(inputs=inputs, expected=("detections.json", "images.json", "grid.jpg"))

    def on_predict_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self._detections, self._images, self._grid, self._skipped = {}, {}, [], []

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self.outputs.close()  # what was written stays recorded: the next run removes it

    def write_on_batch_end(
        self,
        trainer: Any,
        pl_module: Any,
        prediction: Any,
        batch_indices: Any,
        batch: DetectionBatch,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        from torchvision.utils import draw_bounding_boxes

        classes = getattr(pl_module, "classes", None) or []
        self._skipped += batch.skipped
        for image, pred in zip(batch.images, prediction):
            iid = pred["image_id"]
            path = Path(pred["path"]) if pred.get("path") else Path(f"{iid}.jpg")
            h, w = image.shape[-2:]
            if not all(np.isfinite(pred[k]).all() for k in ("boxes", "scores")):
                raise FloatingPointError(
                    f"predict: non-finite boxes or scores for {path}: the model's weights or this image "
                    "produce NaN/inf; nothing more is written"
                )
            self._detections[iid] = {k: pred[k] for k in ("boxes", "scores", "labels")}
            self._images[iid] = {"id": iid, **name_fields(path), "width": int(w), "height": int(h)}  # tasks.pathnames
            if not self.draw:
                continue
            keep = pred["scores"] >= self.score_threshold
            labels = pred["labels"][keep]
            names = [
                f"{classes[lab - 1] if 0 < lab <= len(classes) else lab} {s:.2f}"
                for lab, s in zip(labels.tolist(), pred["scores"][keep])
            ]
            canvas = (image.detach().cpu().clamp(0, 1) * 255).to(torch.uint8)
            drawn = draw_bounding_boxes(
                canvas,
                torch.as_tensor(pred["boxes"][keep]).reshape(-1, 4),
                labels=names,
                colors=[_COLORS[(int(lab) - 1) % len(_COLORS)] for lab in labels],
                width=self.line_width,
            )
            self._save_jpeg(drawn, f"images/{pred.get('out_name') or path.stem}.jpg")
            if len(self._grid) < 16:
                self._grid.append(drawn)

    def _save_jpeg(self, image: Tensor, rel: str) -> None:
        from PIL import Image

        with self.outputs.write(rel) as tmp:
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(tmp, format="JPEG", quality=92)

    def on_predict_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        detections = gather_unique(self._detections)
        images = gather_unique(self._images)
        grids = all_gather_objects(self._grid)
        skipped = [SkippedSample(*s) for part in all_gather_objects(self._skipped) for s in part]
        source = getattr(trainer.datamodule, "predict_images", None) or getattr(trainer.datamodule, "root", "?")
        require_some(len(images), "detect predict", source, skipped, on_error=self.outputs.close)
        if is_global_zero():
            self._write_results(pl_module, detections, images, grids)
        kept = sum(int((p["scores"] >= self.score_threshold).sum()) for p in detections.values())
        self.outputs.finish({"images": len(images), "detections": sum(len(p["scores"]) for p in detections.values())})
        if is_global_zero():
            print(
                f"predict: {len(images)} images, {sum(len(p['scores']) for p in detections.values())} detections "
                f"({kept} with score >= {self.score_threshold}) -> {self.output_dir / 'detections.json'}"
                + (f", drawn in {self.output_dir / 'images'}/" if self.draw else "")
            )

    def _write_results(self, pl_module: Any, detections: dict, images: dict, grids: list[list[Tensor]]) -> None:
        """``detections.json``, ``images.json`` and ``grid.jpg``, on global rank 0."""
        ids_of = getattr(pl_module, "output_category_ids", None)  # the data file's ids, by name (tasks.classes)
        category_ids = ids_of() if callable(ids_of) else getattr(pl_module, "category_ids", None)
        if not category_ids:  # a module without them: labels are the category ids
            top = max((int(p["labels"].max(initial=0)) for p in detections.values()), default=0)
            category_ids = list(range(1, top + 1))
        results = detections_to_coco(dict(sorted(detections.items())), category_ids)
        for name, obj in (("detections.json", results), ("images.json", [images[i] for i in sorted(images)])):
            with self.outputs.write(name) as tmp:
                tmp.write_text(json.dumps(obj, indent=2, default=float))
        drawn = [g for part in grids for g in part][:16]
        if drawn:
            self._save_jpeg(_grid(drawn), "grid.jpg")


def _grid(images: list[Tensor], cell: int = 256) -> Tensor:
    """Square-ish grid of uint8 images, each letterboxed into ``cell x cell``."""
    from torchvision.transforms.v2.functional import pad, resize
    from torchvision.utils import make_grid

    cells = []
    for im in images:
        h, w = im.shape[-2:]
        s = cell / max(h, w)
        r = resize(im, [max(1, round(h * s)), max(1, round(w * s))], antialias=True)
        cells.append(pad(r, [0, 0, cell - r.shape[-1], cell - r.shape[-2]], fill=255))
    return make_grid(torch.stack(cells), nrow=math.ceil(math.sqrt(len(cells))), padding=4, pad_value=255)
