"""Callbacks every task CLI adds: inference optimisation for ``predict`` and an optional LR monitor."""

from __future__ import annotations

from typing import Any, Literal

import pytorch_lightning as pl
from pytorch_lightning.callbacks import LearningRateMonitor
from torch import nn

__all__ = ["InferenceOptimization", "OptionalLearningRateMonitor"]


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
