"""The Lightning base every task builds on: :class:`TaskModule` (and :class:`TaskDataModule`, from
:mod:`tasks.datamodule`)."""

from __future__ import annotations

import copy
import inspect
import math
import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any, ClassVar

import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from tasks.checkpoint import TASK_KEY, WEIGHTS_IN_CHECKPOINT, check_finite, state_dict_mismatch, task_name
from tasks.classes import ClassesMixin, adopt_checkpoint_classes, announce, meet_data, record_classes
from tasks.datamodule import TaskDataModule
from tasks.deprecation import renamed, warn_once
from tasks.ema import EMAConfig, ModelEMA, ema_config
from tasks.hparams import capturing_init
from tasks.optim import OptimConfig, build_optimizer, lr_scheduler_config
from tasks.outputs import require_some
from tasks.reporting import DEFAULT_METRICS_FILE
from tasks.skips import SkipCounter, SkippedSample, skips_text
from tasks.tta import TaskKind, TTAConfig, tta_config
from tasks.writer import predict_source
from vggbackbone.weights import resolve_normalization

__all__ = ["TaskDataModule", "TaskModule", "moved_option"]


class TaskModule(ClassesMixin, pl.LightningModule):
    """Base ``LightningModule``: subclasses set ``self.optim`` and build ``self.model``.

    What every task shares:

    * ``configure_optimizers``: :func:`build_optimizer` over the task, ``backbone_lr_mult``
      applied to the module at :attr:`backbone_path` (see :meth:`optim_config`);
    * :meth:`zero_loss`: the training loss of a batch with nothing readable in it;
    * options: the arguments of the task's ``__init__`` (builder options included, defaults
      filled in) are its hyper-parameters, captured from its signature (:mod:`tasks.hparams`);
      old option names are accepted and warned about once (:meth:`normalize_options`);
    * unreadable images: the hooks count every batch's readable and skipped images, training in
      :attr:`train_skips`, evaluation and ``predict`` in :attr:`eval_skips`, and report them once
      per epoch and stage (:class:`tasks.skips.SkipCounter`); a task only adds the images it
      skips itself (an image smaller than its network);
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
    #: old option name -> new one (``batch_norm_eval`` -> ``norm_eval``): accepted, warned once, stored as the new
    renamed_options: ClassVar[Mapping[str, str]] = {}
    #: old options that now belong to the writer (``predict_dir``), each with the ``writer.*`` options its
    #: value becomes: accepted, warned once, never stored (:meth:`normalize_options`, ``tasks.cli``)
    moved_options: ClassVar[Mapping[str, Callable[[Any], dict[str, Any]]]] = {}
    #: other old options that :meth:`normalize_options` expands (``head_kwargs``): accepted, never stored
    old_options: ClassVar[tuple[str, ...]] = ()
    #: the option naming the builder of ``builder_args`` (``family``); ``None``: its only builder
    builder_option: ClassVar[str | None] = None
    #: what ``predict`` writes (``writer.*`` in the YAML): a :class:`tasks.writer.PredictionWriter` subclass
    writer_class: ClassVar[type[pl.Callback] | None] = None
    #: ``model.ema`` (:mod:`tasks.ema`) and ``model.tta`` (:mod:`tasks.tta`), set by :meth:`averaging_options`
    ema: EMAConfig | None = None
    tta: TTAConfig | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Every task's ``__init__`` records its options (:func:`tasks.hparams.capturing_init`)."""
        super().__init_subclass__(**kwargs)
        if "__init__" in cls.__dict__:
            cls.__init__ = capturing_init(cls.__dict__["__init__"])  # type: ignore[method-assign]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: skipped and readable images of training, and of evaluation and ``predict``, counted apart
        #: (validation runs inside a training epoch) from every batch, by the hooks below
        self.train_skips = SkipCounter()
        self.eval_skips = SkipCounter()
        #: what the last evaluation or ``predict`` skipped, on every process (set when it ends)
        self.eval_skipped: list[SkippedSample] = []
        self._predict_reported = False
        self._step_terms: dict[str, Any] = {}

    def normalize_options(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The ``__init__`` arguments with the old option names replaced (each warned about once).

        Runs before ``__init__``: :attr:`renamed_options` become their new names;
        :attr:`moved_options` are kept aside for :meth:`configure_callbacks` (the CLI moves them
        to ``writer.*`` itself); a subclass expands its :attr:`old_options` here.
        """
        params = inspect.signature(type(self).__init__).parameters
        for old, new in self.renamed_options.items():
            value = kwargs.pop(old, None)
            if value is not None:
                default = params[new].default if new in params else None
                current = kwargs.get(new, default)
                # the same value under both names (an old checkpoint's `head` beside a config's `family`) is no clash
                kwargs[new] = renamed("model", old, new, value, default if current == value else current, default)
        self._writer_options: dict[str, Any] = {}
        for old, convert in self.moved_options.items():
            value = kwargs.pop(old, None)
            if value is not None:
                self._writer_options.update(moved_option(old, convert(value)))
        return kwargs

    @classmethod
    def checkpointed_options(cls, options: Mapping[str, Any]) -> dict[str, Any]:
        """What a checkpoint stores of the captured ``__init__`` options: all but the old names, with
        the chosen builder's own default for the options whose default depends on the builder."""
        old = {*cls.renamed_options, *cls.moved_options, *cls.old_options}
        out = {k: v for k, v in options.items() if k not in old}
        args = getattr(cls, "builder_args", None)
        if args is not None:
            name = out.get(cls.builder_option) if cls.builder_option else next(iter(args.builders))
            out.update(args.hparams(name, out))
        return out

    def averaging_options(self, ema: Any, tta: Any, kind: TaskKind) -> None:
        """Set :attr:`ema` and :attr:`tta` from the ``model.ema``/``model.tta`` options (checked, by name)."""
        self.ema = ema_config(ema)
        self.tta = tta_config(tta, kind)

    def configure_callbacks(self) -> list[pl.Callback]:
        """The :attr:`writer_class` writer of an old-style output option given in Python (``predict_dir``);
        :class:`~tasks.ema.ModelEMA` when ``model.ema`` is set."""
        options = getattr(self, "_writer_options", None)
        callbacks = [self.writer_class(**options)] if options and self.writer_class is not None else []
        return callbacks + ([ModelEMA(self.ema)] if self.ema is not None else [])

    def save_options(self, hparams: Mapping[str, Any]) -> None:
        """``save_hyperparameters`` of exactly ``hparams`` (every option, builder options included).

        Called with the options captured from ``__init__`` (:mod:`tasks.hparams`). Tasks whose
        ``__init__`` signature carries their builder's options
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
            self._step_terms[name] = value.detach() if isinstance(value, Tensor) else value
        super().log(name, value, *args, **kwargs)

    def on_train_epoch_start(self) -> None:
        self.train_skips.reset()

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._step_terms = {}
        self.train_skips.count(batch)

    def on_before_backward(self, loss: Tensor) -> None:
        """Stop on a NaN/inf loss, naming the step and the loss terms logged by ``training_step``."""
        if bool(torch.isfinite(loss.detach()).all()):
            return
        terms = ", ".join(
            f"{k}={float(v):.6g}" if isinstance(v, Tensor) and v.numel() == 1 else f"{k}={v}"
            for k, v in self._step_terms.items()
        )
        raise FloatingPointError(
            f"non-finite training loss {float(loss.detach().float().mean())} at step {self.global_step} "
            f"(epoch {self.current_epoch}){': ' + terms if terms else ''}; lower model.optim.lr, raise "
            "model.optim.warmup_steps, or set trainer.gradient_clip_val. Nothing was written from these weights."
        )

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if batch_idx + 1 != self.trainer.num_training_batches:  # check once, at the end of the epoch
            return
        if self._total(self.train_skips.readable) == 0:
            raise RuntimeError(
                f"training epoch {self.current_epoch}: every image of the training split was unreadable "
                f"({skips_text(self.train_skips.items)}); nothing was learnt, stopping"
            )

    def on_train_epoch_end(self) -> None:
        """One warning naming the images the epoch skipped, on every process (a collective)."""
        self.train_skips.report(f"training epoch {self.current_epoch}")

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

    def on_predict_epoch_start(self) -> None:
        self.eval_skips.reset()
        self._predict_reported = False

    def on_predict_batch_start(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.eval_skips.count(batch)

    def predict_skipped(self, warn: bool = True) -> list[SkippedSample]:
        """What ``predict`` skipped on every process, warned once (a collective; the first call of a
        run reports, later ones return the same list). The writer calls it (callbacks' epoch-end
        hooks run first), :meth:`on_predict_epoch_end` otherwise; ``warn=False``: a caller that
        reports them itself (``extract``)."""
        if not self._predict_reported:
            self.eval_skipped = self.eval_skips.report("predict", warn=warn)
            self._predict_reported = True
        return self.eval_skipped

    def on_predict_epoch_end(self) -> None:
        """Without a writer (which checks what it wrote), a ``predict`` that read no image is an error too."""
        if self._predict_reported:  # a writer took the report: it checked the run
            return
        skipped = self.predict_skipped()
        if self._total(self.eval_skips.readable) == 0:  # (negative: some batch of unknown size)
            by = getattr(self.writer_class, "by", f"{type(self).__name__} predict")
            require_some(0, by, predict_source(getattr(self.trainer, "datamodule", None)), skipped)

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
        self.eval_skips.count(batch)
        self.eval_step(batch)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.eval_skips.count(batch)
        self.eval_step(batch)

    def on_validation_epoch_start(self) -> None:
        self._start_eval("val")

    def on_test_epoch_start(self) -> None:
        self._start_eval("test")

    def on_validation_epoch_end(self) -> None:
        self._end_eval("val")

    def on_test_epoch_end(self) -> None:
        self._end_eval("test")

    def _start_eval(self, stage: str) -> None:
        announce(self)
        self.eval_skips.reset()
        self.eval_epoch_start(stage)

    def _end_eval(self, stage: str) -> None:
        """Every process: report the skipped images (:attr:`eval_skipped`), refuse an evaluation that
        read none, then :meth:`eval_epoch_end`."""
        local = list(self.eval_skips.items)  # this process's, for the message of an evaluation that read nothing
        self.eval_skipped = self.eval_skips.report(f"{stage} evaluation")
        self._check_eval_readable(stage, local)
        self.eval_epoch_end(stage)

    def _check_eval_readable(self, stage: str, local: list[SkippedSample]) -> None:
        """An evaluation that read no image at all is an error, not a metric of nothing (AP -1)."""
        if self._trainer is None or self.trainer.sanity_checking:  # the sanity check sees a few batches only
            return
        counted = self.eval_skips.readable
        if not self.eval_skips.batches:  # no batch here, or a task with its own validation_step/test_step
            own = getattr(type(self), f"{'validation' if stage == 'val' else 'test'}_step")
            counted = 0 if own is getattr(TaskModule, own.__name__) else -1
        if self._total(counted) == 0:
            raise RuntimeError(
                f"{stage} evaluation: every image of the {stage} split was unreadable "
                f"({skips_text(local)}): no metric to report, stopping"
            )

    # -- export --
    def export_example(self, height: int, width: int) -> Any:
        """An example input of :meth:`export_model` (``(1, 3, H, W)``; detectors take a list of ``(3, H, W)``)."""
        return torch.rand(1, 3, height, width)


def moved_option(old: str, writer_options: Mapping[str, Any]) -> dict[str, Any]:
    """``writer_options``, the new home of the old model option ``old`` (warned about once)."""
    new = ", ".join(f"writer.{k}: {v}" for k, v in writer_options.items())
    warn_once("model", old, f"model.{old} is deprecated: predict output is configured under writer; write {new}")
    return dict(writer_options)
