"""Callbacks every task CLI adds: inference optimisation for ``predict`` and an optional LR monitor."""

from __future__ import annotations

from collections.abc import Sized
from typing import Any, Literal

import numpy as np
import pytorch_lightning as pl
from pytorch_lightning.callbacks import LearningRateMonitor
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from tasks.images import SkippedSample
from vggbackbone.deploy import InputCaptured, InputRecorder

__all__ = ["MAX_CALIBRATION_IMAGES", "InferenceOptimization", "OptionalLearningRateMonitor", "calibration_inputs"]

#: Most images ``inference.calibration_images`` may take: int8 calibrates on a small sample of the
#: images (at most 64, docs/inference.md), not on the whole input.
MAX_CALIBRATION_IMAGES = 64
#: Images ``precision: int8`` calibrates on when ``inference.calibration_images`` is not given.
DEFAULT_CALIBRATION_IMAGES = 32


def _is_skipped(item: Any) -> bool:
    return isinstance(item, SkippedSample) or (
        isinstance(item, tuple) and any(isinstance(x, SkippedSample) for x in item)
    )


def calibration_inputs(trainer: pl.Trainer, pl_module: pl.LightningModule, num_images: int) -> list[Any]:
    """Up to ``num_images`` model inputs for int8 calibration, in the form the model's forward takes.

    The images: the datamodule's ``calibration_set(num_images)`` where it defines one (``python -m
    tasks.reid extract``: spread over the *whole* image list, so a resumed run calibrates the
    same), else ``num_images`` images spread evenly over the predict dataset (first, last and
    evenly spaced between: the images ``predict`` runs on, which are there whatever else is; a
    checkpoint and an image folder is all ``predict`` needs). Unreadable images are passed
    over (they are reported by the predict run itself).

    The form: each image goes, one per batch, through the predict loader's collate, the device
    transfer and the task's own ``predict_step``, with the model replaced by a recorder that
    keeps what the step would pass to the model and stops the step there (nothing is written,
    nothing is counted). So calibration sees exactly what prediction feeds the model: a list of
    ``[0, 1]`` images for a detector (resized inside the model), a normalised, rescaled image
    (the first window, when sliding) for segmentation, a resized ``[0, 1]`` batch for ReID.
    """
    loaders = trainer.predict_dataloaders
    loader = loaders[0] if isinstance(loaders, (list, tuple)) else loaders
    if not isinstance(loader, DataLoader):
        raise TypeError(f"int8 calibration needs the predict DataLoader, got {type(loader).__name__}")
    make_set = getattr(trainer.datamodule, "calibration_set", None) if trainer.datamodule is not None else None
    if callable(make_set):
        dataset: Dataset = make_set(num_images)
    else:
        dataset = loader.dataset
        size = len(dataset) if isinstance(dataset, Sized) else 0
        if size == 0:
            raise ValueError("int8 calibration: the predict dataset has no (countable) images")
        picks = np.unique(np.linspace(0, size - 1, min(num_images, size)).round().astype(int))
        dataset = Subset(dataset, picks.tolist())
    recorder = InputRecorder()
    pl_module.__dict__["_fast_model"] = recorder  # what TaskModule.inference_model returns
    try:
        for i in range(len(dataset)):  # type: ignore[arg-type]
            item = dataset[i]
            if _is_skipped(item):
                continue
            batch = loader.collate_fn([item]) if loader.collate_fn is not None else item
            batch = trainer.strategy.batch_to_device(batch)
            try:
                pl_module.predict_step(batch, i)
            except InputCaptured:
                continue
            raise RuntimeError(
                f"int8 calibration: {type(pl_module).__name__}.predict_step did not call "
                "self.inference_model, so its model input cannot be captured"
            )
    finally:
        pl_module.__dict__.pop("_fast_model", None)
    if not recorder.inputs:
        raise ValueError(f"int8 calibration: none of the {len(dataset)} calibration images could be read")  # type: ignore[arg-type]
    return recorder.inputs


