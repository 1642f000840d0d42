"""``python -m tasks.segment fit|validate|test|predict --config configs/segment/<name>.yaml``.

Semantic segmentation with FCN-32s/16s/8s or U-Net on VGGBackbone (:mod:`vggbackbone.models`).

* loss: cross-entropy with ``ignore_index=255``, optionally plus smp's Dice or Lovasz loss;
* metrics over the whole evaluation set, whatever the number of processes: one confusion
  matrix per process (torchmetrics), summed across processes, then mIoU, per-class IoU, pixel
  and mean accuracy (:mod:`vggbackbone.metrics.segmentation`). Evaluation runs each image
  alone at its own size, so a prediction never depends on which images share its batch or
  process; the numbers are printed as a table, logged, and written to
  ``<log_dir>/<stage>_metrics.json`` (:func:`tasks.reporting.publish_metrics`; the IoU of a class
  absent from the set is NaN: not logged, ``null`` in the JSON);
* inference: whole image, or sliding windows for images larger than the network should see;
* ``predict`` writes ``<id>.png`` (palette PNG of class indices, VOC colours) and
  ``<id>_overlay.png`` (image with the coloured mask blended in) to ``predict_dir``, then
  ``predict_dir/_COMPLETE`` last (JSON: images, skipped), as detection's writer: a folder
  without it holds an incomplete run. Every file is recorded in ``predict_dir/_MANIFEST.json``
  (:class:`tasks.outputs.OutputFolder`): a run first removes what the earlier run's manifest
  lists, and only that; it never overwrites a file no manifest lists, never writes into (or
  around) its input images, and fails when no image could be read.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from torchmetrics.classification import MulticlassConfusionMatrix
from torchvision.utils import draw_segmentation_masks

from tasks.builders import BuilderArgs, builder_signature
from tasks.checkpoint import backbone_weights
from tasks.classes import ClassSet, update_hparams
from tasks.cli import cli_main
from tasks.data.segmentation import IGNORE_INDEX, SegmentationDataModule
from tasks.data.voc import voc_palette
from tasks.deprecation import old_names, renamed, warn_once
from tasks.distributed import all_gather_objects, is_global_zero
from tasks.images import SkipCounter
from tasks.module import TaskModule
from tasks.optim import OptimConfig
from tasks.outputs import COMPLETE_MARKER, OutputFolder, predict_inputs, require_some
from tasks.reporting import EvalReport, publish_metrics
from vggbackbone.metrics.segmentation import segmentation_scores
from vggbackbone.models import TaskModels, model_entry, sliding_window_logits
from vggbackbone.utils import atomic_path

__all__ = [
    "PREDICT_COMPLETE",
    "SEGMENTATION_HEADS",
    "SegmentationTask",
    "build_segmentation_model",
    "main",
    "sliding_window_logits",
]

__getattr__ = old_names(
    __name__, {"SegmentationModel": lambda: SegmentationTask, "SegmentationData": lambda: SegmentationDataModule}
)

#: ``predict_dir/_COMPLETE``: written last, once every mask of a predict run is in place
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
        loss: ``ce``, ``ce+dice`` or ``ce+lovasz`` (smp's losses, multiclass, ignoring 255).
        aux_loss_weight: weight of the Dice/Lovasz term.
        inference: ``whole`` (each image at its size) or ``slide`` (``window`` crops).
        window, window_overlap: sliding-window size and overlap fraction.
        inference_scale: resize images by this factor before the network and the logits back
            to full size (metrics are always computed on the full-resolution masks); pair it
            with a matching ``data.scale_size`` to train at that resolution.
        predict_dir: where ``predict`` writes masks and overlays.
        overlay_alpha: mask opacity in the overlays.
        optim: optimiser and schedule (:class:`tasks.optim.OptimConfig`); ``backbone_lr_mult``
            applies to ``model.backbone`` (where the default ``backbone_prefix`` points).
        head: old name of ``family`` (accepted, warned once).
        head_kwargs: old home of the builder options (accepted, warned once: write them under ``model``).
        **model_kwargs: the family builder's options with its defaults (``arch``, ``width_mult``,
            ``frozen_stages``, ``norm_eval``, ``pool4_scale``, ``decoder_channels``... of
            :func:`~vggbackbone.models.fcn_vgg` / :func:`~vggbackbone.models.unet_vgg`), among
            them ``normalization`` (default: what the weights carry): the model normalises the
            ``[0, 1]`` images this task gives it. An unknown option, or one of another family, is
            an error naming it.
    """

    def __init__(
        self,
        num_classes: int = 21,
        class_names: list[str] | None = None,
        family: str = DEFAULT_FAMILY,
        weights_backbone: str | None = None,
        loss: Literal["ce", "ce+dice", "ce+lovasz"] = "ce",
        aux_loss_weight: float = 1.0,
        inference: Literal["whole", "slide"] = "whole",
        window: int = 512,
        window_overlap: float = 1 / 3,
        inference_scale: float = 1.0,
        predict_dir: str = "runs/segment/predict",
        overlay_alpha: float = 0.5,
        optim: OptimConfig = OptimConfig(),  # noqa: B008 (jsonargparse reads the default)
        head: str | None = None,
        head_kwargs: dict[str, Any] | None = None,
        **model_kwargs: Any,
    ) -> None:
        super().__init__()
        # the old name; an old checkpoint's head beside the same family from a config is no conflict
        family = renamed("model", "head", "family", head, DEFAULT_FAMILY if head == family else family, DEFAULT_FAMILY)
        if head_kwargs:
            clash = sorted(set(head_kwargs) & set(model_kwargs))
            if clash:
                raise ValueError(f"model: {', '.join(clash)} given both in head_kwargs and directly")
            warn_once(
                "model",
                "head_kwargs",
                f"model.head_kwargs is deprecated: write {', '.join(sorted(head_kwargs))} directly under model",
            )
            model_kwargs = {**model_kwargs, **head_kwargs}
        options = _BUILDER_ARGS.resolve("model", family, model_kwargs)
        self.save_options(
            {
                "num_classes": num_classes, "class_names": class_names, "family": family,
                "weights_backbone": weights_backbone, "loss": loss, "aux_loss_weight": aux_loss_weight,
                "inference": inference, "window": window, "window_overlap": window_overlap,
                "inference_scale": inference_scale, "predict_dir": predict_dir, "overlay_alpha": overlay_alpha,
                "optim": optim, **_BUILDER_ARGS.hparams(family, model_kwargs),
            }
        )  # fmt: skip
        self.optim = optim
        self.num_classes = num_classes
        self.class_names = list(class_names) if class_names else [str(k) for k in range(num_classes)]
        if len(self.class_names) != num_classes:
            raise ValueError(f"{len(self.class_names)} class names for {num_classes} classes")
        self.model = SEGMENTATION_HEADS[family](
            num_classes=num_classes, weights_backbone=backbone_weights(weights_backbone), **options
        )
        self.ce = nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX)
        self.aux_loss = self._aux_loss(loss)
        self.aux_loss_weight = aux_loss_weight
        self.inference, self.window, self.window_overlap = inference, window, window_overlap
        if inference_scale <= 0:
            raise ValueError(f"inference_scale must be > 0, got {inference_scale}")
        self.inference_scale = inference_scale
        self.predict_dir, self.overlay_alpha = Path(predict_dir), overlay_alpha
        self.confmat = MulticlassConfusionMatrix(num_classes, ignore_index=IGNORE_INDEX)
        self._eval_loss: list[Tensor] = []
        # training and evaluation skips are counted and reported apart (validation runs inside a training epoch)
        self._train_skipped = SkipCounter()
        self._eval_skipped = SkipCounter()
        self._predicted = 0  # masks this process wrote in the current predict run

    @staticmethod
    def _aux_loss(name: str) -> nn.Module | None:
        from segmentation_models_pytorch.losses import DiceLoss, LovaszLoss

        if name == "ce":
            return None
        if name == "ce+dice":
            return DiceLoss("multiclass", ignore_index=IGNORE_INDEX)
        if name == "ce+lovasz":
            return LovaszLoss("multiclass", ignore_index=IGNORE_INDEX)
        raise ValueError(f"unknown loss {name!r}; choose ce, ce+dice or ce+lovasz")

    # ------------------------------------------------------------------ classes (tasks.classes)
    def class_set(self) -> ClassSet:
        """The model's classes: names (background first) when it has them, and the ignore index."""
        names = tuple(self.class_names) if self.hparams.get("class_names") else None
        source = self.classes_source("the model (model.class_names)")
        return ClassSet(names, source, size=self.num_classes, ignore_index=IGNORE_INDEX)

    def class_set_from_hparams(self, hparams: Mapping[str, Any], source: str) -> ClassSet | None:
        names = hparams.get("class_names")
        if not names and not hparams.get("num_classes"):
            return None
        size = len(names) if names else int(hparams["num_classes"])
        return ClassSet(tuple(names) if names else None, source, size=size, ignore_index=IGNORE_INDEX)

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
        """Mask values of the data's classes as the model's (by name, :mod:`tasks.classes`); 255 stays."""
        cmap = self.class_map()
        return masks if cmap is None else cmap.apply(masks, ignore_index=IGNORE_INDEX)

    # ------------------------------------------------------------------ model
    def forward(self, images: Tensor) -> Tensor:
        """uint8 or [0, 1] float ``(N, 3, H, W)`` -> logits ``(N, K, H, W)``."""
        return self.model(_as_float(images))

    @property
    def normalization(self) -> Any:
        """The :class:`~vggbackbone.weights.InputNormalization` the model applies (it takes [0, 1] images)."""
        return self.model.normalization

    def loss(self, logits: Tensor, masks: Tensor) -> Tensor:
        loss = self.ce(logits, masks)
        if self.aux_loss is not None:
            loss = loss + self.aux_loss_weight * self.aux_loss(logits, masks)
        return loss

    @torch.no_grad()
    def predict_logits(self, image: Tensor, model: nn.Module | None = None) -> Tensor:
        """Logits ``(1, K, H, W)`` of one ``(3, H, W)`` image, whole or by sliding window, at
        ``inference_scale`` (logits resized back to ``H x W``), by ``model`` (default ``self.model``)."""
        model = self.model if model is None else model
        x = _as_float(image[None])
        size = x.shape[-2:]
        if self.inference_scale != 1.0:
            x = F.interpolate(x, scale_factor=self.inference_scale, mode="bilinear", antialias=True)
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
        sh, sw = math.floor(h * self.inference_scale), math.floor(w * self.inference_scale)
        backbone = getattr(self.model, "backbone", None)
        least = max(1, int(getattr(backbone, "min_input_size", 1)))
        if min(sh, sw) >= least:
            return None
        scaled = f" ({sh}x{sw} at inference_scale {self.inference_scale})" if self.inference_scale != 1.0 else ""
        return f"image is {h}x{w}{scaled}, smaller than the network's minimum input {least}x{least}"

    def _skip_small(self, batch: dict[str, Any], keys: tuple[str, ...]) -> list[tuple[Any, ...]]:
        """The batch's ``keys`` per image, images too small for the network left out and counted as skipped."""
        rows = []
        for row in zip(*(batch[k] for k in keys), batch["path"]):
            reason = self.too_small(row[0])
            if reason is None:
                rows.append(row[:-1])
            else:
                self._eval_skipped.add([(row[-1], reason)])
        return rows

    # ------------------------------------------------------------------ steps
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        self._train_skipped.add(batch.get("skipped", []))
        if not batch["id"]:  # every image of the batch was unreadable
            return self.zero_loss()
        logits = self(batch["image"])
        loss = self.loss(logits, self._model_masks(batch["mask"]))
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["id"]))
        return loss

    def on_train_epoch_end(self) -> None:
        self._train_skipped.report(f"training epoch {self.current_epoch}")

    def eval_step(self, batch: dict[str, Any]) -> None:
        self._eval_skipped.add(batch.get("skipped", []))
        if batch["image"] and "mask" not in batch:
            raise ValueError(f"evaluation needs masks, but {batch['path'][0]} came without one (an image list?)")
        for image, mask in self._skip_small(batch, ("image", "mask")):
            mask = self._model_masks(mask)
            logits = self.predict_logits(image)
            self.confmat.update(logits.argmax(1), mask[None])
            self._eval_loss.append(self.ce(logits, mask[None]).detach())

    def eval_epoch_end(self, stage: str) -> None:
        self._eval_skipped.report(f"{stage} evaluation")
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
            metrics = scores.as_dict(self.class_names)
            metrics["loss"] = float(total[0] / total[1].clamp(min=1))
            return EvalReport(
                metrics,
                extra={"confusion_matrix": conf.tolist()},
                title=f"{stage}: {int(conf.sum())} pixels",
                table=[("class", self.class_names), ("IoU", scores.iou.tolist()), ("acc", scores.acc.tolist())],
                shown=("mIoU", "pixel_acc", "mean_acc", "loss"),
            )

        publish_metrics(self, stage, compute, prog_bar=("mIoU",))

    def on_predict_start(self) -> None:
        super().on_predict_start()
        self._predicted = 0
        # the earlier run's files (its manifest's, the marker first) go: from here on the folder says "incomplete"
        self._outputs = OutputFolder(self.predict_dir, "segment predict")
        self._outputs.begin(inputs=predict_inputs(self.trainer.datamodule))

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[str]:
        self._eval_skipped.add(batch.get("skipped", []))
        written = []
        for image, sid in self._skip_small(batch, ("image", "id")):
            pred = self.predict_logits(image, self.inference_model).argmax(1)[0].to(torch.uint8).cpu()
            path = write_prediction(
                self.predict_dir,
                sid,
                image.cpu(),
                pred,
                self.num_classes,
                self.overlay_alpha,
                outputs=getattr(self, "_outputs", None),
            )
            written.append(str(path))
        self._predicted += len(written)
        return written

    def on_predict_epoch_end(self) -> None:
        skipped = self._eval_skipped.report("predict")
        images = sum(all_gather_objects(self._predicted))
        outputs = getattr(self, "_outputs", None)  # None: the predict hooks called by hand, without a run
        if not images:
            dm = self.trainer.datamodule
            source = getattr(dm, "predict_images", None) or getattr(dm, "root", "?")
            require_some(images, "segment predict", source, skipped, on_error=outputs.close if outputs else None)
        # a collective: every process has written all its masks when it returns, so the marker comes last
        if outputs is not None:
            outputs.finish({"images": images, "skipped": len(skipped)})
        if is_global_zero():
            print(f"predict: {images} masks and overlays written to {self.predict_dir}")


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


LINKS = [
    ("data.num_classes", "model.num_classes", "instantiate"),
    ("data.class_names", "model.class_names", "instantiate"),
]


def main(args: list[str] | None = None) -> Any:
    """Entry point of ``python -m tasks.segment``."""
    return cli_main(
        SegmentationTask, SegmentationDataModule, task="segment", monitor=("val/mIoU", "max"), links=LINKS, args=args
    )


if __name__ == "__main__":
    main()
