"""What ``python -m tasks.detect predict`` writes: :class:`DetectionWriter` (``writer.*`` in YAML)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from tasks.data.detection import DetectionBatch
from tasks.distributed import all_gather_objects, gather_unique
from tasks.pathnames import name_fields
from tasks.pictures import log_picture
from tasks.skips import SkippedSample
from tasks.writer import PredictionWriter
from vggbackbone.metrics import detections_to_coco

__all__ = ["DetectionWriter"]


_COLORS = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
           (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255), (170, 110, 40)]  # fmt: skip


class DetectionWriter(PredictionWriter):
    """Writes what ``predict`` finds: ``detections.json`` and drawn images.

    * ``<output_dir>/detections.json``: COCO results (``image_id``, ``category_id``, ``bbox``
      xywh, ``score``), every detection the model returns, gathered from all processes;
    * ``<output_dir>/images.json``: ``[{id, file_name, width, height}]`` for those ids;
    * ``<output_dir>/images/<name>.jpg``: each image with boxes scoring at least
      ``score_threshold``, labelled ``class score``; ``<output_dir>/grid.jpg``: the first 16;
    * with ``yolo_txt``, ``<output_dir>/labels/<name>.txt``: the boxes scoring at least
      ``score_threshold`` as YOLO label lines ``class cx cy w h`` (class index 0-based in the
      model's class order, coordinates normalised by the image size, 6 decimals; an image without
      such a box gets an empty file), ready to be read back by ``data.layout: yolo``.

    The files are written by the protocol of :class:`tasks.writer.PredictionWriter`: recorded in
    ``<output_dir>/_MANIFEST.json``, an earlier run's files removed first (only those its manifest
    lists), a file no manifest lists never removed nor overwritten (the run stops, naming it), an
    ``output_dir`` that is, holds or lies inside the input images refused, and
    ``<output_dir>/_COMPLETE`` (JSON: images, detections) written last: a folder without it holds
    an incomplete run. A run in which no image could be read fails, marking nothing complete.
    """

    by = "detect predict"

    def __init__(
        self,
        output_dir: str = "outputs/detect",
        score_threshold: float = 0.5,
        draw: bool = True,
        line_width: int = 2,
        yolo_txt: bool = False,
    ) -> None:
        super().__init__(output_dir)
        self.score_threshold = score_threshold
        self.draw = draw
        self.line_width = line_width
        self.yolo_txt = yolo_txt
        self.reset()

    def expected_files(self) -> list[str]:
        return ["detections.json", "images.json", "grid.jpg"]

    def reset(self) -> None:
        self._detections: dict[int, dict[str, np.ndarray]] = {}
        self._images: dict[int, dict[str, Any]] = {}
        self._grid: list[Tensor] = []
        self._grids: list[list[Tensor]] = []

    def write_batch(self, pl_module: Any, prediction: Any, batch: DetectionBatch) -> None:
        from torchvision.utils import draw_bounding_boxes

        classes = getattr(pl_module, "classes", None) or []
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
            keep = pred["scores"] >= self.score_threshold
            if self.yolo_txt:
                self._write_yolo(f"labels/{pred.get('out_name') or path.stem}.txt", pred, keep, int(w), int(h))
            if not self.draw:
                continue
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

    def _write_yolo(self, rel: str, pred: dict[str, Any], keep: np.ndarray, w: int, h: int) -> None:
        """YOLO label lines of the kept boxes: ``class cx cy w h``, normalised (see the class docstring)."""
        boxes = np.asarray(pred["boxes"], np.float64).reshape(-1, 4)[keep]
        lines = [
            f"{int(lab) - 1} {(x0 + x1) / 2 / w:.6f} {(y0 + y1) / 2 / h:.6f} {(x1 - x0) / w:.6f} {(y1 - y0) / h:.6f}\n"
            for lab, (x0, y0, x1, y1) in zip(np.asarray(pred["labels"])[keep].tolist(), boxes.tolist())
        ]
        with self.outputs.write(rel) as tmp:
            tmp.write_text("".join(lines))

    def _save_jpeg(self, image: Tensor, rel: str) -> None:
        from PIL import Image

        with self.outputs.write(rel) as tmp:
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(tmp, format="JPEG", quality=92)

    def gather(self) -> int:
        self._detections = gather_unique(self._detections)
        self._images = gather_unique(self._images)
        self._grids = all_gather_objects(self._grid)
        return len(self._images)

    def write_results(self, pl_module: Any) -> None:
        """``detections.json``, ``images.json`` and ``grid.jpg``, on global rank 0."""
        detections, images = self._detections, self._images
        ids_of = getattr(pl_module, "output_category_ids", None)  # the data file's ids, by name (tasks.classes)
        category_ids = ids_of() if callable(ids_of) else getattr(pl_module, "category_ids", None)
        if not category_ids:  # a module without them: labels are the category ids
            top = max((int(p["labels"].max(initial=0)) for p in detections.values()), default=0)
            category_ids = list(range(1, top + 1))
        results = detections_to_coco(dict(sorted(detections.items())), category_ids)
        for name, obj in (("detections.json", results), ("images.json", [images[i] for i in sorted(images)])):
            with self.outputs.write(name) as tmp:
                tmp.write_text(json.dumps(obj, indent=2, default=float))
        drawn = [g for part in self._grids for g in part][:16]
        if drawn:
            self._save_jpeg(_grid(drawn), "grid.jpg")
            log_picture(pl_module, "predict/detections", self.output_dir / "grid.jpg")  # TensorBoard, MLflow, W&B

    def _count(self) -> int:
        return sum(len(p["scores"]) for p in self._detections.values())

    def summary(self, count: int, skipped: list[SkippedSample]) -> dict[str, Any]:
        return {"images": count, "detections": self._count()}

    def message(self, count: int, skipped: list[SkippedSample]) -> str:
        kept = sum(int((p["scores"] >= self.score_threshold).sum()) for p in self._detections.values())
        return (
            f"predict: {count} images, {self._count()} detections "
            f"({kept} with score >= {self.score_threshold}) -> {self.output_dir / 'detections.json'}"
            + (f", drawn in {self.output_dir / 'images'}/" if self.draw else "")
            + (f", YOLO labels in {self.output_dir / 'labels'}/" if self.yolo_txt else "")
        )


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
