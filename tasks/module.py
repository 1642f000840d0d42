"""The Lightning bases every task builds on: :class:`TaskModule` and :class:`TaskDataModule`."""

from __future__ import annotations

import copy
import math
import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any, ClassVar

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from pytorch_lightning.overrides.distributed import UnrepeatedDistributedSampler
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from tasks.checkpoint import TASK_KEY, WEIGHTS_IN_CHECKPOINT, check_finite, state_dict_mismatch, task_name
from tasks.classes import ClassesMixin, adopt_checkpoint_classes, announce, meet_data, record_classes
from tasks.optim import OptimConfig, build_optimizer, lr_scheduler_config
from tasks.options import check_int
from tasks.reporting import DEFAULT_METRICS_FILE
from tasks.resume import ResumableSampler, SeededDataset, global_seed, train_position
from vggbackbone.weights import resolve_normalization

__all__ = ["TaskDataModule", "TaskModule"]


class TaskModule(ClassesMixin, pl.LightningModule):
    """Base ``LightningModule``: subclasses set ``self.optim`` and build ``self.model``.

    What every task shares:

    * ``configure_optimizers``: :func:`build_optimizer` over the task, ``backbone_lr_mult``
      applied to the module at :attr:`backbone_path` (see :meth:`optim_config`);
    * :meth:`zero_loss`: the training loss of a batch with nothing readable in it;
    * checkpoints store the :attr:`pretrained_hparams` (``weights_backbone``) as
      :data:`WEIGHTS_IN_CHECKPOINT` (when they were set, and unless the weights brought an input
      normalisation other than the default, e.g. Caffe's): the state dict holds the trained
      weights, so ``load_from_checkpoint``, ``export --ckpt`` and the CLI's ``--ckpt_path``
      rebuild the model as the pretrained one it was without fetching ImageNet weights (the
      run's ``config.yaml``/``hparams.yaml`` still record which weights it started from);
    * :attr:`metrics_file`: where :func:`publish_metrics` writes evaluation metrics;
    * nothing silent: a non-finite training loss stops the run with a ``FloatingPointError``
      naming the step and the logged loss terms (:meth:`on_before_backward`); a checkpoint is
      never written from non-finite weights (:meth:`on_save_checkpoint`), nor ``predict`` run
      with them (:meth:`on_predict_start`); a training epoch or an evaluation in which every
      image was unreadable is an error, not a metric of nothing; an unwritable checkpoint
      folder is an error before the first step (:meth:`on_fit_start`); a checkpoint whose
      tensors do not fit the model is an error naming the file and the tensors (:meth:`load_state_dict`);
    * class names travel with the model (:mod:`tasks.classes`): a checkpoint records them, and
      data whose classes differ from the model's (a checkpoint's, when ``--ckpt_path`` brings
      one) is mapped by name, saying so, or refused naming the difference (:meth:`setup`,
      :meth:`on_load_checkpoint`).
    """

    optim: OptimConfig
    #: where the pretrained backbone sits in the task: OptimConfig's default prefix points here
    backbone_path: str = "model.backbone"
    #: hyper-parameters naming pretrained weights, which a checkpoint replaces
    pretrained_hparams: tuple[str, ...] = ("weights_backbone",)
    #: evaluation metrics file, relative to the trainer's log folder (``None``: not written)
    metrics_file: str | None = DEFAULT_METRICS_FILE

    def save_options(self, hparams: Mapping[str, Any]) -> None:
        """``save_hyperparameters`` of exactly ``hparams`` (every option, builder options included).

        Tasks whose ``__init__`` signature carries their builder's options
        (:func:`tasks.builders.builder_signature`) take them as ``**model_kwargs``; Lightning's
        ``save_hyperparameters`` reads the signature's names from the frame and would not find them.
        """
        self._log_hyperparams = True
        self._set_hparams(dict(hparams))
        self._hparams_name = None  # load_from_checkpoint passes them as keyword arguments
        self._hparams_initial = copy.deepcopy(self._hparams)

    def optim_config(self) -> OptimConfig:
        """``self.optim`` with the default ``backbone_prefix`` (``backbone``) aimed at :attr:`backbone_path`."""
        if self.optim.backbone_prefix.rstrip(".") == "backbone":
            return replace(self.optim, backbone_prefix=self.backbone_path)
        return self.optim

    def zero_loss(self) -> Tensor:
        """A zero loss connected to every trainable parameter.

        For a training batch whose images were all unreadable: returning it (rather than
        ``None``, which skips backward) keeps every DDP process in the same gradient all-reduce,
        where one process skipping would leave the others waiting forever.
        """
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            return torch.zeros((), device=self.device, requires_grad=True)
        return sum(p.sum() for p in params) * 0.0  # type: ignore[return-value]

    # -- nothing silent: non-finite numbers, unreadable splits, unwritable folders --
    def log(self, name: str, value: Any, *args: Any, **kwargs: Any) -> None:
        """``LightningModule.log``; training values are also kept for :meth:`on_before_backward`'s message."""
        if self._trainer is not None and self.trainer.training:
            self.__dict__.setdefault("_step_terms", {})[name] = value.detach() if isinstance(value, Tensor) else value
        super().log(name, value, *args, **kwargs)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self.__dict__["_step_terms"] = {}
        old = 0 if batch_idx == 0 else self.__dict__.get("_train_readable", 0)
        n = readable_count(batch)
        self.__dict__["_train_readable"] = -1 if n < 0 or old < 0 else old + n
        if batch_idx == 0 or "_train_skips" not in self.__dict__:  # (a run resumed mid-epoch starts later)
            self.__dict__["_train_skips"] = []
        self.__dict__["_train_skips"].extend(skipped_of(batch))

    def on_before_backward(self, loss: Tensor) -> None:
        """Stop on a NaN/inf loss, naming the step and the loss terms logged by ``training_step``."""
        if bool(torch.isfinite(loss.detach()).all()):
            return
        terms = ", ".join(
            f"{k}={float(v):.6g}" if isinstance(v, Tensor) and v.numel() == 1 else f"{k}={v}"
            for k, v in self.__dict__.get("_step_terms", {}).items()
        )
        raise FloatingPointError(
            f"non-finite training loss {float(loss.detach().float().mean())} at step {self.global_step} "
            f"(epoch {self.current_epoch}){': ' + terms if terms else ''}; lower model.optim.lr, raise "
            "model.optim.warmup_steps, or set trainer.gradient_clip_val. Nothing was written from these weights."
        )

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if batch_idx + 1 != self.trainer.num_training_batches:  # check once, at the end of the epoch
            return
        readable = self._total(self.__dict__.get("_train_readable", 0))
        if readable == 0:
            raise RuntimeError(
                f"training epoch {self.current_epoch}: every image of the training split was unreadable "
                f"({_skips_text(self.__dict__.get('_train_skips', []))}); nothing was learnt, stopping"
            )

    def _total(self, count: int) -> int:
        """``count`` summed over every process (a collective); negative when some batch was of unknown size."""
        t = torch.tensor(float(count) if count >= 0 else -1e9, device=self.device)
        if self._trainer is not None and self.trainer.world_size > 1:
            t = self.trainer.strategy.reduce(t, reduce_op="sum")
        return int(t.item())

    # -- classes: the model's are the truth, the data's are checked against them (tasks.classes) --
    def setup(self, stage: str) -> None:
        """Check the classes of every dataset of ``stage`` against the model's (map by name or refuse)."""
        meet_data(self, stage, defer=True)  # raised when the stage starts, unless a checkpoint's classes come

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """The checkpoint's classes become the model's, once the data is checked against them."""
        adopt_checkpoint_classes(self, checkpoint)

    def on_fit_start(self) -> None:
        """Check, before the first step, that every checkpoint folder can be written (rank 0 tries, all agree)."""
        announce(self)
        error = None
        if self.trainer.is_global_zero:
            for cb in self.trainer.checkpoint_callbacks:
                dirpath = getattr(cb, "dirpath", None)
                if not dirpath or "://" in str(dirpath):
                    continue
                try:
                    os.makedirs(dirpath, exist_ok=True)
                    with tempfile.NamedTemporaryFile(dir=dirpath, prefix=".write-test-"):
                        pass
                except OSError as e:
                    error = f"checkpoint folder {dirpath} cannot be written ({type(e).__name__}: {e.strerror or e})"
                    break
        error = self.trainer.strategy.broadcast(error, src=0)
        if error:
            raise PermissionError(f"{error}: fix its permissions or set checkpoint.dirpath / trainer.default_root_dir")

    def on_predict_start(self) -> None:
        announce(self)
        check_finite(self.state_dict(), f"{type(self).__name__} weights")

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """``nn.Module.load_state_dict``, with an error naming the checkpoint, what it holds and the misfits."""
        if strict:
            problems = state_dict_mismatch(self.state_dict(), state_dict)
            if problems:
                trainer = self._trainer
                path = getattr(trainer, "ckpt_path", None) if trainer is not None else None
                hp = dict(self.hparams)
                expected = ", ".join(f"{k} {hp[k]}" for k in ("family", "head", "arch") if k in hp)
                raise RuntimeError(
                    f"{path or 'checkpoint'}: its weights do not fit {type(self).__name__}"
                    f"{' (' + expected + ')' if expected else ''}: " + "; ".join(problems[:4])
                )
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_finite(checkpoint.get("state_dict", {}), f"checkpoint at step {self.global_step}")
        checkpoint[TASK_KEY] = task_name(type(self))
        record_classes(self, checkpoint)
        hparams = checkpoint.get(self.CHECKPOINT_HYPER_PARAMS_KEY)
        if isinstance(hparams, dict) and self._rebuilds_without_weights():
            for key in self.pretrained_hparams:
                if hparams.get(key) is not None:
                    hparams[key] = WEIGHTS_IN_CHECKPOINT

    def _rebuilds_without_weights(self) -> bool:
        """Whether the model built without weights expects the same input as this one.

        The input normalisation comes with the weights (a file of this package can carry
        Caffe's) and is not in the state dict; built without weights, a backbone takes the
        default. Where they differ, the checkpoint keeps naming the weights.
        """
        try:
            norm = getattr(self.get_submodule(self.backbone_path), "normalization", None)
        except AttributeError:  # a task without a VGG backbone
            return True
        if norm is None or norm == resolve_normalization(None, len(norm.mean)):
            return True
        # a normalisation given explicitly (model.normalization) is stored with the options and
        # rebuilds the same model without the weights file (Caffe's conv1_1 flip is in the state dict)
        explicit = self.hparams.get("normalization")
        try:
            return explicit is not None and resolve_normalization(explicit, len(norm.mean)) == norm
        except ValueError:
            return False

    def export_model(self) -> nn.Module:
        """The module ``python -m tasks.<task> export`` writes: it takes images in ``[0, 1]``.

        ``self.model`` by default (detectors and ReID nets normalise their own input); tasks
        whose model expects normalised input wrap it.
        """
        return self.model

    @property
    def inference_model(self) -> nn.Module:
        """``self.model``, or during ``predict`` its copy optimised by :class:`InferenceOptimization`."""
        fast = self.__dict__.get("_fast_model")
        return fast if fast is not None else self.model

    def configure_optimizers(self) -> Any:
        steps = float(self.trainer.estimated_stepping_batches) if self._trainer is not None else 1.0
        total = int(steps) if math.isfinite(steps) and steps > 0 else 1
        cfg = self.optim_config()
        opt, sched = build_optimizer(self, cfg, total)
        return {"optimizer": opt, "lr_scheduler": lr_scheduler_config(sched, cfg)}

    # -- evaluation: one pattern for validate and test --
    def eval_step(self, batch: Any) -> None:
        """Accumulate what the evaluation of one batch needs (predictions, confusion matrix...)."""
        raise NotImplementedError(f"{type(self).__name__} does not evaluate")

    def eval_epoch_start(self, stage: str) -> None:
        """Reset the accumulated state before an evaluation of ``stage`` (``val``/``test``)."""

    def eval_epoch_end(self, stage: str) -> None:
        """Every process: gather what :meth:`eval_step` accumulated and :func:`~tasks.reporting.publish_metrics`."""

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._count_eval(batch)
        self.eval_step(batch)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._count_eval(batch)
        self.eval_step(batch)

    def on_validation_epoch_start(self) -> None:
        announce(self)
        self.__dict__["_eval_readable"], self.__dict__["_eval_skips"] = None, []
        self.eval_epoch_start("val")

    def on_test_epoch_start(self) -> None:
        announce(self)
        self.__dict__["_eval_readable"], self.__dict__["_eval_skips"] = None, []
        self.eval_epoch_start("test")

    def on_validation_epoch_end(self) -> None:
        self._check_eval_readable("val")
        self.eval_epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self._check_eval_readable("test")
        self.eval_epoch_end("test")

    def _count_eval(self, batch: Any) -> None:
        n = readable_count(batch)
        old = self.__dict__.get("_eval_readable") or 0
        self.__dict__["_eval_readable"] = -1 if n < 0 or old < 0 else old + n
        self.__dict__.setdefault("_eval_skips", []).extend(skipped_of(batch))

    def _check_eval_readable(self, stage: str) -> None:
        """An evaluation that read no image at all is an error, not a metric of nothing (AP -1)."""
        if self._trainer is None or self.trainer.sanity_checking:  # the sanity check sees a few batches only
            return
        counted = self.__dict__.get("_eval_readable")
        if counted is None:  # no batch here, or a task with its own validation_step/test_step (not counted)
            own = getattr(type(self), f"{'validation' if stage == 'val' else 'test'}_step")
            counted = 0 if own is getattr(TaskModule, own.__name__) else -1
        if self._total(counted) == 0:
            raise RuntimeError(
                f"{stage} evaluation: every image of the {stage} split was unreadable "
                f"({_skips_text(self.__dict__.get('_eval_skips', []))}): no metric to report, stopping"
            )

    # -- export --
    def export_example(self, height: int, width: int) -> Any:
        """An example input of :meth:`export_model` (``(1, 3, H, W)``; detectors take a list of ``(3, H, W)``)."""
        return torch.rand(1, 3, height, width)