class InferenceOptimization(pl.Callback):
    """Runs ``predict`` through :func:`vggbackbone.optimize_for_inference`.

    At the start of prediction the task's ``model`` is copied, its BatchNorms folded into the
    convolutions, switched to channels_last and to the precision the device runs fastest
    (``precision: auto``: the fastest of fp32 / bf16 measured on a CPU, bf16 on CUDA; int8 too
    when ``calibration_images`` is given and int8 wins the probe). Tasks read it as ``TaskModule.inference_model``;
    training and validation never see it. In the task YAML: ``inference: {enabled: true,
    precision: auto, compile: false}``; ``--inference.enabled false`` predicts with the model
    exactly as trained.

    ``precision: int8`` first calibrates on ``calibration_images`` images taken by
    :func:`calibration_inputs` (spread over the predict images), then quantises the model's VGG
    backbones (:func:`vggbackbone.optimize.quantize_int8`). On a CPU without AVX512-VNNI,
    AVX-VNNI or AMX-INT8 the library warns and runs fp32 (no calibration is read then).

    Args:
        enabled: optimise at all.
        precision: ``auto``, ``fp32``, ``bf16``, ``fp16`` (autocast; outputs in float32) or ``int8``.
        channels_last: NHWC weights and inputs.
        fuse_bn: fold BatchNorm into the preceding convolutions.
        compile: ``torch.compile`` the model too (pays off on long runs only; int8 always compiles
            its quantised parts).
        calibration_images: images int8 calibrates on (1 to :data:`MAX_CALIBRATION_IMAGES`;
            ``int8`` takes 32 when it is not given). Given with ``precision: auto``, it lets auto
            pick int8: where the CPU has int8 kernels and int8 wins the probe
            (:func:`vggbackbone.deploy.precision.auto_precision`, logged with the reason), the
            images are read and the model quantised; otherwise auto picks as without them.
        runtime: ``torch`` or ``openvino`` (the model exported to ONNX and run by OpenVINO on the
            CPU, int8 by NNCF on the same calibration images; ``precision: default`` is
            OpenVINO's own hint; needs the ``openvino`` extra; ``compile`` must stay off), or
            ``auto``: ``openvino`` where it applies (installed, CPU, no ``compile``, not fp16),
            ``torch`` otherwise, logged with the reason.
    """

    def __init__(
        self,
        enabled: bool = True,
        precision: Literal["auto", "fp32", "bf16", "fp16", "int8", "default"] = "auto",
        channels_last: bool = True,
        fuse_bn: bool = True,
        compile: bool = False,
        calibration_images: int | None = None,
        runtime: Literal["torch", "openvino", "auto"] = "torch",
    ) -> None:
        if calibration_images is not None and not 1 <= calibration_images <= MAX_CALIBRATION_IMAGES:
            raise ValueError(
                f"inference.calibration_images must be between 1 and {MAX_CALIBRATION_IMAGES}, got {calibration_images}"
            )
        if runtime == "openvino" and compile:
            raise ValueError(
                "inference.compile does not apply to inference.runtime: openvino (OpenVINO compiles itself)"
            )
        if runtime not in ("torch", "openvino", "auto"):
            raise ValueError(f"inference.runtime must be torch, openvino or auto, got {runtime!r}")
        if precision == "default" and runtime == "torch":
            raise ValueError("inference.precision: default (OpenVINO's own choice) needs inference.runtime: openvino")
        self.runtime = runtime
        self.calibration_images = calibration_images
        self.enabled = enabled
        self.precision = precision
        self.channels_last = channels_last
        self.fuse_bn = fuse_bn
        self.compile = compile

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        model = getattr(pl_module, "model", None)
        if not self.enabled or not isinstance(model, nn.Module):
            return
        from vggbackbone.deploy import int8_supported, optimize_for_inference
        from vggbackbone.deploy.precision import resolve_runtime

        self.runtime = resolve_runtime(self.runtime, pl_module.device, self.precision, self.compile)
        if self.precision == "default" and self.runtime != "openvino":
            raise ValueError("inference.precision: default (OpenVINO's own choice) needs inference.runtime: openvino")
        precision = self._auto_choice(pl_module) if self.precision == "auto" else self.precision
        calibration = None
        if precision == "int8" and int8_supported()[0]:  # no int8 kernels: the library's fp32 fallback
            calibration = calibration_inputs(trainer, pl_module, self.calibration_images or DEFAULT_CALIBRATION_IMAGES)
        elif precision == "int8":
            calibration = []  # never read: optimize_for_inference falls back to fp32 with its warning
        fast = optimize_for_inference(
            model,
            precision,
            channels_last=self.channels_last,
            fuse_bn=self.fuse_bn,
            compile=self.compile,
            calibration=calibration,
            runtime=self.runtime,
        )
        # not an attribute assignment: a Module attribute would register it as a submodule
        pl_module.__dict__["_fast_model"] = fast

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pl_module.__dict__.pop("_fast_model", None)

    def _auto_choice(self, pl_module: pl.LightningModule) -> str:
        """``precision: auto``: ``auto`` itself without calibration images (the library decides);
        with them, the probe's choice among fp32 / bf16 / int8 (so that the images are only read
        when int8 is picked), logged with why."""
        if self.calibration_images is None or pl_module.device.type != "cpu":
            return "auto"
        from vggbackbone.deploy.precision import auto_precision, resolve_openvino_precision

        if self.runtime == "openvino":
            return resolve_openvino_precision("auto", calibrated=True)
        return auto_precision(pl_module.device, calibrated=True)


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
