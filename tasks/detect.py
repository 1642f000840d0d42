"""Object detection: Faster R-CNN on VGGBackbone with LightningCLI.

``python -m tasks.detect fit|validate|test|predict --config configs/detect/<name>.yaml``

* :class:`DetectionData`: COCO JSON or PASCAL VOC (see :mod:`tasks.data.detection`), or the
  synthetic shapes dataset generated on first use (``data.shapes``).
* :class:`DetectionTask`: :func:`vggbackbone.models.fasterrcnn_vgg` + SGD/AdamW, warm-up and
  step/cosine schedules (:mod:`tasks.core`); validation/test run COCOeval (and VOC07 mAP for
  VOC data) once over the whole set, with predictions gathered from every process.
* :class:`DetectionWriter` (``writer.*``): ``predict`` writes a COCO results JSON and the
  images with boxes, labels and scores drawn.

Every argument is in the YAML and can be overridden on the command line
(``--model.optim.lr 0.005``, ``--trainer.devices 2``).
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pytorch_lightning.callbacks import BasePredictionWriter
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.ops.misc import FrozenBatchNorm2d

from tasks.core import (
    EvalReport,
    OptimConfig,
    TaskDataModule,
    TaskModule,
    all_gather_objects,
    backbone_weights,
    cli_main,
    gather_unique,
    is_global_zero,
    publish_metrics,
    write_json,
)
from tasks.data.detection import (
    VOC_CLASSES,
    DetectionBatch,
    DetectionDataset,
    DetectionSplit,
    ImageFolderDataset,
    collate_detection,
    detection_transforms,
    find_coco_images,
    read_coco,
    read_voc,
)
from tasks.data.shapes import CLASSES as SHAPES_CLASSES
from tasks.data.shapes import ShapesConfig, ensure_shapes
from vggbackbone import get_config
from vggbackbone.metrics import coco_evaluate, detections_to_coco, voc_evaluate
from vggbackbone.models import fasterrcnn_vgg
from vggbackbone.utils import atomic_path

__all__ = ["DetectionData", "DetectionTask", "DetectionWriter", "evaluate_split", "main"]


# ---------------------------------------------------------------------------- data
class DetectionData(TaskDataModule):
    """Detection data from a COCO or PASCAL VOC tree.

    Args:
        root: dataset root. COCO: holds ``annotations/instances_<set>.json`` and the images
            (``images/<set>/`` or ``<set>/``). VOC: holds ``VOCdevkit/`` (or is it).
        format: ``coco`` or ``voc``.
        train_set, val_set: set names (COCO: ``train2017``; VOC: ``trainval``,
            ``VOC2012/trainval``, ``VOC2007/trainval+VOC2012/trainval``).
        test_set: set for ``test`` (default: ``val_set``; VOC07: ``test``).
        train_ann, val_ann, test_ann: COCO only: explicit annotation files (override the set name).
        train_images, val_images, test_images: COCO only: explicit image folders.
        predict_path: images for ``predict``: a folder, an image, or a text file of paths
            (default: the validation images, with their ids).
        classes: VOC: object class names in label order (default: VOC's 20). COCO: taken from
            the file's categories; if given, must match them.
        train_difficult: train on VOC ``difficult`` objects too (the paper's code does not).
        hflip: horizontal flip probability in training.
        photometric: probability of each photometric distortion in training.
        shapes: generate the synthetic shapes dataset with these settings into ``root`` when
            it is missing or was made with other settings (the demo).
        batch_size, eval_batch_size, num_workers: loaders (``batch_size`` per process).
    """

    def __init__(
        self,
        root: str = "data/shapes",
        format: Literal["coco", "voc"] = "coco",
        train_set: str = "train",
        val_set: str = "val",
        test_set: str | None = None,
        train_ann: str | None = None,
        val_ann: str | None = None,
        test_ann: str | None = None,
        train_images: str | None = None,
        val_images: str | None = None,
        test_images: str | None = None,
        predict_path: str | None = None,
        classes: list[str] | None = None,
        train_difficult: bool = False,
        hflip: float = 0.5,
        photometric: float = 0.5,
        shapes: ShapesConfig | None = None,
        batch_size: int = 2,
        eval_batch_size: int | None = None,
        num_workers: int = 2,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers)
        self.save_hyperparameters(ignore=["classes"])  # the model's hparams hold the resolved classes
        self.root = Path(root)
        self.format = format
        self.sets = {"train": train_set, "val": val_set, "test": test_set or val_set}
        self.anns = {"train": train_ann, "val": val_ann, "test": test_ann}
        self.image_dirs = {"train": train_images, "val": val_images, "test": test_images}
        self.predict_path = predict_path
        self._classes = list(classes) if classes is not None else None
        self.train_difficult = train_difficult
        self.hflip, self.photometric = hflip, photometric
        self.shapes = shapes
        self._splits: dict[str, DetectionSplit] = {}
        self._categories: list[dict[str, Any]] | None = None

    # -- classes (linked to the model at instantiation, before any data is read) --
    @property
    def classes(self) -> list[str]:
        """Class names in label order (label 0 is background)."""
        if self._classes is not None:
            return self._classes
        if self.shapes is not None:
            return list(SHAPES_CLASSES)
        if self.format == "voc":
            return list(VOC_CLASSES)
        return [c["name"] for c in self._file_categories()]

    @property
    def category_ids(self) -> list[int]:
        """COCO category id of each label (results JSON); ``1..K`` unless a COCO file says otherwise."""
        if self.format == "coco" and self.shapes is None and self._classes is None:
            return [int(c["id"]) for c in self._file_categories()]
        return list(range(1, len(self.classes) + 1))

    def _file_categories(self) -> list[dict[str, Any]]:
        """``categories`` of the first COCO annotation file found (val first: the smallest), by id."""
        if self._categories is None:
            for stage in ("val", "train", "test"):
                ann = self._ann_file(stage)
                if not ann.is_file():
                    continue
                try:
                    cats = json.loads(ann.read_text()).get("categories") or []
                except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
                    raise ValueError(f"{ann}: cannot read the categories ({e})") from e
                if not cats:
                    raise ValueError(f"{ann}: no categories listed")
                self._categories = sorted(cats, key=lambda c: c["id"])
                break
            else:
                raise FileNotFoundError(
                    f"{self.root}: no COCO annotation file to read the class names from "
                    f"(looked for {self._ann_file('val')} and {self._ann_file('train')})"
                )
        return self._categories

    def _ann_file(self, stage: str) -> Path:
        explicit = self.anns[stage]
        return Path(explicit) if explicit else self.root / "annotations" / f"instances_{self.sets[stage]}.json"

    def split(self, stage: Literal["train", "val", "test"]) -> DetectionSplit:
        """Read (once) the records of ``stage``."""
        if stage not in self._splits:
            if self.format == "coco":
                image_dir = self.image_dirs[stage]
                images = Path(image_dir) if image_dir else find_coco_images(self.root, self.sets[stage])
                split = read_coco(self._ann_file(stage), images)
                if self._classes is not None and split.classes != self._classes:
                    raise ValueError(
                        f"{split.source}: categories {split.classes} differ from data.classes {self._classes}"
                    )
            elif self.format == "voc":
                split = read_voc(self.root, self.sets[stage], self.classes)
            else:
                raise ValueError(f"data.format must be 'coco' or 'voc', got {self.format!r}")
            self._splits[stage] = split
        return self._splits[stage]

    def prepare_data(self) -> None:
        if self.shapes is not None:
            layouts = tuple(sorted(set(self.shapes.layouts) | {self.format}))
            if layouts != tuple(sorted(self.shapes.layouts)):
                raise ValueError(f"data.format is {self.format!r} but data.shapes.layouts is {self.shapes.layouts}")
            ensure_shapes(self.root, self.shapes)

    def setup(self, stage: str) -> None:
        if stage == "fit":
            self.train_set = DetectionDataset(
                self.split("train"),
                train=True,
                transforms=detection_transforms(True, self.hflip, self.photometric),
                keep_ignored=self.train_difficult,
            )
            self.val_set = DetectionDataset(self.split("val"), train=False)
        elif stage == "validate":
            self.val_set = DetectionDataset(self.split("val"), train=False)
        elif stage == "test":
            self.test_set = DetectionDataset(self.split("test"), train=False)
        elif stage == "predict":
            if self.predict_path is not None:
                self.predict_set: Dataset = ImageFolderDataset(self.predict_path)
            else:
                val = self.split("val")
                paths, ids = [r.path for r in val.records], [r.image_id for r in val.records]
                self.predict_set = ImageFolderDataset(paths, ids=ids)

    def train_dataloader(self) -> Any:
        return self.make_loader(self.train_set, train=True, collate_fn=collate_detection)

    def val_dataloader(self) -> Any:
        return self.make_loader(self.val_set, train=False, collate_fn=collate_detection)

    def test_dataloader(self) -> Any:
        return self.make_loader(self.test_set, train=False, collate_fn=collate_detection)

    def predict_dataloader(self) -> Any:
        return self.make_loader(self.predict_set, train=False, collate_fn=collate_detection)


# ---------------------------------------------------------------------------- evaluation
def evaluate_split(
    split: DetectionSplit, predictions: dict[int, dict[str, np.ndarray]], image_ids: Sequence[int] | None = None
) -> tuple[dict[str, float], list[tuple[str, list[Any]]]]:
    """COCO metrics (and VOC mAP for VOC data) of ``predictions`` on ``split``.

    ``image_ids``: the images that were evaluated (default: those in ``predictions``); the
    ground truth of other images is left out, so a partial run gives partial numbers, not
    false negatives. Returns ``(metrics, per-class table columns)``.
    """
    ids = sorted(predictions) if image_ids is None else sorted(image_ids)
    results = detections_to_coco(predictions, split.category_ids)
    metrics = coco_evaluate(split.coco_gt(ids), results, ids, per_class=True)
    per_class_ap = [metrics.pop(f"AP/{name}", -1.0) for name in split.classes]
    table: list[tuple[str, list[Any]]] = [("class", list(split.classes)), ("COCO AP", per_class_ap)]
    if split.format == "voc":
        keep = set(ids)
        gt = {
            r.image_id: {"boxes": r.boxes, "labels": r.labels, "ignore": r.ignore}
            for r in split.records
            if r.image_id in keep
        }
        voc = voc_evaluate(gt, predictions, len(split.classes), class_names=split.classes)
        metrics["VOC07_mAP"] = voc["mAP_07"]
        metrics["VOC_mAP"] = voc["mAP"]
        table.append(("VOC07 AP", [voc["AP_07"].get(n, float("nan")) for n in split.classes]))
        table.append(("VOC AP", [voc["AP"].get(n, float("nan")) for n in split.classes]))
    metrics["images"] = float(len(ids))
    return metrics, table


# ---------------------------------------------------------------------------- model
def _to_numpy(detections: dict[str, Tensor]) -> dict[str, np.ndarray]:
    """One image's ``boxes``/``scores`` (float32) and ``labels`` (int64) as numpy, on the CPU."""
    return {
        "boxes": detections["boxes"].detach().float().cpu().numpy(),
        "scores": detections["scores"].detach().float().cpu().numpy(),
        "labels": detections["labels"].detach().long().cpu().numpy(),
    }


class DetectionTask(TaskModule):
    """Faster R-CNN on VGGBackbone (:func:`vggbackbone.models.fasterrcnn_vgg`).

    Args:
        classes: object class names, label order (linked from ``data.classes``).
        category_ids: COCO category id of each label (linked from ``data.category_ids``).
        arch, weights_backbone, fpn, width_mult, frozen_stages, anchor_sizes, aspect_ratios,
            roi_pool, representation_size, box_head_dropout, min_size, max_size: see
            :func:`~vggbackbone.models.fasterrcnn_vgg`.
        detector: any other ``torchvision`` ``FasterRCNN`` argument
            (``rpn_pre_nms_top_n_train``, ``box_score_thresh``, ``box_detections_per_img``...).
        optim: optimiser and schedule (:class:`tasks.core.OptimConfig`); ``backbone_lr_mult``
            applies to the VGG (``model.backbone`` or, with the FPN, ``model.backbone.body``).
        metrics_file: where validate/test write their metrics as JSON, relative to the
            trainer's log folder (``None``: not written; see :func:`tasks.core.publish_metrics`).
        detections_file: also write the gathered detections there as COCO results, e.g.
            ``"{stage}_detections.json"`` (default ``None``: large on big sets).
    """

    def __init__(
        self,
        classes: list[str] | None = None,
        category_ids: list[int] | None = None,
        arch: str | list[list[int]] = "vgg16",
        weights_backbone: str | None = None,
        fpn: bool = False,
        width_mult: float = 1.0,
        frozen_stages: int | None = None,
        anchor_sizes: list[int] | None = None,
        aspect_ratios: list[float] = [0.5, 1.0, 2.0],  # noqa: B006 (jsonargparse needs a literal default)
        roi_pool: Literal["align", "pool"] = "align",
        representation_size: int | None = None,
        box_head_dropout: float | None = None,
        min_size: int | list[int] = 600,
        max_size: int = 1000,
        detector: dict[str, Any] | None = None,
        optim: OptimConfig = OptimConfig(  # noqa: B008
            name="sgd", lr=0.01, weight_decay=5e-4, scheduler="step", milestones=[0.75]
        ),
        metrics_file: str | None = "{stage}_metrics.json",
        detections_file: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if not classes:
            raise ValueError("model.classes is empty: link it from the data (the CLI does) or list the class names")
        self.classes = list(classes)
        self.category_ids = list(category_ids) if category_ids else list(range(1, len(self.classes) + 1))
        if len(self.category_ids) != len(self.classes):
            raise ValueError(f"{len(self.category_ids)} category ids for {len(self.classes)} classes")
        self.optim = optim
        self.backbone_path = "model.backbone.body" if fpn else "model.backbone"  # the FPN itself is new: full lr
        self.metrics_file = metrics_file
        self.detections_file = detections_file
        spec = arch if isinstance(arch, str) else [tuple(b) for b in arch]
        # a pretrained detector freezes conv1-2 and its BatchNorm; rebuilt from a checkpoint
        # (weights_backbone == WEIGHTS_IN_CHECKPOINT) it keeps that structure, loading nothing
        pretrained = weights_backbone is not None
        self.model = fasterrcnn_vgg(
            spec,
            num_classes=len(self.classes) + 1,
            weights_backbone=backbone_weights(weights_backbone),
            fpn=fpn,
            width_mult=width_mult,
            frozen_stages=(2 if pretrained else 0) if frozen_stages is None else frozen_stages,
            norm_layer=FrozenBatchNorm2d if pretrained and get_config(spec).batch_norm else None,
            anchor_sizes=anchor_sizes,
            aspect_ratios=aspect_ratios,
            roi_pool=roi_pool,
            representation_size=representation_size,
            box_head_dropout=box_head_dropout,
            min_size=min_size if isinstance(min_size, int) else tuple(min_size),
            max_size=max_size,
            **(detector or {}),
        )
        self._predictions: dict[int, dict[str, np.ndarray]] = {}
        self._skipped = 0

    def forward(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        """``images``: list of ``(3, H, W)`` floats in ``[0, 1]`` -> boxes/labels/scores per image."""
        return self.model(images)

    # -- training --
    def training_step(self, batch: DetectionBatch, batch_idx: int) -> Tensor:
        if not batch.images:  # every sample unreadable
            return self.zero_loss()
        targets = [{"boxes": t["boxes"].as_subclass(Tensor), "labels": t["labels"]} for t in batch.targets]
        losses = self.model(batch.images, targets)
        loss = sum(losses.values())
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"non-finite loss at step {self.global_step} ({ {k: float(v) for k, v in losses.items()} }); "
                f"lower model.optim.lr, raise warm-up, or set trainer.gradient_clip_val"
            )
        n = len(batch)
        self.log_dict({f"train/{k}": v for k, v in losses.items()}, batch_size=n)
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        return loss

    # -- evaluation --
    def _eval_step(self, batch: DetectionBatch) -> None:
        if not batch.images:
            return
        outputs = self.model(batch.images)
        for t, o in zip(batch.targets, outputs):
            self._predictions[int(t["image_id"])] = _to_numpy(o)

    def on_validation_epoch_start(self) -> None:
        self._predictions = {}

    def on_test_epoch_start(self) -> None:
        self._predictions = {}

    def validation_step(self, batch: DetectionBatch, batch_idx: int) -> None:
        self._eval_step(batch)

    def test_step(self, batch: DetectionBatch, batch_idx: int) -> None:
        self._eval_step(batch)

    def on_validation_epoch_end(self) -> None:
        self._finish_eval("val", self.trainer.val_dataloaders)

    def on_test_epoch_end(self) -> None:
        self._finish_eval("test", self.trainer.test_dataloaders)

    def _finish_eval(self, stage: str, loader: Any) -> None:
        # Every rank holds the predictions of its shard; gather them all (keyed by image id, so
        # a padded sampler's repeats count once), evaluate once on rank 0, share the numbers.
        predictions = gather_unique(self._predictions)
        self._predictions = {}
        if self.trainer.sanity_checking:
            return
        dataset = loader.dataset if not isinstance(loader, (list, tuple)) else loader[0].dataset
        split: DetectionSplit | None = getattr(dataset, "split", None)
        if split is None:
            raise TypeError(
                f"{stage} data must be a tasks.data.detection.DetectionDataset (its .split is the ground truth), "
                f"got {type(dataset).__name__}"
            )
        fn = self.trainer.state.fn
        last_epoch = self.trainer.max_epochs is not None and self.current_epoch + 1 >= self.trainer.max_epochs

        def compute(log_dir: Path) -> EvalReport:
            metrics, table = evaluate_split(split, predictions)
            if self.detections_file:
                results = detections_to_coco(dict(sorted(predictions.items())), split.category_ids)
                write_json(log_dir / self.detections_file.format(stage=stage), results)
            return EvalReport(metrics, title=f"{stage} ({len(predictions)} images)", table=table)

        publish_metrics(self, stage, compute, prog_bar=("AP", "AP50"), verbose=fn != "fit" or last_epoch)

    # -- prediction --
    def predict_step(self, batch: DetectionBatch, batch_idx: int) -> list[dict[str, Any]]:
        if not batch.images:
            return []
        outputs = self.inference_model(batch.images)
        return [
            {
                "image_id": int(t["image_id"]),
                "path": t.get("path"),
                "out_name": t.get("out_name"),
                **_to_numpy(o),
            }
            for t, o in zip(batch.targets, outputs)
        ]


# ---------------------------------------------------------------------------- prediction output
_COLORS = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
           (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255), (170, 110, 40)]  # fmt: skip


class DetectionWriter(BasePredictionWriter):
    """Writes what ``predict`` finds: ``detections.json`` and drawn images.

    * ``<output_dir>/detections.json``: COCO results (``image_id``, ``category_id``, ``bbox``
      xywh, ``score``), every detection the model returns, gathered from all processes;
    * ``<output_dir>/images.json``: ``[{id, file_name, width, height}]`` for those ids;
    * ``<output_dir>/images/<name>.jpg``: each image with boxes scoring at least
      ``score_threshold``, labelled ``class score``; ``<output_dir>/grid.jpg``: the first 16.

    Every file is written atomically.
    """

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

    def on_predict_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self._detections, self._images, self._grid = {}, {}, []

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
        for image, pred in zip(batch.images, prediction):
            iid = pred["image_id"]
            path = Path(pred["path"]) if pred.get("path") else Path(f"{iid}.jpg")
            h, w = image.shape[-2:]
            self._detections[iid] = {k: pred[k] for k in ("boxes", "scores", "labels")}
            self._images[iid] = {"id": iid, "file_name": str(path), "width": int(w), "height": int(h)}
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
            self._save_jpeg(drawn, self.output_dir / "images" / f"{pred.get('out_name') or path.stem}.jpg")
            if len(self._grid) < 16:
                self._grid.append(drawn)

    @staticmethod
    def _save_jpeg(image: Tensor, path: Path) -> None:
        from PIL import Image

        with atomic_path(path) as tmp:
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(tmp, format="JPEG", quality=92)

    def on_predict_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        detections = gather_unique(self._detections)
        images = gather_unique(self._images)
        grids = all_gather_objects(self._grid)
        if not is_global_zero():
            return
        category_ids = getattr(pl_module, "category_ids", None)
        if not category_ids:  # a module without them: labels are the category ids
            top = max((int(p["labels"].max(initial=0)) for p in detections.values()), default=0)
            category_ids = list(range(1, top + 1))
        results = detections_to_coco(dict(sorted(detections.items())), category_ids)
        write_json(self.output_dir / "detections.json", results)
        write_json(self.output_dir / "images.json", [images[i] for i in sorted(images)])
        drawn = [g for part in grids for g in part][:16]
        if drawn:
            self._save_jpeg(_grid(drawn), self.output_dir / "grid.jpg")
        kept = sum(int((p["scores"] >= self.score_threshold).sum()) for p in detections.values())
        print(
            f"predict: {len(images)} images, {len(results)} detections ({kept} with score >= {self.score_threshold}) "
            f"-> {self.output_dir / 'detections.json'}"
            + (f", drawn in {self.output_dir / 'images'}/" if self.draw else "")
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


# ---------------------------------------------------------------------------- CLI
def main(args: list[str] | None = None) -> Any:
    """``python -m tasks.detect fit|validate|test|predict --config configs/detect/demo.yaml``."""
    return cli_main(
        DetectionTask,
        DetectionData,
        task="detect",
        monitor=("val/AP", "max"),
        links=[
            ("data.classes", "model.classes", "instantiate"),
            ("data.category_ids", "model.category_ids", "instantiate"),
        ],
        callbacks={"writer": DetectionWriter},
        args=args,
    )


if __name__ == "__main__":
    main(sys.argv[1:])
