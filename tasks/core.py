"""Training glue shared by every task (detection, segmentation, ReID).

One place for what the three Lightning tasks have in common, so none of them copies it:

* :class:`OptimConfig` + :func:`build_optimizer`: SGD/Adam/AdamW, no weight decay on norms and
  biases, a backbone learning-rate multiplier, linear warm-up then step/multistep/cosine decay,
  stepped every iteration (milestones are fractions of the whole run, so one YAML works for any
  dataset size);
* :class:`TaskModule`: a ``LightningModule`` base whose ``configure_optimizers`` uses the above
  (the backbone learning-rate multiplier aimed at ``TaskModule.backbone_path``), with
  :meth:`TaskModule.zero_loss` for batches with nothing readable, and checkpoints that rebuild
  without fetching the pretrained weights again (:data:`WEIGHTS_IN_CHECKPOINT`);
* :func:`publish_metrics`: evaluation metrics computed once on rank 0, shared with every rank,
  logged, printed and written to ``<log_dir>/<stage>_metrics.json``;
* :class:`TaskDataModule`: batch size / workers / loaders, with an *unpadded* distributed sampler
  for evaluation so metrics over N processes see every sample exactly once;
* :func:`all_gather_objects` / :func:`gather_unique`: collect per-sample results from every rank;
* :class:`AtomicCheckpointIO`: checkpoints written to a temp file in the same folder and renamed
  (Lightning's own writer stages through ``/tmp`` and falls back to a copy across file systems);
* :func:`cli_main`: the ``LightningCLI`` every ``python -m tasks.<task>`` runs, with forced
  checkpoint/LR-monitor callbacks, TensorBoard + CSV logs, and room for extra subcommands.
"""

from __future__ import annotations

import math
import numbers
import sys
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI
from pytorch_lightning.overrides.distributed import UnrepeatedDistributedSampler
from pytorch_lightning.plugins.io import TorchCheckpointIO
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from tasks.data.market import MarketConfig
from tasks.data.shapes import ShapesConfig
from vggbackbone.utils import atomic_path

__all__ = [
    "WEIGHTS_IN_CHECKPOINT",
    "AtomicCheckpointIO",
    "EvalReport",
    "InferenceOptimization",
    "OptimConfig",
    "TaskDataModule",
    "TaskModule",
    "all_gather_objects",
    "backbone_weights",
    "build_optimizer",
    "cli_main",
    "gather_unique",
    "is_global_zero",
    "print_metrics",
    "publish_metrics",
    "write_json",
]


# ---------------------------------------------------------------------------- optimisation
@dataclass
class OptimConfig:
    """Optimiser and learning-rate schedule, as written in the task YAML under ``model.optim``.

    Args:
        name: ``sgd`` (momentum), ``adam`` or ``adamw``.
        lr: peak learning rate (after warm-up).
        momentum: SGD momentum.
        nesterov: SGD Nesterov momentum.
        betas: Adam/AdamW betas.
        weight_decay: L2 / decoupled weight decay.
        no_decay_norm_bias: no weight decay on biases and normalisation parameters.
        backbone_lr_mult: learning-rate factor for the parameters of the module named
            ``backbone_prefix`` (pretrained backbones often train slower).
        backbone_prefix: module name of the backbone (parameters named ``<prefix>.*``). The
            default ``backbone`` means "the task's backbone": a :class:`TaskModule` maps it to
            its ``backbone_path`` (``model.backbone``, or the VGG body of a detector's FPN).
        scheduler: ``none`` (constant), ``step``/``multistep`` (x ``gamma`` at each milestone),
            or ``cosine`` (to ``min_lr_ratio * lr``).
        milestones: fractions of the total number of optimiser steps at which ``step``
            decays (the Faster R-CNN VOC07 recipe, 50k of 60k iterations, is ``[0.833]``).
        gamma: decay factor of ``step``.
        min_lr_ratio: final learning rate of ``cosine`` as a fraction of ``lr``.
        warmup_steps: linear warm-up iterations from ``warmup_factor * lr``.
        warmup_factor: starting factor of the warm-up.
    """

    name: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    nesterov: bool = False
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 1e-4
    no_decay_norm_bias: bool = True
    backbone_lr_mult: float = 1.0
    backbone_prefix: str = "backbone"
    scheduler: Literal["none", "step", "multistep", "cosine"] = "cosine"
    milestones: list[float] = field(default_factory=lambda: [0.75])
    gamma: float = 0.1
    min_lr_ratio: float = 0.0
    warmup_steps: int = 0
    warmup_factor: float = 0.001


