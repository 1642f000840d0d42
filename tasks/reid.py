"""Person re-identification: ``python -m tasks.reid fit|validate|test|predict|extract``.

Training follows the "strong baseline" (Luo et al. 2019): PK batches, cross-entropy with label
smoothing on the BNNeck logits + batch-hard triplet loss on the pre-BN features (optionally a
center loss), warm-up. Evaluation embeds query and gallery on every process, gathers the
embeddings, and ranks them once under the Market-1501 protocol (mAP, mINP, CMC rank-1/5/10),
with cosine or euclidean distances, optional average query expansion and k-reciprocal
re-ranking. Each evaluation writes ``<log_dir>/<stage>_metrics.json``
(:func:`tasks.reporting.publish_metrics`) and a retrieval grid
``<log_dir>/retrieval/<stage>[_epochNNN].png`` (:mod:`tasks.reid_eval`).

``predict`` writes the embeddings of the query and gallery images under ``writer.output_dir``
(:class:`~tasks.reid_writer.ReIDWriter`); ``extract`` turns any folder or list of images into an
embeddings file of the same format, streamed and resumable, see :mod:`tasks.reid_extract`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pytorch_metric_learning import distances, losses, miners, reducers
from torch import Tensor, nn

from tasks.builders import BuilderArgs, builder_signature
from tasks.checkpoint import backbone_weights
from tasks.classes import ClassSet
from tasks.cli import cli_main
from tasks.data.reid import ReIDDataModule
from tasks.ema import EMAConfig
from tasks.module import TaskModule
from tasks.optim import OptimConfig
from tasks.reid_eval import ReIDEvaluation
from tasks.reid_extract import extract_embeddings as _extract_embeddings
from tasks.reid_extract import extract_main
from tasks.reid_writer import ReIDWriter
from tasks.tta import TTAConfig, reid_embeddings
from vggbackbone import VGGBackbone
from vggbackbone.models import CenterLoss, TaskModels, create_model

__all__ = ["EVAL_OPTIONS", "CenterLoss", "ReIDTask", "ReIDWriter", "extract_embeddings", "main"]

#: The ReID net's options (the registry's ``reid`` models, ``model.family``: ``reid_vgg``'s own), and
#: the ``VGGBackbone`` ones it forwards.
_BUILDER_ARGS = BuilderArgs(
    TaskModels("reid"),
    supplied=frozenset({"num_classes", "weights_backbone"}),
    extra=dict.fromkeys(("width_mult", "frozen_stages", "norm_eval"), VGGBackbone.__init__),
)

#: The evaluation settings among the hyper-parameters. Like every model argument they are stored
#: in checkpoints, and like every model argument given explicitly (config file or command line)
#: they win over the checkpoint's value (``tasks.cli.TaskCLI``): ``validate --ckpt_path X
#: --model.rerank true`` re-ranks.
EVAL_OPTIONS = (
    "distance", "rerank", "rerank_k1", "rerank_k2", "rerank_lambda", "aqe", "aqe_times", "aqe_k", "aqe_alpha",
    "max_rank", "eval_chunk_size",
    "grid_queries", "grid_topk",
)  # fmt: skip


@builder_signature(_BUILDER_ARGS)
class ReIDTask(ReIDEvaluation, TaskModule):
    """A :class:`~vggbackbone.models.ReIDNet` trained for re-identification.

    Args:
        weights_backbone: backbone weights (path or torchvision weights name).
        num_classes: training identities; ``None`` takes them from the data module at fit time.
        label_smoothing: cross-entropy label smoothing (0.1 in the strong baseline).
        ce_weight, triplet_weight, center_weight: loss weights (center: 0 = off, 5e-4 in BoT).
        triplet_margin: margin of the batch-hard triplet loss (euclidean, on pre-BN features).
        center_alpha: centre update rate of the center loss.
        center_init: initial class centres: ``zeros`` or ``randn`` (standard normal, the strong
            baseline's ``layers/center_loss.py``).
        distance: ``cosine`` or ``euclidean`` between evaluation embeddings.
        rerank, rerank_k1, rerank_k2, rerank_lambda: k-reciprocal re-ranking at evaluation.
        aqe, aqe_times, aqe_k, aqe_alpha: average query expansion of the evaluation embeddings
            before distances and re-ranking (fast-reid's ``TEST.AQE``: 1 round, 5 neighbours, 3.0).
        max_rank: length of the CMC curve written to ``<stage>_metrics.json``.
        eval_chunk_size: queries per distance chunk (``None``: about 4M distances per chunk).
        grid_queries, grid_topk: rows and results of the retrieval picture (0 queries: none).
        optim: optimiser and schedule (:class:`tasks.optim.OptimConfig`).
        ema: an exponential moving average of the weights, used by evaluation, checkpoints,
            ``predict`` and ``export`` (:class:`tasks.ema.EMAConfig`; default ``null``: none).
        tta: test-time augmentation of evaluation and ``predict`` (:class:`tasks.tta.TTAConfig`;
            default ``null``: none).
        family: the registered ReID model (``reid_vgg``, :func:`~vggbackbone.models.list_models` ``("reid")``).
        **model_kwargs: the net's options with the builder's defaults: ``arch``, ``output_stride``,
            ``pooling``, ``gem_p``, ``embedding_dim``, ``bnneck``, ``normalize`` of
            :func:`~vggbackbone.models.reid_vgg`, and the backbone's ``width_mult``,
            ``frozen_stages``, ``norm_eval`` (old name ``batch_norm_eval``, warned once).

    ``predict`` embeds the query and gallery images of the data into ``writer.output_dir``
    (:class:`~tasks.reid_writer.ReIDWriter`, the format of ``extract``).
    """

    renamed_options: ClassVar[Mapping[str, str]] = {"batch_norm_eval": "norm_eval"}
    builder_option = "family"
    writer_class = ReIDWriter

    def __init__(
        self,
        weights_backbone: str | None = None,
        num_classes: int | None = None,
        label_smoothing: float = 0.1,
        ce_weight: float = 1.0,
        triplet_weight: float = 1.0,
        triplet_margin: float = 0.3,
        center_weight: float = 0.0,
        center_alpha: float = 0.5,
        center_init: Literal["zeros", "randn"] = "zeros",
        distance: Literal["cosine", "euclidean"] = "cosine",
        rerank: bool = False,
        rerank_k1: int = 20,
        rerank_k2: int = 6,
        rerank_lambda: float = 0.3,
        aqe: bool = False,
        aqe_times: int = 1,
        aqe_k: int = 5,
        aqe_alpha: float = 3.0,
        max_rank: int = 50,
        eval_chunk_size: int | None = None,
        grid_queries: int = 8,
        grid_topk: int = 10,
        optim: OptimConfig = OptimConfig(  # noqa: B008 (jsonargparse reads the default)
            name="adam", lr=3.5e-4, weight_decay=5e-4, warmup_steps=500, warmup_factor=0.01
        ),
        family: str = "reid_vgg",
        ema: EMAConfig | None = None,
        tta: TTAConfig | None = None,
        **model_kwargs: Any,
    ) -> None:
        super().__init__()
        options = _BUILDER_ARGS.resolve("model", family, model_kwargs)
        self.averaging_options(ema, tta, "reid")
        self.optim = optim
        self.model = create_model(  # the registry's builder; remembers its options (save_pretrained)
            family, num_classes=num_classes or 0, weights_backbone=backbone_weights(weights_backbone), **options
        )
        dist_fn = distances.LpDistance(normalize_embeddings=False)  # the baseline's plain euclidean
        self.miner = miners.BatchHardMiner(distance=dist_fn)
        # MeanReducer: average over every anchor, as the strong baseline (pml's default averages
        # only the triplets with a non-zero loss)
        self.triplet = losses.TripletMarginLoss(margin=triplet_margin, distance=dist_fn, reducer=reducers.MeanReducer())
        self.center: CenterLoss | None = None
        if num_classes and center_weight > 0:
            self.center = CenterLoss(num_classes, self.model.embedding_dim, center_alpha, center_init)
        self._eval_parts: list[tuple[Tensor, ...]] = []

    # ------------------------------------------------------------------ classes known late
    def _set_num_classes(self, n: int) -> None:
        self.model.reset_classifier(n)
        self.hparams["num_classes"] = n
        if self.hparams.center_weight > 0:
            self.center = CenterLoss(
                n, self.model.embedding_dim, self.hparams.center_alpha, self.hparams.get("center_init", "zeros")
            ).to(self.model.mean.device)

    def setup(self, stage: str) -> None:
        """``fit``: the classifier gets one row per training identity of the data (when the model has
        none yet); then the identities are checked (:meth:`TaskModule.setup`)."""
        if stage == "fit":
            self._fit_identities()
        super().setup(stage)

    def _fit_identities(self) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        n = getattr(dm, "num_classes", None)
        if n is None:
            if self.model.num_classes == 0:
                raise ValueError(
                    "model.num_classes is not set and the data module does not say how many identities it has"
                )
            return
        if self.model.num_classes == 0:
            self._set_num_classes(int(n))
        elif self.model.num_classes != n:
            raise ValueError(f"model.num_classes={self.model.num_classes} but the training set has {n} identities")
        names = getattr(dm, "train_identities", None)
        if self.__dict__.get("_identities") is None and names:  # the rows get their meaning from this data
            self.__dict__["_identities"] = tuple(names)
            self.__dict__["_classes_source"] = getattr(dm, "identity_source", "the training identities")

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # a checkpoint knows its classifier size even when this module was built without one
        w = checkpoint.get("state_dict", {}).get("model.classifier.weight")
        n = 0 if w is None else int(w.shape[0])
        if n != self.model.num_classes:
            self._set_num_classes(n)
        super().on_load_checkpoint(checkpoint)  # fit: the data's training identities must be the checkpoint's

    # ------------------------------------------------------------------ identities (tasks.classes)
    def class_set(self) -> ClassSet | None:
        """The training identities the classifier's rows stand for (only ``fit`` uses the classifier).

        Evaluation, ``predict`` and ``extract`` compare embeddings of people the model never saw
        (the Market-1501 protocol keeps training and test identities apart): nothing to check there.
        """
        if self.model.num_classes == 0:
            return None
        names = self.__dict__.get("_identities")
        source = self.classes_source("the model (model.num_classes)")
        return ClassSet(names, source, size=self.model.num_classes, kind="identities")

    def class_set_from_hparams(self, hparams: Mapping[str, Any], source: str) -> ClassSet | None:
        n = self.model.num_classes or hparams.get("num_classes")  # the size of the checkpoint's classifier
        return ClassSet(None, source, size=int(n), kind="identities") if n else None

    def data_class_set(self, datamodule: Any, name: str) -> ClassSet | None:
        names = getattr(datamodule, "train_identities", None) if name == "train" else None
        if not names:
            return None
        return ClassSet(
            tuple(names), getattr(datamodule, "identity_source", "the training identities"), kind="identities"
        )

    def adopt_class_set(self, classes: ClassSet) -> None:
        if classes.size != self.model.num_classes:
            self._set_num_classes(classes.size)
        self.__dict__["_identities"] = classes.names

    # ------------------------------------------------------------------ training
    def forward(self, images: Tensor) -> Any:
        return self.model(images)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        images, pids = batch["image"], batch["pid"]
        if images.numel() == 0:  # every image of the batch was unreadable
            return self.zero_loss()
        cmap = self.class_map("train")  # the data's identity labels as the classifier's rows, by name
        pids = pids if cmap is None else cmap.apply(pids)
        logits, feats = self.model(images)
        ce = F.cross_entropy(logits, pids, label_smoothing=self.hparams.label_smoothing)
        tri = self.triplet(feats, pids, self.miner(feats, pids))
        loss = self.hparams.ce_weight * ce + self.hparams.triplet_weight * tri
        logs = {"train/ce": ce, "train/triplet": tri, "train/acc": (logits.argmax(1) == pids).float().mean()}
        if self.center is not None:
            c = self.center(feats, pids)
            loss = loss + self.hparams.center_weight * c
            logs["train/center"] = c
        if isinstance(self.model.pool, nn.Module) and hasattr(self.model.pool, "p"):
            logs["train/gem_p"] = self.model.pool.p.detach()
        self.log("train/loss", loss, prog_bar=True, batch_size=len(pids))
        self.log_dict(logs, batch_size=len(pids))
        return loss

    # ------------------------------------------------------------------ prediction (predict, extract)
    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        """``{"index", "embedding", "skipped"}`` of a batch (:class:`ReIDWriter`, ``extract``'s writer)."""
        images = batch["image"]
        if not images.numel():
            emb = torch.empty(0, self.model.embedding_dim)
        else:  # with model.tta, the flipped image's too (tasks.tta)
            normalize = bool(getattr(self.model, "normalize", False))
            emb = reid_embeddings(self.inference_model, images, self.tta, normalize=normalize)
        return {"index": batch["index"], "embedding": emb, "skipped": batch["skipped"]}

    @property
    def embedding_dim(self) -> int:
        return self.model.embedding_dim


def extract_embeddings(model: str | Path | nn.Module, images: Any, out: str | Path, **kwargs: Any) -> Path:
    """:func:`tasks.reid_extract.extract_embeddings` with checkpoints of :class:`ReIDTask` (``model`` a path)."""
    return _extract_embeddings(model, images, out, task_class=ReIDTask, **kwargs)


def main(args: list[str] | None = None) -> Any:
    """``python -m tasks.reid fit|validate|test|predict|extract ...``."""
    return cli_main(
        ReIDTask,
        ReIDDataModule,
        task="reid",
        monitor=("val/mAP", "max"),
        extra_commands={"extract": lambda argv: extract_main(argv, ReIDTask)},
        args=args,
    )


if __name__ == "__main__":
    main()
