"""Object detection on VGGBackbone (Faster R-CNN, SSD, RetinaNet, FCOS) with LightningCLI.

``python -m tasks.detect fit|validate|test|predict --config configs/detect/<name>.yaml``

* :class:`~tasks.data.detection.DetectionDataModule`: COCO JSON or PASCAL VOC, or the synthetic
  shapes dataset generated on first use (``data.synthetic``).
* :class:`DetectionTask`: a detector family from :data:`DETECTORS` (``model.family``: ``ssd``, ``retinanet``,
  ``fcos`` or the default
  ``fasterrcnn``: :func:`vggbackbone.models.fasterrcnn_vgg`) + SGD/AdamW, warm-up and
  step/cosine schedules (:mod:`tasks.optim`); validation/test run COCOeval (and VOC07 mAP for
  VOC data) once over the whole set, with predictions gathered from every process.
* :class:`DetectionWriter` (``writer.*``): ``predict`` writes a COCO results JSON and the
  images with boxes, labels and scores drawn.

Every argument is in the YAML and can be overridden on the command line
(``--model.optim.lr 0.005``, ``--trainer.devices 2``).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from tasks.builders import BuilderArgs, builder_signature
from tasks.checkpoint import backbone_weights
from tasks.classes import ClassMap, ClassSet, update_hparams
from tasks.cli import cli_main
from tasks.data.detection import DetectionBatch, DetectionDataModule, DetectionSplit
from tasks.deprecation import old_names
from tasks.detect_writer import DetectionWriter
from tasks.distributed import gather_unique
from tasks.ema import EMAConfig
from tasks.module import TaskModule
from tasks.optim import OptimConfig
from tasks.reporting import EvalReport, publish_metrics, write_json
from tasks.tta import TTAConfig, detect_outputs, model_nms
from vggbackbone.metrics import coco_evaluate, detections_to_coco, voc_evaluate
from vggbackbone.models import ModelEntry, TaskModels, create_model

__all__ = ["DETECTORS", "DetectionDataModule", "DetectionTask", "DetectionWriter", "Detector", "evaluate_split", "main"]

__getattr__ = old_names(__name__, {"DetectionData": lambda: DetectionDataModule})


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
    if split.layout == "voc":
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


@dataclass(frozen=True)
class Detector:
    """A detector family of :class:`DetectionTask` (``model.family`` in YAML), as the registry
    (:mod:`vggbackbone.models.registry`, task ``detect``) holds it.

    Args:
        builder: ``builder(arch, num_classes (with background), weights_backbone, **options)``
            returning a torchvision detector (list of ``(3, H, W)`` images in ``[0, 1]`` in); its
            ``pretrained`` flag gives the structure a pretrained detector has (frozen stages,
            frozen BatchNorm), also when a checkpoint rebuilds it without loading the weights.
        backbone_path: where the pretrained VGG sits in the task, given the options
            (``backbone_lr_mult`` aims there).
    """

    builder: Callable[..., nn.Module]
    backbone_path: Callable[[Mapping[str, Any]], str]


def _detector(entry: ModelEntry) -> Detector:
    return Detector(entry.builder, lambda options: f"model.{entry.backbone_path(options)}")


#: Detector families by ``model.family``: a view of the registry's ``detect`` models (adding one is a
#: builder and a :func:`~vggbackbone.models.register_model` call).
DETECTORS: Mapping[str, Detector] = TaskModels("detect", _detector)

_BUILDER_ARGS = BuilderArgs(
    TaskModels("detect"),
    supplied=frozenset({"num_classes", "weights_backbone"}),
    # ssd_vgg's ``weights`` (a whole SSD file) is not offered: a task starts from backbone weights
    excluded=frozenset({"norm_layer", "progress", "weights"}),
    passthrough="detector",
)


@builder_signature(_BUILDER_ARGS)
class DetectionTask(TaskModule):
    """A detector on VGGBackbone, built by the family's builder (:data:`DETECTORS`).

    Args:
        classes: object class names, label order (linked from ``data.classes``).
        category_ids: COCO category id of each label (linked from ``data.category_ids``).
        family: detector family, a key of :data:`DETECTORS` (``fasterrcnn``).
        weights_backbone: backbone weights (path or torchvision name); pretrained, the detector
            freezes conv1-2 and its BatchNorm unless told otherwise (``pretrained``, among the
            builder's options: default ``null``, i.e. when ``weights_backbone`` is set; the
            checkpoint stores what it was, so a rebuilt model has the same structure).
        optim: optimiser and schedule (:class:`tasks.optim.OptimConfig`); ``backbone_lr_mult``
            applies to the VGG (``model.backbone`` or, with the FPN, ``model.backbone.body``).
        metrics_file: where validate/test write their metrics as JSON, relative to the
            trainer's log folder (``None``: not written; see :func:`tasks.reporting.publish_metrics`).
        detections_file: also write the gathered detections there as COCO results, e.g.
            ``"{stage}_detections.json"`` (default ``None``: large on big sets).
        ema: an exponential moving average of the weights, used by evaluation, checkpoints,
            ``predict`` and ``export`` (:class:`tasks.ema.EMAConfig`; default ``null``: none).
        tta: test-time augmentation of evaluation and ``predict`` (:class:`tasks.tta.TTAConfig`;
            default ``null``: none).
        **model_kwargs: the builder's own options, with its defaults (``arch``, ``fpn``,
            ``width_mult``, ``frozen_stages``, ``anchor_sizes``, ``aspect_ratios``, ``roi_pool``,
            ``min_size``... of :func:`~vggbackbone.models.fasterrcnn_vgg`), and ``detector``: any
            other argument of the torchvision detector (``rpn_pre_nms_top_n_train``,
            ``box_score_thresh``...). An unknown option is an error naming it.
    """

    builder_option = "family"
    writer_class = DetectionWriter

    def __init__(
        self,
        classes: list[str] | None = None,
        category_ids: list[int] | None = None,
        family: str = "fasterrcnn",
        weights_backbone: str | None = None,
        optim: OptimConfig = OptimConfig(  # noqa: B008
            name="sgd", lr=0.01, weight_decay=5e-4, scheduler="step", milestones=[0.75]
        ),
        metrics_file: str | None = "{stage}_metrics.json",
        detections_file: str | None = None,
        ema: EMAConfig | None = None,
        tta: TTAConfig | None = None,
        **model_kwargs: Any,
    ) -> None:
        super().__init__()
        options = _BUILDER_ARGS.resolve("model", family, model_kwargs)
        self.averaging_options(ema, tta, "detect")
        if not classes:
            raise ValueError("model.classes is empty: link it from the data (the CLI does) or list the class names")
        self.classes = list(classes)
        self.category_ids = list(category_ids) if category_ids else list(range(1, len(self.classes) + 1))
        if len(self.category_ids) != len(self.classes):
            raise ValueError(f"{len(self.category_ids)} category ids for {len(self.classes)} classes")
        self.optim = optim
        detector = DETECTORS[family]
        self.backbone_path = detector.backbone_path(options)
        self.metrics_file = metrics_file
        self.detections_file = detections_file
        if not isinstance(options.get("arch", ""), str):
            options["arch"] = [tuple(b) for b in options["arch"]]
        if isinstance(options.get("min_size"), list):
            options["min_size"] = tuple(options["min_size"])
        if options.get("pretrained") is None:  # in_checkpoint too: the checkpoint's weights were pretrained
            options["pretrained"] = weights_backbone is not None
            update_hparams(self, pretrained=options["pretrained"])
        extra = model_kwargs.get("detector") or {}
        self.model = create_model(  # the registry's builder; remembers its options (save_pretrained)
            family,
            num_classes=len(self.classes) + 1,
            weights_backbone=backbone_weights(weights_backbone),
            **options,
            **extra,
        )
        self._predictions: dict[int, dict[str, np.ndarray]] = {}

    def forward(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        """``images``: list of ``(3, H, W)`` floats in ``[0, 1]`` -> boxes/labels/scores per image."""
        return self.model(images)

    def export_example(self, height: int, width: int) -> Any:
        """Detectors take a list of images: one ``(3, H, W)`` image is the example."""
        return torch.rand(3, height, width)

    # -- classes (tasks.classes): the model's are the truth, every split is checked against them --
    def class_set(self) -> ClassSet:
        """The model's class names in label order and the COCO category id of each."""
        source = self.classes_source("the model (model.classes)")
        return ClassSet(tuple(self.classes), source, category_ids=tuple(self.category_ids))

    def class_set_from_hparams(self, hparams: Mapping[str, Any], source: str) -> ClassSet | None:
        classes = hparams.get("classes")
        if not classes:
            return None
        return ClassSet(tuple(classes), source, category_ids=tuple(hparams.get("category_ids") or ()) or None)

    def data_class_set(self, datamodule: Any, name: str) -> ClassSet | None:
        """A split's classes (its COCO file's category ids too); ``predict`` on an image folder: ``data.classes``."""
        split = _data_split(datamodule, name)
        if split is not None:
            ids = tuple(split.category_ids) if split.layout == "coco" else None
            return ClassSet(tuple(split.classes), split.source, category_ids=ids)
        explicit = getattr(datamodule, "_classes", None) if name == "predict" else None
        return ClassSet(tuple(explicit), "data.classes") if explicit else None

    def adopt_class_set(self, classes: ClassSet) -> None:
        if classes.names is None:
            return
        self.classes = list(classes.names)
        ids = classes.category_ids
        self.category_ids = list(ids) if ids is not None else list(range(1, len(self.classes) + 1))
        update_hparams(self, classes=list(self.classes), category_ids=list(self.category_ids))

    def output_category_ids(self) -> list[int]:
        """The category id of each label in what ``predict`` writes: the data file's (by name) when
        predicting on a COCO split, else the model's."""
        cmap = self.class_map("predict")
        return list(cmap.category_ids) if cmap is not None and cmap.category_ids else list(self.category_ids)

    def _model_split(self, split: DetectionSplit, name: str) -> DetectionSplit:
        """``split`` with the model's labels (:meth:`class_map` of ``name`` applied), relabelled once."""
        cmap = self.class_map(name)
        if cmap is None:
            return split
        done = self.__dict__.setdefault("_model_splits", {}).get(name)
        if done is None or done[0] is not split or done[1] is not cmap:
            ids = cmap.category_ids or self.category_ids
            done = (split, cmap, split.relabelled(cmap.index, self.classes, ids))
            self.__dict__["_model_splits"][name] = done
        return done[2]

    def setup(self, stage: str) -> None:
        """Classes checked (:meth:`TaskModule.setup`); the data's training resize (``data.fixed_size``) must be
        the model's own fixed size (SSD's ``size``)."""
        super().setup(stage)
        fixed = getattr(getattr(self.trainer, "datamodule", None), "fixed_size", None) if self._trainer else None
        if stage == "fit" and fixed is not None:
            model_size = getattr(getattr(self.model, "transform", None), "fixed_size", None)
            if model_size is None or tuple(model_size) != (fixed, fixed):
                raise ValueError(
                    f"data.fixed_size is {fixed} but the {self.hparams['family']} model resizes to "
                    f"{'min_size/max_size, not a fixed size' if model_size is None else tuple(model_size)}: "
                    f"training and evaluation would see objects at different scales; set data.fixed_size to "
                    f"the model's size (SSD: model.size) or to null"
                )

    # -- training --
    def training_step(self, batch: DetectionBatch, batch_idx: int) -> Tensor:
        if not batch.images:  # every sample unreadable
            return self.zero_loss()
        cmap = self.class_map("train")  # the data's labels as the model's, by name (tasks.classes)
        targets = [
            {
                "boxes": t["boxes"].as_subclass(Tensor),
                "labels": t["labels"] if cmap is None else cmap.apply(t["labels"], 1),
            }
            for t in batch.targets
        ]
        losses = self.model(batch.images, targets)
        loss = sum(losses.values())
        n = len(batch)  # a non-finite loss stops the run in TaskModule.on_before_backward, naming these terms
        self.log_dict({f"train/{k}": v for k, v in losses.items()}, batch_size=n)
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        return loss

    # -- evaluation --
    def eval_epoch_start(self, stage: str) -> None:
        self._predictions = {}

    def eval_step(self, batch: DetectionBatch) -> None:
        if not batch.images:
            return
        # one image at a time: a batch is padded to its largest image (GeneralizedRCNNTransform), and
        # padding changes the detections, so batched metrics would depend on how images are grouped
        # (eval_batch_size, number of processes); unpadded, they do not
        outputs = [detect_outputs(self.model, [image], self.tta)[0] for image in batch.images]  # model.tta: + flip
        for t, o in zip(batch.targets, outputs):
            self._predictions[int(t["image_id"])] = _to_numpy(o)

    def eval_epoch_end(self, stage: str) -> None:
        # Every rank holds the predictions of its shard; gather them all (keyed by image id, so
        # a padded sampler's repeats count once), evaluate once on rank 0, share the numbers.
        predictions = gather_unique(self._predictions)
        self._predictions = {}
        if self.trainer.sanity_checking:
            return
        loader = self.trainer.val_dataloaders if stage == "val" else self.trainer.test_dataloaders
        dataset = loader.dataset if not isinstance(loader, (list, tuple)) else loader[0].dataset
        split: DetectionSplit | None = getattr(dataset, "split", None)
        if split is None:
            raise TypeError(
                f"{stage} data must be a tasks.data.detection.DetectionDataset (its .split is the ground truth), "
                f"got {type(dataset).__name__}"
            )
        split = self._model_split(split, stage)  # ground truth in the model's labels, the file's category ids
        fn = self.trainer.state.fn
        last_epoch = self.trainer.max_epochs is not None and self.current_epoch + 1 >= self.trainer.max_epochs

        def compute(log_dir: Path) -> EvalReport:
            metrics, table = evaluate_split(split, predictions)
            if self.detections_file:
                results = detections_to_coco(dict(sorted(predictions.items())), split.category_ids)
                write_json(log_dir / self.detections_file.format(stage=stage), results)
            per_class = {col: dict(zip(table[0][1], values)) for col, values in table[1:]}  # by class name
            return EvalReport(
                metrics, extra={"per_class": per_class}, title=f"{stage} ({len(predictions)} images)", table=table
            )

        publish_metrics(self, stage, compute, prog_bar=("AP", "AP50"), verbose=fn != "fit" or last_epoch)

    # -- prediction --
    def predict_step(self, batch: DetectionBatch, batch_idx: int) -> list[dict[str, Any]]:
        if not batch.images:
            return []
        outputs = detect_outputs(self.inference_model, batch.images, self.tta, model_nms(self.model))
        return [
            {
                "image_id": int(t["image_id"]),
                "path": t.get("path"),
                "out_name": t.get("out_name"),
                **_to_numpy(o),
            }
            for t, o in zip(batch.targets, outputs)
        ]


def _labels(labels: Tensor, cmap: ClassMap | None) -> Tensor:
    """Training labels of the data (1..K) as the model's (by name, :class:`~tasks.classes.ClassMap`)."""
    return labels if cmap is None else cmap.apply(labels, offset=1)


def _data_split(datamodule: Any, name: str) -> DetectionSplit | None:
    """The split the datamodule's ``name`` dataset is read from (``None``: an image folder, no annotations)."""
    split_of = getattr(datamodule, "split_of", None)
    if callable(split_of):
        return split_of(name)
    return getattr(getattr(datamodule, f"{name}_set", None), "split", None)


# ---------------------------------------------------------------------------- CLI
def main(args: list[str] | None = None) -> Any:
    """``python -m tasks.detect fit|validate|test|predict --config configs/detect/demo.yaml``."""
    return cli_main(
        DetectionTask,
        DetectionDataModule,
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