# Hyper-parameters of a task or data module built in Python (not from YAML) hold these dataclasses
# themselves: allow them in torch.load(weights_only=True), which every checkpoint load here uses.
torch.serialization.add_safe_globals([OptimConfig, ShapesConfig, MarketConfig])


def _param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict[str, Any]]:
    norm_types = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)
    no_decay: set[str] = set()
    if cfg.no_decay_norm_bias:
        for mname, m in model.named_modules():
            for pname, _ in m.named_parameters(recurse=False):
                full = f"{mname}.{pname}" if mname else pname
                if isinstance(m, norm_types) or pname == "bias":
                    no_decay.add(full)
    prefix = cfg.backbone_prefix.rstrip(".") + "."
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        key = (name in no_decay, name.startswith(prefix))
        groups.setdefault(key, []).append(p)
    out = []
    for (nd, bb), params in sorted(groups.items()):
        out.append(
            {
                "params": params,
                "weight_decay": 0.0 if nd else cfg.weight_decay,
                "lr": cfg.lr * (cfg.backbone_lr_mult if bb else 1.0),
            }
        )
    return out


def lr_factor(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Multiplier of the base learning rate at optimiser step ``step`` (0-based)."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        alpha = step / cfg.warmup_steps
        warm = cfg.warmup_factor * (1 - alpha) + alpha
    else:
        warm = 1.0
    total = max(1, total_steps)
    if cfg.scheduler in ("step", "multistep"):
        decay = cfg.gamma ** sum(step >= m * total for m in cfg.milestones)
    elif cfg.scheduler == "cosine":
        t = min(1.0, max(0, step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
        decay = cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))
    else:
        decay = 1.0
    return warm * decay


def build_optimizer(
    model: nn.Module, cfg: OptimConfig, total_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """Optimiser over ``model``'s trainable parameters and a per-step ``LambdaLR``."""
    groups = _param_groups(model, cfg)
    if not groups:
        raise ValueError("the model has no trainable parameters (is everything frozen?)")
    if cfg.name == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    elif cfg.name == "adam":
        opt = torch.optim.Adam(groups, lr=cfg.lr, betas=cfg.betas)
    elif cfg.name == "adamw":
        opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)
    else:
        raise ValueError(f"unknown optimizer {cfg.name!r}")
    # LambdaLR rather than SequentialLR(LinearLR, ...): one closed-form factor is resumable
    # from any step and has no chained-scheduler edge cases.
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total_steps, cfg))
    return opt, sched


#: ``weights_backbone`` of a model rebuilt from a checkpoint: build it as the pretrained model it
#: was (tasks whose structure depends on it, e.g. a detector's frozen BatchNorm, keep that) but
#: load no weights, since the checkpoint's state dict replaces them.
WEIGHTS_IN_CHECKPOINT = "in_checkpoint"


def backbone_weights(weights: str | None) -> str | None:
    """The weights a task should load for its ``weights_backbone`` (none when a checkpoint brings them)."""
    return None if weights == WEIGHTS_IN_CHECKPOINT else weights


