"""``python -m tasks.classify fit|validate|test|predict|export --config configs/classify/<name>.yaml``.

Image classification with the whole VGG network (:func:`vggbackbone.models.vgg_classifier`:
backbone + fc6/fc7/fc8) on an ImageFolder tree (:mod:`tasks.data.classify`).

* loss: cross-entropy (optional label smoothing);
* metrics over the whole evaluation set, whatever the number of processes: a confusion matrix
  and a top-k accuracy (torchmetrics, whose states are counts summed across processes; the
  evaluation loaders shard without padding, so each image counts once) give ``acc1``,
  ``acc5`` (top-5, top-``num_classes`` when there are fewer classes), ``mean_class_acc`` and
  the per-class accuracy (NaN, written ``null``, for a class absent from the set), printed,
  logged and written to ``<log_dir>/<stage>_metrics.json`` with the confusion matrix
  (:func:`tasks.reporting.publish_metrics`); the matrix is also drawn to
  ``<log_dir>/<stage>_confusion.png``;
* ``predict`` writes a CSV ``path,label1,score1,...,labelK,scoreK`` (softmax scores, best
  first, rows in input order) under ``writer.output_dir``, then ``_COMPLETE`` last
  (:class:`~tasks.classify_writer.ClassificationWriter`, the protocol of every task's writer:
  :mod:`tasks.writer`); ``model.predict_file``, the old home of the CSV, still works (warned once);
* ``export --ckpt C --out model.onnx --height S --width S``: the network (it takes ``[0, 1]``
  images with ``in_channels`` channels) to ONNX.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from tasks.builders import BuilderArgs, builder_signature
from tasks.checkpoint import backbone_weights
from tasks.classes import ClassSet, update_hparams
from tasks.classify_writer import ClassificationWriter, Row, predictions_file, write_predictions
from tasks.cli import cli_main
from tasks.data.classify import ClassificationDataModule
from tasks.ema import EMAConfig
from tasks.module import TaskModule
from tasks.optim import OptimConfig
from tasks.pictures import log_picture
from tasks.reporting import EvalReport, publish_metrics
from tasks.tta import TTAConfig, classify_logits
from vggbackbone import VGGBackbone
from vggbackbone.models import ExportableClassifier, TaskModels, create_model
from vggbackbone.models.classifier import adaptive_avg_pool_matrix
from vggbackbone.models.core import check_num_classes
from vggbackbone.utils import atomic_path

__all__ = [
    "ClassificationTask",
    "ClassificationWriter",
    "ExportableClassifier",
    "TestAfterFit",
    "adaptive_avg_pool_matrix",
    "main",
    "plot_confusion",
    "write_predictions",
]

#: The classifier's options: the registry's ``classify`` models (``model.family``: ``vgg``,
#: :func:`~vggbackbone.models.vgg_classifier`) and the backbone options it forwards.
_BUILDER_ARGS = BuilderArgs(
    TaskModels("classify"),
    supplied=frozenset({"num_classes", "weights"}),
    excluded=frozenset({"progress", "normalization"}),
    extra={"batch_norm": VGGBackbone, "frozen_stages": VGGBackbone, "norm_eval": VGGBackbone, "ceil_mode": VGGBackbone},
)


@builder_signature(_BUILDER_ARGS)
class ClassificationTask(TaskModule):
    """Image classification with :class:`~vggbackbone.models.VGGClassifier`.

    Args:
        num_classes: classes (linked from ``data.num_classes``).
        class_names: names for the tables, the picture and the CSV (linked from ``data.class_names``).
        weights: weights of the whole network (torchvision name such as ``IMAGENET1K_V1``, or a
            torchvision/timm/backbone state-dict file); fc8 is fresh when ``num_classes`` differs
            (:func:`~vggbackbone.models.vgg_classifier`).
        label_smoothing: of the cross-entropy.
        top_k: labels and scores per image in the ``predict`` CSV (clipped to ``num_classes``; the
            CSV is ``writer.output_dir``/``writer.filename``, or the old option ``predict_file``).
        optim: optimiser and schedule (:class:`tasks.optim.OptimConfig`; ``scheduler: plateau``
            for the paper's "divide by 10 when validation accuracy stops improving").
        ema: an exponential moving average of the weights, used by evaluation, checkpoints,
            ``predict`` and ``export`` (:class:`tasks.ema.EMAConfig`; default ``null``: none).
        tta: test-time augmentation of evaluation and ``predict`` (:class:`tasks.tta.TTAConfig`;
            default ``null``: none).
        family: the registered classification model (``vgg``: the whole VGG network).
        **model_kwargs: :func:`~vggbackbone.models.vgg_classifier`'s options with its defaults
            (``arch`` incl. block specs, ``in_channels`` (linked from ``data.in_channels``),
            ``width_mult``, ``fc_channels``, ``dropout``, ``head``) and the backbone's
            ``batch_norm``, ``frozen_stages``, ``norm_eval``, ``ceil_mode``. Unknown keys are refused.
    """

    backbone_path = "model.backbone"
    pretrained_hparams = ("weights",)
    builder_option = "family"
    writer_class = ClassificationWriter
    moved_options: ClassVar[Mapping[str, Callable[[Any], dict[str, Any]]]] = {"predict_file": predictions_file}

    def __init__(
        self,
        num_classes: int = 1000,
        class_names: list[str] | None = None,
        weights: str | None = None,
        label_smoothing: float = 0.0,
        top_k: int = 5,
        optim: OptimConfig = OptimConfig(),  # noqa: B008 (jsonargparse reads the default)
        family: str = "vgg",
        ema: EMAConfig | None = None,
        tta: TTAConfig | None = None,
        **model_kwargs: Any,
    ) -> None:
        super().__init__()
        options = _BUILDER_ARGS.resolve("model", family, model_kwargs)
        self.averaging_options(ema, tta, "classify")
        check_num_classes(num_classes, 2, "model")
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        self.optim = optim
        self.num_classes = num_classes
        self.class_names = list(class_names) if class_names else [str(k) for k in range(num_classes)]
        if len(self.class_names) != num_classes:
            raise ValueError(f"{len(self.class_names)} class names for {num_classes} classes")
        self.in_channels = int(options.get("in_channels", 3))
        self.model = create_model(  # the registry's builder; remembers its options (save_pretrained)
            family, num_classes=num_classes, weights=backbone_weights(weights), **options
        )
        self.criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        self.eval_k = min(5, num_classes)
        self.top_k = min(top_k, num_classes)
        self.confmat = MulticlassConfusionMatrix(num_classes)
        self.acc_topk = MulticlassAccuracy(num_classes, top_k=self.eval_k, average="micro")
        self._eval_loss: list[Tensor] = []

    # ------------------------------------------------------------------ classes (tasks.classes)
    def class_set(self) -> ClassSet:
        """The model's class names in index order (when it has them)."""
        names = tuple(self.class_names) if self.hparams.get("class_names") else None
        return ClassSet(names, self.classes_source("the model (model.class_names)"), size=self.num_classes)

    def class_set_from_hparams(self, hparams: Mapping[str, Any], source: str) -> ClassSet | None:
        names = hparams.get("class_names")
        if not names and not hparams.get("num_classes"):
            return None
        return ClassSet(tuple(names) if names else None, source, size=len(names) if names else hparams["num_classes"])

    def data_class_set(self, datamodule: Any, name: str) -> ClassSet | None:
        names = getattr(datamodule, "class_names", None)
        return ClassSet(tuple(names), getattr(datamodule, "class_source", "data.classes")) if names else None

    def adopt_class_set(self, classes: ClassSet) -> None:
        if classes.names is not None:
            self.class_names = list(classes.names)
            update_hparams(self, class_names=list(classes.names))

    def _model_labels(self, labels: Tensor) -> Tensor:
        """The data's labels as the model's class indices (by name, :mod:`tasks.classes`)."""
        cmap = self.class_map()
        return labels if cmap is None else cmap.apply(labels)

    def forward(self, images: Tensor) -> Tensor:
        """``(N, in_channels, H, W)`` in ``[0, 1]`` -> logits ``(N, num_classes)``."""
        return self.model(images)

    def export_model(self) -> nn.Module:
        """The network for ONNX: :class:`ExportableClassifier` for the linear head (any input size)."""
        return ExportableClassifier(self.model) if self.model.head == "linear" else self.model

    def export_example(self, height: int, width: int) -> Tensor:
        return torch.rand(1, self.in_channels, height, width)

    # ------------------------------------------------------------------ training
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        labels = self._model_labels(batch["label"])
        if not len(labels):  # every image of the batch was unreadable
            return self.zero_loss()
        logits = self.model(batch["image"])
        loss = self.criterion(logits, labels)
        acc = (logits.argmax(1) == labels).float().mean()
        self.log("train/loss", loss, prog_bar=True, batch_size=len(labels))
        self.log("train/acc1", acc, batch_size=len(labels))
        return loss

    # ------------------------------------------------------------------ evaluation
    def eval_epoch_start(self, stage: str) -> None:
        self.confmat.reset()
        self.acc_topk.reset()
        self._eval_loss.clear()

    def eval_step(self, batch: dict[str, Any]) -> None:
        labels = self._model_labels(batch["label"])
        if not len(labels):
            return
        if int(labels.min()) < 0:
            raise ValueError(f"evaluation needs labelled images, but {batch['path'][0]} has none (an image list?)")
        logits = classify_logits(self.model, batch["image"], self.tta)  # model.tta: the mean over views
        self.confmat.update(logits.argmax(1), labels)
        self.acc_topk.update(logits, labels)
        self._eval_loss.append(F.cross_entropy(logits, labels, reduction="sum").detach())

    def eval_epoch_end(self, stage: str) -> None:
        skipped = self.eval_skipped
        conf = self.confmat.compute().cpu()  # summed over every process (collectives)
        acc_k = float(self.acc_topk.compute())
        self.confmat.reset()
        self.acc_topk.reset()
        loss_sum = torch.stack(self._eval_loss).sum() if self._eval_loss else torch.zeros((), device=self.device)
        self._eval_loss.clear()
        total = self.all_gather(loss_sum).sum()
        if self.trainer.sanity_checking:
            return

        def compute(log_dir: Path) -> EvalReport:
            n = int(conf.sum())
            per_class = (conf.diag().double() / conf.sum(1).double()).tolist()  # NaN: class absent
            present = [a for a, c in zip(per_class, conf.sum(1).tolist()) if c > 0]
            metrics = {
                "acc1": float(conf.diag().sum()) / max(n, 1),
                "acc5": acc_k,
                "mean_class_acc": sum(present) / len(present) if present else float("nan"),
                "loss": float(total) / max(n, 1),
            }
            picture = plot_confusion(conf, self.class_names, log_dir / f"{stage}_confusion.png", f"{stage}: {n} images")
            log_picture(self, f"{stage}/confusion", picture)  # TensorBoard, MLflow, W&B
            return EvalReport(
                metrics,
                extra={
                    "num_images": n,
                    "top_k_of_acc5": self.eval_k,
                    "num_skipped": len(skipped),
                    "class_names": self.class_names,
                    "per_class_acc": dict(zip(self.class_names, per_class)),
                    "confusion_matrix": conf.tolist(),  # rows: true class, columns: predicted
                    "confusion_picture": str(picture),
                },
                title=f"{stage}: {n} images",
                table=[("class", self.class_names), ("acc", per_class), ("images", conf.sum(1).tolist())]
                if self.num_classes <= 50
                else None,
            )

        publish_metrics(self, stage, compute, prog_bar=("acc1",))

    # ------------------------------------------------------------------ predict
    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[Row]:
        """``(index, path, top_k labels, their scores)`` per image (:class:`ClassificationWriter` writes them)."""
        if not len(batch["index"]):
            return []
        probs = classify_logits(self.inference_model, batch["image"], self.tta).float().softmax(1)
        scores, labels = probs.topk(self.top_k, dim=1)
        return list(zip(batch["index"].tolist(), batch["path"], labels.tolist(), scores.tolist()))


def plot_confusion(conf: Tensor, class_names: list[str], path: str | Path, title: str = "") -> Path:
    """Draw the confusion matrix (rows: true class, columns: predicted) to a PNG, atomically.

    Colours are row-normalised (the fraction of each true class predicted as each class);
    counts are written in the cells up to 30 classes, class names on the axes up to 60.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    k = len(class_names)
    rows = conf.double().sum(1, keepdim=True).clamp(min=1)
    frac = (conf.double() / rows).numpy()
    side = min(20.0, max(4.0, 0.45 * k + 2))
    fig = Figure(figsize=(side, side * 0.9), dpi=80)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    im = ax.imshow(frac, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    if k <= 60:
        ax.set_xticks(range(k), class_names, rotation=90 if max(map(len, class_names)) > 3 else 0)
        ax.set_yticks(range(k), class_names)
    if k <= 30:
        counts = conf.tolist()
        for i in range(k):
            for j in range(k):
                if counts[i][j]:
                    color = "white" if frac[i, j] > 0.5 else "black"
                    ax.text(j, i, str(counts[i][j]), ha="center", va="center", fontsize=8, color=color)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


class TestAfterFit(pl.Callback):
    """``test_after_fit:`` in the YAML: once ``fit`` has finished, ``python -m tasks.classify fit``
    runs ``test`` on ``data.test_split`` with the ``ckpt`` weights and prints the metrics.

    Args:
        enabled: run the test after fit.
        ckpt: ``best`` (the checkpoint selected on the validation metric), ``last`` (the
            ``last.ckpt`` written at the end of training).
    """

    def __init__(self, enabled: bool = True, ckpt: Literal["best", "last"] = "best") -> None:
        self.enabled, self.ckpt = enabled, ckpt
        self.fit_done = False

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.fit_done = not trainer.interrupted

    def checkpoint(self, trainer: pl.Trainer) -> str:
        if self.ckpt == "last":
            callback = next(c for c in trainer.checkpoint_callbacks if getattr(c, "filename", None) == "last")
            return str(Path(callback.dirpath) / "last.ckpt")
        chosen = [c for c in trainer.checkpoint_callbacks if getattr(c, "monitor", None)]  # the `checkpoint:` one
        best = chosen[0].best_model_path if chosen else ""
        if not best:
            raise RuntimeError("test_after_fit: no best checkpoint (was the monitored val/acc1 ever logged?)")
        return best


LINKS = [
    ("data.num_classes", "model.num_classes", "instantiate"),
    ("data.class_names", "model.class_names", "instantiate"),
    ("data.in_channels", "model.in_channels", "instantiate"),
]


def main(args: list[str] | None = None) -> Any:
    """Entry point of ``python -m tasks.classify`` (``fit`` followed by ``test``, see :class:`TestAfterFit`)."""
    cli = cli_main(
        ClassificationTask,
        ClassificationDataModule,
        task="classify",
        monitor=("val/acc1", "max"),
        links=LINKS,
        callbacks={"test_after_fit": TestAfterFit},
        args=args,
    )
    after = next(
        (c for c in getattr(getattr(cli, "trainer", None), "callbacks", []) if isinstance(c, TestAfterFit)), None
    )
    if after is not None and after.enabled and after.fit_done:
        cli.trainer.test(
            cli.model, datamodule=cli.datamodule, ckpt_path=after.checkpoint(cli.trainer), weights_only=True
        )
    return cli


if __name__ == "__main__":
    main()