def readable_count(batch: Any) -> int:
    """Number of readable images in a task batch (``image``/``images`` of a dict or a batch object); -1: unknown."""
    images = batch.get("image") if isinstance(batch, Mapping) else getattr(batch, "images", None)
    if isinstance(images, Tensor):
        return int(images.shape[0]) if images.numel() else 0
    if isinstance(images, (list, tuple)):
        return len(images)
    return -1


def skipped_of(batch: Any) -> list[Any]:
    """The unreadable samples a task batch reports (``skipped`` of a dict or a batch object)."""
    skipped = batch.get("skipped") if isinstance(batch, Mapping) else getattr(batch, "skipped", None)
    return list(skipped) if isinstance(skipped, (list, tuple)) else []


def _skips_text(skips: list[Any]) -> str:
    """``3 skipped on this process, e.g. a.jpg: cannot identify image file`` for an error message."""
    if not skips:
        return "none readable on this process"
    first = skips[0]
    path, reason = (getattr(first, "path", None), getattr(first, "reason", None))
    if path is None and isinstance(first, tuple) and len(first) == 2:  # (path, reason) pairs
        path, reason = first
    shown = f"{path}: {reason}" if path is not None else str(first)
    return f"{len(skips)} skipped on this process, e.g. {shown}"


class TaskDataModule(pl.LightningDataModule):
    """Common loader settings and the four ``*_dataloader`` methods.

    Subclasses build each dataset in :meth:`build_dataset` (``train``, ``val``, ``test``,
    ``predict``; :meth:`setup` stores the ones a Lightning stage needs as ``self.<name>_set``, see
    :attr:`stage_sets`) or override ``setup`` itself, and name a collate function per stage in
    :attr:`collate_fns`; a training sampler (PK batches...) comes from :meth:`train_sampler`.
    Evaluation loaders shard the dataset without padding when distributed (Lightning's
    ``UnrepeatedDistributedSampler``), so summed metrics count every sample exactly once.
    """

    #: collate function of each stage (``train``, ``val``, ``test``, ``predict``); absent: PyTorch's default
    collate_fns: ClassVar[Mapping[str, Callable[[list[Any]], Any]]] = {}
    #: the datasets :meth:`setup` builds for each Lightning stage (``None``: all four, in this order)
    stage_sets: ClassVar[Mapping[str, tuple[str, ...]]] = {
        "fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("predict",)
    }  # fmt: skip

    def __init__(self, batch_size: int = 8, eval_batch_size: int | None = None, num_workers: int = 2) -> None:
        super().__init__()
        # checked here, by name: DataLoader's own errors do not say which option (tasks.options)
        self.batch_size = check_int("data.batch_size", batch_size)
        self.eval_batch_size = check_int("data.eval_batch_size", eval_batch_size, optional=True) or self.batch_size
        self.num_workers = check_int("data.num_workers", num_workers, minimum=0)

    def build_dataset(self, name: str) -> Dataset | None:
        """The ``name`` dataset (``train``, ``val``, ``test`` or ``predict``) that :meth:`setup` stores.

        ``None`` (this default): not built here, for a subclass with its own loaders or ``setup``;
        a loader that needs it then fails naming it (:meth:`stage_dataset`).
        """
        return None

    def setup(self, stage: str | None = None) -> None:
        """``self.<name>_set = build_dataset(name)`` for every dataset ``stage`` needs (:attr:`stage_sets`)."""
        for name in ("train", "val", "test", "predict") if stage is None else self.stage_sets.get(stage, ()):
            dataset = self.build_dataset(name)
            if dataset is not None:
                setattr(self, f"{name}_set", dataset)

    def stage_dataset(self, stage: str) -> Dataset:
        """``self.<stage>_set``, with an error naming it when ``setup`` did not build it."""
        dataset = getattr(self, f"{stage}_set", None)
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}: no {stage} dataset (setup() did not build {stage}_set)")
        return dataset

    def train_sampler(self) -> Any:
        """Sampler of the training loader (``None``: shuffled, or Lightning's distributed sampler)."""
        return None

    def _loader(self, stage: str) -> DataLoader:
        train = stage == "train"
        return self.make_loader(
            self.stage_dataset(stage),
            train=train,
            collate_fn=self.collate_fns.get(stage),
            sampler=self.train_sampler() if train else None,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict")

    def make_loader(
        self,
        dataset: Dataset,
        *,
        train: bool,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        sampler: Any = None,
        batch_sampler: Any = None,
        batch_size: int | None = None,
    ) -> DataLoader:
        """A loader of ``dataset``; training ones are exactly resumable (:mod:`tasks.resume`).

        Training: ``sampler`` (``None``: shuffled) wrapped in a :class:`~tasks.resume.ResumableSampler`
        starting where a resumed fit goes on, every sample loaded under its own seed
        (:class:`~tasks.resume.SeededDataset`). Evaluation: unpadded shards when distributed.
        Every loader draws its worker seeds from its own generator, never from the global RNG.
        """
        if not train and sampler is None and batch_sampler is None and dist.is_available() and dist.is_initialized():
            sampler = UnrepeatedDistributedSampler(dataset, shuffle=False)
        kwargs: dict[str, Any] = {
            "num_workers": self.num_workers,
            "collate_fn": collate_fn,
            "persistent_workers": self.num_workers > 0,
            "pin_memory": torch.cuda.is_available(),
            "generator": torch.Generator().manual_seed(global_seed()),
        }
        if batch_sampler is not None:
            return DataLoader(dataset, batch_sampler=batch_sampler, **kwargs)
        bs = batch_size or (self.batch_size if train else self.eval_batch_size)
        if train:
            epoch, done = train_position(self.trainer)
            sampler = ResumableSampler(
                dataset, sampler, seed=global_seed(), batch_size=bs, epoch=epoch, skip_batches=done
            )
            dataset = SeededDataset(dataset)
        return DataLoader(dataset, batch_size=bs, sampler=sampler, drop_last=train, **kwargs)