class TaskModule(pl.LightningModule):
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
    * :attr:`metrics_file`: where :func:`publish_metrics` writes evaluation metrics.
    """

    optim: OptimConfig
    #: where the pretrained backbone sits in the task: OptimConfig's default prefix points here
    backbone_path: str = "model.backbone"
    #: hyper-parameters naming pretrained weights, which a checkpoint replaces
    pretrained_hparams: tuple[str, ...] = ("weights_backbone",)
    #: evaluation metrics file, relative to the trainer's log folder (``None``: not written)
    metrics_file: str | None = "{stage}_metrics.json"

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

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
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
        from vggbackbone.weights import resolve_normalization

        try:
            norm = getattr(self.get_submodule(self.backbone_path), "normalization", None)
        except AttributeError:  # a task without a VGG backbone
            return True
        return norm is None or norm == resolve_normalization(None, len(norm.mean))

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
        opt, sched = build_optimizer(self, self.optim_config(), total)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}


# ---------------------------------------------------------------------------- data
class TaskDataModule(pl.LightningDataModule):
    """Common loader settings. Subclasses set ``self.train_set`` / ``self.val_set`` / ... in ``setup``.

    Evaluation loaders shard the dataset without padding when distributed (Lightning's
    ``UnrepeatedDistributedSampler``), so summed metrics count every sample exactly once.
    """

    def __init__(self, batch_size: int = 8, eval_batch_size: int | None = None, num_workers: int = 2) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers

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
        if not train and sampler is None and batch_sampler is None and dist.is_available() and dist.is_initialized():
            sampler = UnrepeatedDistributedSampler(dataset, shuffle=False)
        kwargs: dict[str, Any] = {
            "num_workers": self.num_workers,
            "collate_fn": collate_fn,
            "persistent_workers": self.num_workers > 0,
            "pin_memory": torch.cuda.is_available(),
        }
        if batch_sampler is not None:
            return DataLoader(dataset, batch_sampler=batch_sampler, **kwargs)
        bs = batch_size or (self.batch_size if train else self.eval_batch_size)
        return DataLoader(
            dataset,
            batch_size=bs,
            shuffle=train and sampler is None,
            sampler=sampler,
            drop_last=train,
            **kwargs,
        )


# ---------------------------------------------------------------------------- distributed
def is_global_zero() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def all_gather_objects(obj: Any) -> list[Any]:
    """``[obj_rank0, obj_rank1, ...]`` (just ``[obj]`` when not distributed).

    Works for any picklable object, on gloo and NCCL; a collective, so every rank must call it.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_unique(items: Mapping[Any, Any]) -> dict[Any, Any]:
    """Merge ``{sample_key: result}`` dicts from every rank, keeping one result per key.

    Distributed samplers may pad by repeating samples; keying results by sample id and merging
    here makes every metric see each sample once, whatever the number of processes.
    """
    merged: dict[Any, Any] = {}
    for part in all_gather_objects(dict(items)):
        for k, v in part.items():
            merged.setdefault(k, v)
    return merged


