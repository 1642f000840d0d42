"""``python -m tasks.segment fit|validate|test|predict --config configs/segment/<name>.yaml``.

Semantic segmentation with FCN-32s/16s/8s or U-Net on VGGBackbone (:mod:`vggbackbone.models`).

* loss: cross-entropy ignoring ``model.ignore_index`` (linked from ``data.ignore_index``, 255 by
  default), optionally plus smp's Dice or Lovasz loss; ``model.class_weights`` (a list, or
  ``median_frequency`` of the training masks, :mod:`tasks.data.class_weights`) weights the
  cross-entropy term of every loss and the per-class mean of Dice (Lovasz averages its classes
  unweighted);
* metrics over the whole evaluation set, whatever the number of processes: one confusion
  matrix per process (torchmetrics), summed across processes, then mIoU, per-class IoU, pixel
  and mean accuracy (:mod:`vggbackbone.metrics.segmentation`). Evaluation runs each image
  alone at its own size, so a prediction never depends on which images share its batch or
  process; the numbers are printed as a table, logged, and written to
  ``<log_dir>/<stage>_metrics.json`` (:func:`tasks.reporting.publish_metrics`; the IoU of a class
  absent from the set is NaN: not logged, ``null`` in the JSON);
* inference: whole image, or sliding windows for images larger than the network should see;
* ``predict`` writes ``<id>.png`` (palette PNG of class indices, VOC colours) and
  ``<id>_overlay.png`` under ``writer.output_dir``, then ``_COMPLETE`` last
  (:class:`~tasks.segment_writer.SegmentationWriter`, the protocol of every task's writer:
  :mod:`tasks.writer`). ``model.predict_dir``, the old home of the folder, still works (warned once).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassConfusionMatrix

from tasks.builders import BuilderArgs, builder_signature
from tasks.checkpoint import backbone_weights
from tasks.classes import ClassSet, update_hparams
from tasks.cli import cli_main
from tasks.data.segmentation import IGNORE_INDEX, SegmentationDataModule
from tasks.deprecation import old_names, warn_once
from tasks.ema import EMAConfig
from tasks.module import TaskModule
from tasks.optim import OptimConfig
from tasks.outputs import COMPLETE_MARKER
from tasks.reporting import EvalReport, publish_metrics
from tasks.segment_loss import aux_loss, check_weights
from tasks.segment_writer import SegmentationWriter, write_prediction
from tasks.tta import TTAConfig, segment_logits, smallest_scale
from tasks.writer import to_output_dir
from vggbackbone.metrics.segmentation import segmentation_scores
from vggbackbone.models import TaskModels, create_model, model_entry, sliding_window_logits

__all__ = [
    "PREDICT_COMPLETE",
    "SEGMENTATION_HEADS",
    "SegmentationTask",
    "SegmentationWriter",
    "build_segmentation_model",
    "main",
    "sliding_window_logits",
    "write_prediction",
]

__getattr__ = old_names(
    __name__, {"SegmentationModel": lambda: SegmentationTask, "SegmentationData": lambda: SegmentationDataModule}
)

#: ``<writer.output_dir>/_COMPLETE``: written last, once every mask of a predict run is in place
PREDICT_COMPLETE = COMPLETE_MARKER

#: Segmentation models by ``model.family`` (formerly ``model.head``): a view of the registry's
#: ``segment`` models. Adding one is a builder ``(arch, num_classes, weights_backbone, **options)``
#: and a :func:`~vggbackbone.models.register_model` call; its options become ``model.<option>`` keys.
SEGMENTATION_HEADS: Mapping[str, Callable[..., nn.Module]] = TaskModels("segment")

_BUILDER_ARGS = BuilderArgs(
    SEGMENTATION_HEADS,
    supplied=frozenset({"num_classes", "weights_backbone"}),
    excluded=frozenset({"norm_layer", "variant"}),
)

#: ``model.family`` when neither it nor its old name ``model.head`` is given.
DEFAULT_FAMILY = "fcn8s"


def build_segmentation_model(head: str, arch: str, num_classes: int, **kwargs: Any) -> nn.Module:
    """The registered segmentation model ``head`` (a ``model.family``) with ``arch``, ``num_classes``
    and its options; an unknown name is an error naming the registered ones."""
    return model_entry(head, "segment").builder(arch, num_classes, **kwargs)


def _as_float(images: Tensor) -> Tensor:
    """uint8 images -> floats in [0, 1]; floats (already in [0, 1]) as they are. The model normalises."""
    return images.float().div_(255) if images.dtype == torch.uint8 else images


@builder_signature(_BUILDER_ARGS)
class SegmentationTask(TaskModule):
    """Semantic segmentation on VGGBackbone.

    Args:
        num_classes: classes including background (linked from ``data.num_classes``).
        class_names: names for the per-class table (linked from ``data.class_names``).
        family: a registered segmentation model (:data:`SEGMENTATION_HEADS`): ``fcn32s``,
            ``fcn16s``, ``fcn8s`` (FCN-8s trained at once, with the reference skip scaling) or
            ``unet`` (smp's U-Net decoder).
        weights_backbone: backbone weights (path or torchvision weights name).
        loss: ``ce``, ``ce+dice`` or ``ce+lovasz`` (smp's losses, multiclass, ignoring ``ignore_index``).
        aux_loss_weight: weight of the Dice/Lovasz term.
        ignore_index: the mask value not trained on nor counted by the metrics (linked from
            ``data.ignore_index``, so masks, loss and metrics agree; stored in the checkpoint).
        class_weights: ``null``, one weight per class (model class order), or ``median_frequency``
            (computed from the training masks by the data module when a stage starts, cached next to
            the data and printed; stored in checkpoints): weights of the cross-entropy term of every
            ``loss`` and of Dice's per-class mean.
        inference: ``whole`` (each image at its size) or ``slide`` (``window`` crops).
        window, window_overlap: sliding-window size and overlap fraction.
        inference_scale: resize images by this factor before the network and the logits back
            to full size (metrics are always computed on the full-resolution masks); pair it
            with a matching ``data.scale_size`` to train at that resolution.
        overlay_alpha: mask opacity in the overlays ``predict`` writes (``writer.output_dir``; the
            old option ``predict_dir`` still sets that folder, warned once).
        optim: optimiser and schedule (:class:`tasks.optim.OptimConfig`); ``backbone_lr_mult``
            applies to ``model.backbone`` (where the default ``backbone_prefix`` points).
        ema: an exponential moving average of the weights, used by evaluation, checkpoints,
            ``predict`` and ``export`` (:class:`tasks.ema.EMAConfig`; default ``null``: none).
        tta: test-time augmentation of evaluation and ``predict`` (:class:`tasks.tta.TTAConfig`;
            default ``null``: none).
        head: old name of ``family`` (accepted, warned once).
        head_kwargs: old home of the builder options (accepted, warned once: write them under ``model``;
            expanded by :meth:`normalize_options`).
        **model_kwargs: the family builder's options with its defaults (``arch``, ``width_mult``,
            ``frozen_stages``, ``norm_eval``, ``pool4_scale``, ``decoder_channels``... of
            :func:`~vggbackbone.models.fcn_vgg` / :func:`~vggbackbone.models.unet_vgg`), among
            them ``normalization`` (default: what the weights carry): the model normalises the
            ``[0, 1]`` images this task gives it. An unknown option, or one of another family, is
            an error naming it.
    """

    builder_option = "family"
    renamed_options: ClassVar[Mapping[str, str]] = {"head": "family"}
    writer_class = SegmentationWriter
    moved_options: ClassVar[Mapping[str, Callable[[Any], dict[str, Any]]]] = {"predict_dir": to_output_dir}
    old_options = ("head_kwargs",)

    def __init__(
        self,
        num_classes: int = 21,
        class_names: list[str] | None = None,
        family: str = DEFAULT_FAMILY,
        weights_backbone: str | None = None,
        loss: Literal["ce", "ce+dice", "ce+lovasz"] = "ce",
        aux_loss_weight: float = 1.0,
        ignore_index: int = IGNORE_INDEX,
        class_weights: list[float] | Literal["median_frequency"] | None = None,
        inference: Literal["whole", "slide"] = "whole",
        window: int = 512,
        window_overlap: float = 1 / 3,
        inference_scale: float = 1.0,
        overlay_alpha: float = 0.5,
        optim: OptimConfig = OptimConfig(),  # noqa: B008 (jsonargparse reads the default)
        ema: EMAConfig | None = None,
        tta: TTAConfig | None = None,
        **model_kwargs: Any,
    ) -> None:
        super().__init__()
        options = _BUILDER_ARGS.resolve("model", family, model_kwargs)
        self.averaging_options(ema, tta, "segment")
        self.optim = optim
        self.num_classes = num_classes
        self.class_names = list(class_names) if class_names else [str(k) for k in range(num_classes)]
        if len(self.class_names) != num_classes:
            raise ValueError(f"{len(self.class_names)} class names for {num_classes} classes")
        self.model = create_model(  # SEGMENTATION_HEADS[family]; remembers its options (save_pretrained)
            family, num_classes=num_classes, weights_backbone=backbone_weights(weights_backbone), **options
        )
        self.ignore_index = int(ignore_index)
        if self.ignore_index < num_classes:  # the data module refuses it too; a model built alone is checked here
            raise ValueError(f"ignore_index {ignore_index} is a class index (0..{num_classes - 1})")
        self.class_weights = class_weights
        self._data_weights: list[float] | None = check_weights(class_weights, num_classes)
        self.ce = nn.CrossEntropyLoss(ignore_index=self.ignore_index)
        self.aux_loss = self._aux_loss(loss, self.ignore_index)
        self.aux_loss_weight = aux_loss_weight
        self.inference, self.window, self.window_overlap = inference, window, window_overlap
        if inference_scale <= 0:
            raise ValueError(f"inference_scale must be > 0, got {inference_scale}")
        self.inference_scale = inference_scale
        self.overlay_alpha = overlay_alpha
        self.confmat = MulticlassConfusionMatrix(num_classes, ignore_index=self.ignore_index)
        self._eval_loss: list[Tensor] = []

    def normalize_options(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """:meth:`TaskModule.normalize_options`, and ``head_kwargs`` (the old home of the builder
        options) expanded into the options themselves, warned once."""
        head_kwargs = kwargs.pop("head_kwargs", None)
        if head_kwargs:
            clash = sorted(set(head_kwargs) & set(kwargs))
            if clash:
                raise ValueError(f"model: {', '.join(clash)} given both in head_kwargs and directly")
            warn_once(
                "model",
                "head_kwargs",
                f"model.head_kwargs is deprecated: write {', '.join(sorted(head_kwargs))} directly under model",
            )
            kwargs = {**kwargs, **head_kwargs}
        return super().normalize_options(kwargs)

    _aux_loss = staticmethod(aux_loss)

    # ------------------------------------------------------------------ class weights
    def setup(self, stage: str) -> None:
        """:meth:`TaskModule.setup`, and ``median_frequency`` weights computed (or read from the data's
        cache) before training starts."""
        super().setup(stage)
        if stage == "fit" and self.class_weights == "median_frequency":
            self._data_weights = None  # the data of this run decides, not an earlier one
            self._loss_weight()

    def _loss_weight(self) -> Tensor | None:
        """The class weights in model class order ``(K,)`` on the model's device (``None``: unweighted)."""
        if self.class_weights == "median_frequency" and self._data_weights is None:
            datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
            if datamodule is None or not hasattr(datamodule, "median_frequency_weights"):
                raise ValueError("model.class_weights median_frequency needs the training masks of a data module")
            self._data_weights = [float(w) for w in datamodule.median_frequency_weights()]
        if self._data_weights is None:
            return None
        weights = torch.tensor(self._data_weights, dtype=torch.float32, device=self.device)
        cmap = self.class_map() if self.class_weights == "median_frequency" else None
        if cmap is not None:  # computed in the data's class order: moved to the model's (tasks.classes)
            weights = torch.zeros_like(weights).index_copy_(0, torch.tensor(cmap.index, device=self.device), weights)
        return weights

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """:meth:`TaskModule.on_save_checkpoint`, and the weights computed by ``median_frequency``."""
        super().on_save_checkpoint(checkpoint)
        if self.class_weights == "median_frequency" and self._data_weights is not None:
            checkpoint["median_frequency_weights"] = list(self._data_weights)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        stored = checkpoint.get("median_frequency_weights")
        if self.class_weights == "median_frequency" and stored is not None and self._data_weights is None:
            self._data_weights = check_weights([float(w) for w in stored], self.num_classes)

    # ------------------------------------------------------------------ classes (tasks.classes)
    def class_set(self) -> ClassSet:
        """The model's classes: names (background first) when it has them, and the ignore index."""
        names = tuple(self.class_names) if self.hparams.get("class_names") else None
        source = self.classes_source("the model (model.class_names)")
        return ClassSet(names, source, size=self.num_classes, ignore_index=self.ignore_index)

    def class_set_from_hparams(self, hparams: Mapping[str, Any], source: str) -> ClassSet | None:
        names = hparams.get("class_names")
        if not names and not hparams.get("num_classes"):
            return None
        size = len(names) if names else int(hparams["num_classes"])
        ignore = int(hparams.get("ignore_index", IGNORE_INDEX))
        return ClassSet(tuple(names) if names else None, source, size=size, ignore_index=ignore)

    def data_class_set(self, datamodule: Any, name: str) -> ClassSet | None:
        names = getattr(datamodule, "class_names", None)
        if not names:
            return None
        source = getattr(datamodule, "class_source", "data.classes")
        return ClassSet(tuple(names), source, ignore_index=getattr(datamodule, "ignore_index", IGNORE_INDEX))

    def adopt_class_set(self, classes: ClassSet) -> None:
        if classes.names is not None:
            self.class_names = list(classes.names)
            update_hparams(self, class_names=list(classes.names))

    def _model_masks(self, masks: Tensor) -> Tensor:
        """Mask values of the data's classes as the model's (by name, :mod:`tasks.classes`); the ignore value stays."""
        cmap = self.class_map()
        return masks if cmap is None else cmap.apply(masks, ignore_index=self.ignore_index)

    # ------------------------------------------------------------------ model
    def forward(self, images: Tensor) -> Tensor:
        """uint8 or [0, 1] float ``(N, 3, H, W)`` -> logits ``(N, K, H, W)``."""
        return self.model(_as_float(images))

    @property
    def normalization(self) -> Any:
        """The :class:`~vggbackbone.weights.InputNormalization` the model applies (it takes [0, 1] images)."""
        return self.model.normalization

    def loss(self, logits: Tensor, masks: Tensor) -> Tensor:
        """Cross-entropy (class-weighted by ``class_weights``) plus the weighted Dice/Lovasz term."""
        weight = self._loss_weight()
        loss = F.cross_entropy(logits, masks, weight=weight, ignore_index=self.ignore_index)
        if self.aux_loss is not None:
            self.aux_loss.class_weight = weight  # Dice's per-class mean (Lovasz: ignored)
            loss = loss + self.aux_loss_weight * self.aux_loss(logits, masks)
        return loss

    @torch.no_grad()
    def predict_logits(self, image: Tensor, model: nn.Module | None = None) -> Tensor:
        """Logits ``(1, K, H, W)`` of one ``(3, H, W)`` image, whole or by sliding window, at
        ``inference_scale`` (logits resized back to ``H x W``), by ``model`` (default ``self.model``);
        with ``model.tta``, the log of the mean softmax of its views (:func:`tasks.tta.segment_logits`)."""
        model = self.model if model is None else model
        return segment_logits(lambda x, scale: self._logits_at(model, x, scale), _as_float(image[None]), self.tta)

    def _logits_at(self, model: nn.Module, x: Tensor, scale: float) -> Tensor:
        """Logits ``(1, K, H, W)`` of ``x`` ``(1, 3, H, W)`` run at ``inference_scale * scale``, resized back."""
        size = x.shape[-2:]
        if self.inference_scale * scale != 1.0:
            x = F.interpolate(x, scale_factor=self.inference_scale * scale, mode="bilinear", antialias=True)
        if self.inference == "slide":
            logits = sliding_window_logits(model, x, self.window, self.window_overlap)
        else:
            logits = model(x)
        if logits.shape[-2:] != size:
            logits = F.interpolate(logits, size=size, mode="bilinear")
        return logits

    def too_small(self, image: Tensor) -> str | None:
        """Why ``image`` ``(3, H, W)`` cannot be segmented (smaller than the network's minimum input
        once scaled by ``inference_scale``), or ``None``: such images are skipped and counted."""
        h, w = image.shape[-2:]
        least_scale = self.inference_scale * smallest_scale(self.tta)  # model.tta's smallest scale too
        sh, sw = math.floor(h * least_scale), math.floor(w * least_scale)
        backbone = getattr(self.model, "backbone", None)
        least = max(1, int(getattr(backbone, "min_input_size", 1)))
        if min(sh, sw) >= least:
            return None
        by_tta = f" x model.tta scale {smallest_scale(self.tta)}" if self.tta is not None else ""
        scaled = f" ({sh}x{sw} at inference_scale {self.inference_scale}{by_tta})" if least_scale != 1.0 else ""
        return f"image is {h}x{w}{scaled}, smaller than the network's minimum input {least}x{least}"

    def _skip_small(self, batch: dict[str, Any], keys: tuple[str, ...]) -> list[tuple[Any, ...]]:
        """``(position in the batch, *keys)`` per image, images too small for the network left out
        and counted as skipped (``keys[0]`` is the image)."""
        rows = []
        for i, row in enumerate(zip(*(batch[k] for k in keys), batch["path"])):
            reason = self.too_small(row[0])
            if reason is None:
                rows.append((i, *row[:-1]))
            else:
                self.eval_skips.add([(row[-1], reason)])
        return rows

    # ------------------------------------------------------------------ steps
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        if not batch["id"]:  # every image of the batch was unreadable
            return self.zero_loss()
        logits = self(batch["image"])
        loss = self.loss(logits, self._model_masks(batch["mask"]))
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["id"]))
        return loss

    def eval_step(self, batch: dict[str, Any]) -> None:
        if batch["image"] and "mask" not in batch:
            raise ValueError(f"evaluation needs masks, but {batch['path'][0]} came without one (an image list?)")
        for _, image, mask in self._skip_small(batch, ("image", "mask")):
            mask = self._model_masks(mask)
            logits = self.predict_logits(image)
            self.confmat.update(logits.argmax(1), mask[None])
            weight = self._loss_weight()
            ce = F.cross_entropy(logits, mask[None], weight=weight, ignore_index=self.ignore_index)
            self._eval_loss.append(ce.detach())

    def eval_epoch_end(self, stage: str) -> None:
        conf = self.confmat.compute().cpu()  # summed over every process (a collective)
        self.confmat.reset()
        losses = torch.stack(self._eval_loss) if self._eval_loss else torch.zeros(0, device=self.device)
        self._eval_loss.clear()
        total = self.all_gather(torch.stack([losses.sum(), torch.tensor(float(losses.numel()), device=losses.device)]))
        total = total.reshape(-1, 2).sum(0)
        if self.trainer.sanity_checking:
            return

        def compute(log_dir: Path) -> EvalReport:
            scores = segmentation_scores(conf)
            names = self.class_names
            metrics = scores.as_dict(self.class_names)
            metrics["loss"] = float(total[0] / total[1].clamp(min=1))
            return EvalReport(
                metrics,
                extra={"confusion_matrix": conf.tolist(), "class_acc": dict(zip(names, scores.acc.tolist()))},
                title=f"{stage}: {int(conf.sum())} pixels",
                table=[("class", self.class_names), ("IoU", scores.iou.tolist()), ("acc", scores.acc.tolist())],
                shown=("mIoU", "pixel_acc", "mean_acc", "loss"),
            )

        publish_metrics(self, stage, compute, prog_bar=("mIoU",))

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[tuple[int, str, Tensor]]:
        """``(position in the batch, id, uint8 mask)`` of each image (:class:`SegmentationWriter` writes them)."""
        masks = []
        for i, image, sid in self._skip_small(batch, ("image", "id")):
            pred = self.predict_logits(image, self.inference_model).argmax(1)[0].to(torch.uint8).cpu()
            masks.append((i, sid, pred))
        return masks


LINKS = [
    ("data.num_classes", "model.num_classes", "instantiate"),
    ("data.class_names", "model.class_names", "instantiate"),
    ("data.ignore_index", "model.ignore_index", "instantiate"),
]


def main(args: list[str] | None = None) -> Any:
    """Entry point of ``python -m tasks.segment``."""
    return cli_main(
        SegmentationTask, SegmentationDataModule, task="segment", monitor=("val/mIoU", "max"), links=LINKS, args=args
    )


if __name__ == "__main__":
    main()