# ---------------------------------------------------------------------------- checkpoints
class AtomicCheckpointIO(TorchCheckpointIO):
    """Write checkpoints to a temp file beside the target, then ``os.replace`` it into place.

    A crash mid-save leaves the previous checkpoint intact: ``--ckpt_path last`` always resumes.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        if "://" in str(path):  # remote file systems: leave it to Lightning's fsspec writer
            super().save_checkpoint(checkpoint, path)
            return
        with atomic_path(path) as tmp:
            torch.save(checkpoint, tmp)


# ---------------------------------------------------------------------------- inference
class InferenceOptimization(pl.Callback):
    """Runs ``predict`` through :func:`vggbackbone.optimize_for_inference`.

    At the start of prediction the task's ``model`` is copied, its BatchNorms folded into the
    convolutions, switched to channels_last and to the precision the device runs fastest
    (``precision: auto``: bf16 on CUDA and AMX/AVX512-BF16 CPUs, fp32 elsewhere). Tasks read it
    as ``TaskModule.inference_model``; training and validation never see it. In the task YAML:
    ``inference: {enabled: true, precision: auto, compile: false}``; ``--inference.enabled false``
    predicts with the model exactly as trained.

    Args:
        enabled: optimise at all.
        precision: ``auto``, ``fp32``, ``bf16`` or ``fp16`` (autocast; outputs in float32).
        channels_last: NHWC weights and inputs.
        fuse_bn: fold BatchNorm into the preceding convolutions.
        compile: ``torch.compile`` the model too (pays off on long runs only).
    """

    def __init__(
        self,
        enabled: bool = True,
        precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto",
        channels_last: bool = True,
        fuse_bn: bool = True,
        compile: bool = False,
    ) -> None:
        self.enabled = enabled
        self.precision = precision
        self.channels_last = channels_last
        self.fuse_bn = fuse_bn
        self.compile = compile

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        model = getattr(pl_module, "model", None)
        if not self.enabled or not isinstance(model, nn.Module):
            return
        from vggbackbone.optimize import optimize_for_inference

        fast = optimize_for_inference(
            model, self.precision, channels_last=self.channels_last, fuse_bn=self.fuse_bn, compile=self.compile
        )
        # not an attribute assignment: a Module attribute would register it as a submodule
        pl_module.__dict__["_fast_model"] = fast

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pl_module.__dict__.pop("_fast_model", None)


# ---------------------------------------------------------------------------- reporting
def print_metrics(
    title: str, metrics: Mapping[str, float], table: Sequence[tuple[str, Sequence[Any]]] | None = None
) -> None:
    """Print a readable metrics table on global rank 0 (rich when available)."""
    if not is_global_zero():
        return
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # pragma: no cover - rich is a task dependency
        print(title, {k: round(float(v), 4) for k, v in metrics.items()})
        return
    t = Table(title=title, show_header=True, header_style="bold")
    t.add_column("metric")
    t.add_column("value", justify="right")
    for k, v in metrics.items():
        t.add_row(k, f"{float(v):.4f}")
    Console(stderr=False).print(t)
    if table:
        extra = Table(show_header=True, header_style="bold")
        for col, _ in table:
            extra.add_column(col)
        for row in zip(*(vals for _, vals in table)):
            extra.add_row(*(f"{v:.4f}" if isinstance(v, float) else str(v) for v in row))
        Console(stderr=False).print(extra)


@dataclass
class EvalReport:
    """What a task's evaluation computed (on global rank 0), for :func:`publish_metrics`.

    Args:
        metrics: scalar metrics by plain name (``AP``, ``mIoU``, ``mAP``...): logged as
            ``<stage>/<name>`` by every process and written to the metrics JSON.
        extra: JSON-only content (curves, confusion matrix, counts, settings).
        title: title of the printed table.
        table: extra printed columns (per-class numbers...), see :func:`print_metrics`.
        shown: the metrics printed in the table (default: all).
    """

    metrics: dict[str, float]
    extra: dict[str, Any] = field(default_factory=dict)
    title: str = ""
    table: Sequence[tuple[str, Sequence[Any]]] | None = None
    shown: Sequence[str] | None = None


def _json_safe(obj: Any) -> Any:
    """NaN/inf floats -> ``None`` (JSON ``null``), recursively: the file stays valid JSON."""
    if isinstance(obj, numbers.Real) and not isinstance(obj, numbers.Integral):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def publish_metrics(
    module: pl.LightningModule,
    stage: str,
    compute: Callable[[Path], EvalReport | None],
    *,
    prog_bar: Iterable[str] = (),
    verbose: bool = True,
) -> dict[str, float]:
    """Compute evaluation metrics once on rank 0, share them with every rank, log, print and write.

    Every process must call it (it is a collective). ``compute(log_dir)`` runs on global rank 0
    only (it may write its own files into ``log_dir``) and returns an :class:`EvalReport`, or
    ``None`` for nothing to report. Every process then logs the same ``<stage>/<name>`` values,
    so checkpoint monitors agree; a NaN metric (e.g. the IoU of a class absent from the set) is
    not logged at all rather than logged as a number. Rank 0 prints the table (``verbose``)
    and writes ``<log_dir>/<stage>_metrics.json`` (``module.metrics_file``) atomically:
    ``stage``, ``epoch``, ``global_step``, the metrics and ``extra``, NaN written as ``null``.
    Nothing happens during Lightning's sanity check. Returns the metrics.
    """
    trainer = module.trainer
    if trainer.sanity_checking:
        return {}
    # trainer.log_dir is a collective (a broadcast) under DDP: every rank must read it
    log_dir = Path(trainer.log_dir or trainer.default_root_dir)
    report = compute(log_dir) if is_global_zero() else None
    metrics: dict[str, float] = all_gather_objects(report.metrics if report is not None else None)[0] or {}
    shown_on_bar = set(prog_bar)
    for name, value in metrics.items():
        if not math.isnan(float(value)):
            module.log(f"{stage}/{name}", float(value), sync_dist=True, prog_bar=name in shown_on_bar)
    if report is None or not metrics:
        return metrics
    if verbose:
        printed = {k: metrics[k] for k in (report.shown if report.shown is not None else metrics)}
        print_metrics(report.title or stage, printed, report.table)
    filename = getattr(module, "metrics_file", TaskModule.metrics_file)
    if filename:
        out = {
            "stage": stage,
            "epoch": module.current_epoch,
            "global_step": module.global_step,
            **metrics,
            **report.extra,
        }
        write_json(log_dir / filename.format(stage=stage), _json_safe(out))
    return metrics


# ---------------------------------------------------------------------------- CLI
class OptionalLearningRateMonitor(LearningRateMonitor):
    """``LearningRateMonitor`` that stands aside when the run has no logger (``logger: false``)."""

    def on_train_start(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        self._active = bool(trainer.loggers)
        if self._active:
            super().on_train_start(trainer, *args, **kwargs)

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        if getattr(self, "_active", False):
            super().on_train_batch_start(trainer, *args, **kwargs)

    def on_train_epoch_start(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        if getattr(self, "_active", False):
            super().on_train_epoch_start(trainer, *args, **kwargs)


class TaskCLI(LightningCLI):
    """LightningCLI with the callbacks every task wants, configurable from YAML.

    * ``checkpoint:`` the best checkpoint by the task's metric (``best-<epoch>.ckpt``);
    * ``last_checkpoint:`` ``last.ckpt``, rewritten at the end of every training epoch, which is
      what ``--ckpt_path last`` and resuming use (Lightning 2.6's ``save_last`` only rewrites it
      when a new best is saved);
    * ``inference:`` :class:`InferenceOptimization` of the model used by ``predict``;
    * ``lr_monitor:`` learning-rate logging (inactive with ``trainer.logger: false``);
    * the task's own always-on callbacks (``callbacks=`` of :func:`cli_main`).

    Argument links from the data module to the model (``data.num_classes -> model.num_classes``)
    come from the task's ``links``. When ``trainer.default_root_dir`` is changed, the default
    loggers follow it.
    """

    task_name: str = "task"
    task_monitor: tuple[str, str] = ("val/loss", "min")
    task_links: Sequence[tuple[str, str, str]] = ()
    task_callbacks: Mapping[str, type[pl.Callback]] = {}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        monitor, mode = self.task_monitor
        parser.set_defaults(
            {
                "checkpoint.monitor": monitor,
                "checkpoint.mode": mode,
                "checkpoint.save_last": False,
                "checkpoint.save_top_k": 1,
                "checkpoint.filename": "best-{epoch:03d}",
                "checkpoint.auto_insert_metric_name": False,
            }
        )
        parser.add_lightning_class_args(ModelCheckpoint, "last_checkpoint")
        parser.set_defaults(
            {
                "last_checkpoint.monitor": None,
                "last_checkpoint.save_top_k": 1,
                "last_checkpoint.filename": "last",
                "last_checkpoint.enable_version_counter": False,
                "last_checkpoint.save_on_train_epoch_end": True,
            }
        )
        parser.add_lightning_class_args(InferenceOptimization, "inference")
        parser.add_lightning_class_args(OptionalLearningRateMonitor, "lr_monitor")
        parser.set_defaults({"lr_monitor.logging_interval": "step"})
        for key, callback_class in self.task_callbacks.items():
            parser.add_lightning_class_args(callback_class, key)
        for source, target, apply_on in self.task_links:
            parser.link_arguments(source, target, apply_on=apply_on)

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        self._cli_args = (
            None
            if isinstance(args, (dict, Mapping)) or hasattr(args, "as_dict")
            else (list(sys.argv[1:] if args is None else args))
        )
        super().parse_arguments(parser, args)

    def _parse_ckpt_path(self) -> None:
        """Checkpoint hyper-parameters fill the model config; what the user gave explicitly wins.

        Lightning 2.6 lets the checkpoint's stored ``model`` arguments override the config file and
        the command line, so ``validate --ckpt_path X --model.score_thresh 0.5`` would silently run
        with the training value. Here the user's explicit ``model`` values (config files and flags,
        without parser defaults) are applied again on top. Pretrained weights named in the config
        (``weights_backbone``) become :data:`WEIGHTS_IN_CHECKPOINT` where the checkpoint says so:
        its state dict replaces them, so they are not fetched (a checkpoint that kept naming its
        weights, see :meth:`TaskModule.on_save_checkpoint`, keeps them).
        """
        super()._parse_ckpt_path()
        sub = self.config.get("subcommand")
        if not sub or not self.config[sub].get("ckpt_path"):
            return
        stored = self.config[sub].get("model")  # the checkpoint's hyper-parameters, where it had some
        in_checkpoint = [
            key for key in getattr(self.model_class, "pretrained_hparams", ())
            if stored is not None and stored.get(key) == WEIGHTS_IN_CHECKPOINT
        ]  # fmt: skip
        if self._cli_args is not None:
            explicit = self.parser.parse_args(self._cli_args, defaults=False)
            model = explicit.get(sub, {}).get("model") if hasattr(explicit.get(sub, {}), "get") else None
            if model:
                given = model.as_dict() if hasattr(model, "as_dict") else dict(model)
                self.config = self.parser.parse_object({sub: {"model": given}}, self.config)
        model_cfg = self.config[sub].get("model")
        for key in in_checkpoint:
            if model_cfg.get(key) is not None:
                model_cfg[key] = WEIGHTS_IN_CHECKPOINT

    def before_instantiate_classes(self) -> None:
        cfg = self.config.get(self.subcommand, self.config) if self.subcommand else self.config
        trainer = cfg.get("trainer")
        if trainer is None:
            return
        default_root = f"runs/{self.task_name}"
        root = trainer.get("default_root_dir")
        loggers = trainer.get("logger")
        if root and root != default_root and isinstance(loggers, list):
            for logger in loggers:
                init = logger.get("init_args") if hasattr(logger, "get") else None
                if init is not None and init.get("save_dir") == default_root:
                    init["save_dir"] = root


def export_main(model_class: type[pl.LightningModule], task: str, argv: list[str]) -> Path:
    """``python -m tasks.<task> export --ckpt C --out model.onnx [--height H --width W]``.

    Loads a checkpoint of ``fit``, takes :meth:`TaskModule.export_model` and writes ONNX with
    dynamic batch and image size through :func:`vggbackbone.models.export.export_task_onnx`,
    checked against onnxruntime on two input sizes (``--no-verify`` skips that).
    """
    import argparse

    from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN

    from vggbackbone.models.export import export_task_onnx

    parser = argparse.ArgumentParser(prog=f"python -m tasks.{task} export", description=export_main.__doc__)
    parser.add_argument("--ckpt", required=True, help=f"checkpoint written by `python -m tasks.{task} fit`")
    parser.add_argument("--out", required=True, help="output .onnx file (written atomically)")
    parser.add_argument("--height", type=int, default=224, help="height of the example input (default 224)")
    parser.add_argument("--width", type=int, default=224, help="width of the example input (default 224)")
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    parser.add_argument("--no-verify", action="store_true", help="do not check the file with onnxruntime")
    args = parser.parse_args(argv)
    ckpt = Path(args.ckpt)
    if not ckpt.is_file():
        raise SystemExit(f"{ckpt}: checkpoint not found")
    module = model_class.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True)
    model = (module.export_model() if isinstance(module, TaskModule) else module.model).eval()
    if isinstance(model, GeneralizedRCNN):
        example = torch.rand(3, args.height, args.width)
    else:
        example = torch.rand(1, 3, args.height, args.width)
    kwargs: dict[str, Any] = {"verify": not args.no_verify}
    if args.opset is not None:
        kwargs["opset"] = args.opset
    out = export_task_onnx(model, args.out, example, **kwargs)
    print(f"export: {ckpt} -> {out}")
    return out


def cli_main(
    model_class: type[pl.LightningModule],
    datamodule_class: type[pl.LightningDataModule],
    *,
    task: str,
    monitor: tuple[str, str],
    links: Iterable[tuple[str, str, str]] = (),
    callbacks: Mapping[str, type[pl.Callback]] | None = None,
    extra_commands: Mapping[str, Callable[[list[str]], Any]] | None = None,
    args: list[str] | None = None,
    run: bool = True,
) -> TaskCLI | Any:
    """Entry point of ``python -m tasks.<task> fit|validate|test|predict --config ...``.

    ``callbacks`` maps YAML keys to callback classes that are always on (configured as
    ``<key>.<arg>``, e.g. a prediction writer). ``export`` (:func:`export_main`) is always
    there; ``extra_commands`` maps further subcommands (``extract``...) to functions that take
    the remaining argv. Logs and
    checkpoints go to ``runs/<task>/`` unless the YAML says otherwise
    (``trainer.default_root_dir``, ``trainer.logger``).
    """
    argv = list(sys.argv[1:] if args is None else args)
    commands: dict[str, Callable[[list[str]], Any]] = {"export": lambda rest: export_main(model_class, task, rest)}
    commands.update(extra_commands or {})
    if argv and argv[0] in commands:
        return commands[argv[0]](argv[1:])

    attrs = {
        "task_name": task,
        "task_monitor": monitor,
        "task_links": tuple(links),
        "task_callbacks": dict(callbacks or {}),
    }
    cli_cls = type(f"{task.capitalize()}CLI", (TaskCLI,), attrs)
    root = f"runs/{task}"
    trainer_defaults = {
        "default_root_dir": root,
        "plugins": [{"class_path": "tasks.core.AtomicCheckpointIO"}],
        "logger": [
            # the first logger's folder (runs/<task>/version_N) also holds checkpoints and config.yaml
            {
                "class_path": "pytorch_lightning.loggers.TensorBoardLogger",
                "init_args": {"save_dir": root, "name": "", "default_hp_metric": False},
            },
            {"class_path": "pytorch_lightning.loggers.CSVLogger", "init_args": {"save_dir": root, "name": "csv"}},
        ],
    }
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*LightningCLI.*subclass_mode.*")
        return cli_cls(
            model_class,
            datamodule_class,
            trainer_defaults=trainer_defaults,
            seed_everything_default=0,
            save_config_kwargs={"overwrite": True},
            args=args,  # None: LightningCLI reads sys.argv itself (and does not warn)
            run=run,
        )


def write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as indented JSON atomically (on global rank 0 only); return the path."""
    import json

    path = Path(path)
    if is_global_zero():
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(obj, indent=2, default=float))
    return path
