"""One call for fast inference: BN folding, channels_last, reduced precision, ``torch.compile``.

>>> from vggbackbone import VGGBackbone, optimize_for_inference
>>> fast = optimize_for_inference(VGGBackbone("vgg16_bn"))            # doctest: +SKIP
>>> feats = fast(images)                                              # doctest: +SKIP

What each step does, and when it helps (measured numbers: ``docs/benchmarks.md``):

* **BN folding** (:mod:`.batchnorm`): every ``Conv2d -> BatchNorm2d`` (and ``Linear ->
  BatchNorm1d``) pair that sits next to each other in an ``nn.Sequential`` becomes one conv
  with rescaled weights; the BatchNorm becomes ``nn.Identity``. Exact up to fp32 rounding.
* **channels_last**: 4-D weights and 4-D floating inputs are converted to NHWC, the layout
  oneDNN (CPU) and cuDNN tensor cores run fastest.
* **precision** (:mod:`.precision`): ``"bf16"``/``"fp16"`` run the model under
  :func:`torch.autocast`, so ops that need fp32 (losses, box decoding, RoI ops, softmax) keep
  it; floating outputs are cast back to float32. ``"int8"`` (CPU, needs ``calibration``)
  quantises every VGG backbone inside the model with torchao's PT2E flow and the x86 inductor
  quantizer and compiles it (:func:`~.int8.quantize_int8`); on a CPU without int8 kernels it
  falls back to fp32 with a warning. ``"auto"``: on a CPU, the fastest of fp32 / bf16 / int8
  (int8 only with ``calibration``) on a probe convolution, measured once per process and
  logged; on CUDA bf16 where supported, else fp16. On AVX2-only CPUs oneDNN has no fast
  bf16/fp16 convolution kernels (5-100x *slower* than fp32), and the probe sees it.
* **compile**: :func:`torch.compile` with inductor and ``freezing`` (weights become constants,
  so inductor can pre-pack them for oneDNN and fold the autocast weight casts). ``True`` or
  ``"max-autotune"``; costs a one-off compile time on the first call of each input shape.

Tolerance (max relative error ``max|y - y_ref| / max|y_ref|`` per output tensor vs the fp32
eager model, VGG16 conv taps, checked in ``tests/test_optimize.py``): fp32 (with folding
and channels_last) <= 1e-4 (typically ~1e-6); fp16 <= 1e-2; bf16 <= 5e-2 (typically ~1e-2);
int8: :data:`~.int8.INT8_TOLERANCE` (``tests/test_int8.py``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch
from torch import nn

from .batchnorm import fold_batchnorm
from .int8 import quantization_targets, quantize_int8
from .openvino_runtime import OpenVINOModule
from .precision import DTYPES, Precision, resolve_openvino_precision, resolve_precision, resolve_runtime

__all__ = ["COMPILE_MODES", "RELATIVE_TOLERANCE", "CompileMode", "InferenceModule", "optimize_for_inference"]

CompileMode = bool | Literal["default", "max-autotune", "reduce-overhead"]
COMPILE_MODES: tuple[CompileMode, ...] = (False, True, "default", "max-autotune", "reduce-overhead")

#: Documented bound on ``max|y - y_ref| / max|y_ref|`` per output vs the fp32 eager model.
RELATIVE_TOLERANCE: dict[str, float] = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 5e-2}


def map_tensors(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """Apply ``fn`` to every tensor in nested lists/tuples/dicts (keeps OrderedDict, namedtuple)."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return type(obj)((k, map_tensors(v, fn)) for k, v in obj.items())
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(map_tensors(v, fn) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(map_tensors(v, fn) for v in obj)
    return obj


def _input_mover(device: torch.device, channels_last: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """What an input tensor goes through: to ``device``, 4-D floating ones to NHWC when asked."""

    def move(t: torch.Tensor) -> torch.Tensor:
        if channels_last and t.dim() == 4 and t.is_floating_point():
            return t.to(device, memory_format=torch.channels_last)
        return t.to(device)

    return move


def _float32_output(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.is_floating_point() and t.dtype != torch.float32 else t


class _Autocast(nn.Module):
    """Runs ``model`` under autocast: the unit that ``torch.compile`` sees (autocast included)."""

    def __init__(self, model: nn.Module, device_type: str, dtype: torch.dtype | None) -> None:
        super().__init__()
        self.model = model
        self.device_type = device_type
        self.dtype = dtype

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.dtype is None:
            return self.model(*args, **kwargs)
        with torch.autocast(self.device_type, dtype=self.dtype):
            return self.model(*args, **kwargs)


def _compile_options(compile: CompileMode, device: torch.device) -> dict[str, Any]:
    """Inductor options for ``compile``: the mode's options plus ``freezing``.

    Freezing makes the parameters graph constants, so inductor pre-packs conv weights for oneDNN
    and folds autocast's weight casts once instead of on every call. ``torch.compile`` refuses
    ``mode=`` together with ``options=``, hence the mode's options are spelled out here.
    """
    from torch._inductor import list_mode_options

    mode = "default" if compile is True else str(compile)
    options: dict[str, Any] = {**list_mode_options(mode), "freezing": True}
    if device.type != "cuda":
        options.pop("triton.cudagraphs", None)
    return options


class InferenceModule(nn.Module):
    """An eval-only wrapper around a prepared model; made by :func:`optimize_for_inference`.

    ``forward`` takes the wrapped model's arguments: floating tensors (also inside lists,
    tuples, dicts: a detector's list of images) move to the model's device, and 4-D ones to
    channels_last when enabled. It runs under :func:`torch.inference_mode`, and returns the
    model's outputs with floating tensors in float32 (their memory format may be
    channels_last: call ``.contiguous()`` before ``.view``). Attributes of the wrapped model
    (``out_channels``, ``feature_info`` ...) are reachable on the wrapper. The device is fixed
    at creation (autocast and compilation are set up for it): to move, optimize again.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        device: torch.device,
        precision: str,
        channels_last: bool,
        compile: CompileMode,
        folded_batchnorms: int,
        quantized: tuple[str, ...] = (),
    ) -> None:
        super().__init__()
        self.model = model
        self.device = device  # fixed: autocast and compilation are set up for it
        self.precision = precision
        self.channels_last = channels_last
        self.compile_mode = compile
        self.folded_batchnorms = folded_batchnorms
        self.quantized = quantized  # names of the submodules running int8 ("" = the whole model)
        amp_dtype = DTYPES[precision] if precision in ("bf16", "fp16") else None
        runner: nn.Module = _Autocast(model, device.type, amp_dtype)
        if compile:
            runner = torch.compile(runner, options=_compile_options(compile, device))
        # Not a registered submodule: it wraps ``self.model``, whose weights must appear once in state_dict.
        self.__dict__["_runner"] = runner
        super().train(False)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        args, kwargs = map_tensors((args, kwargs), _input_mover(self.device, self.channels_last))
        with torch.inference_mode():
            out = self._runner(*args, **kwargs)
        return map_tensors(out, _float32_output)

    def train(self, mode: bool = True) -> InferenceModule:
        if mode:
            raise RuntimeError(
                "an InferenceModule cannot be trained (BatchNorm is folded, outputs carry no autograd graph); "
                "train the original model and call optimize_for_inference again"
            )
        return super().train(False)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            model = super().__getattr__("model")
            return getattr(model, name)

    def extra_repr(self) -> str:
        return (
            f"precision={self.precision}, channels_last={self.channels_last}, compile={self.compile_mode}, "
            f"folded_batchnorms={self.folded_batchnorms}, device={self.device}"
            + (f", quantized={list(self.quantized)}" if self.quantized else "")
        )


def _model_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def optimize_for_inference(
    model: nn.Module,
    precision: Precision | Literal["default"] = "auto",
    channels_last: bool = True,
    fuse_bn: bool = True,
    compile: CompileMode = False,
    device: torch.device | str | None = None,
    inplace: bool = False,
    calibration: Iterable[Any] | None = None,
    runtime: Literal["torch", "openvino", "auto"] = "torch",
) -> InferenceModule | OpenVINOModule:
    """Return an eval-mode, inference-only version of ``model`` that runs faster.

    Works on any ``nn.Module``: a :class:`~vggbackbone.VGGBackbone` (dict of taps), a task
    model (detector taking a list of images, segmenter, ReID net), or a user model with VGG
    blocks inside.

    Args:
        model: the trained model (its mode does not matter; the result is in eval mode).
        precision: ``"auto"``, ``"fp32"``, ``"bf16"``, ``"fp16"`` (autocast; outputs come back as
            float32) or ``"int8"`` (CPU; needs ``calibration``: the VGG backbones are quantised
            with :func:`~vggbackbone.deploy.int8.quantize_int8` and compiled, the rest stays
            fp32; fast with VNNI/AMX, slower but still ahead of fp32 on AVX2 alone (logged); on a
            CPU with neither it falls back to fp32 with a warning naming what is missing).
            ``"auto"``: on a CPU, whichever of fp32 / bf16 / int8 (int8 only with
            ``calibration`` where :func:`~vggbackbone.deploy.hardware.int8_supported`) runs a
            probe convolution fastest, measured once per process and logged (``logging``, logger
            ``vggbackbone.optimize``); on CUDA bf16 where supported, else fp16. Asking for a
            precision the device runs slowly warns.
        channels_last: convert 4-D weights and inputs to NHWC.
        fuse_bn: fold BatchNorm into the preceding conv/linear
            (:func:`~vggbackbone.deploy.batchnorm.fold_batchnorm`).
        compile: ``False``; ``True`` (inductor with freezing) or ``"max-autotune"``. The first
            call per input shape compiles (tens of seconds on a small CPU). With int8 the
            quantised parts are always compiled and the rest runs eager.
        device: where to run; default: the device of the model's parameters.
        inplace: modify ``model`` itself instead of a deep copy (saves memory for large models).
        calibration: for int8, an iterable of input batches, each called as ``model(batch)``
            (tensors, or lists of images for a detector); a few batches of real images (e.g.
            64 training images) suffice. Only used by ``"int8"`` (and ``"auto"``).
        runtime: ``"torch"`` (the above) or ``"openvino"``: the model exported to ONNX and run by
            OpenVINO on the CPU (:class:`~vggbackbone.deploy.openvino_runtime.OpenVINOModule`,
            same call interface; converted on the first call). Precisions there: ``"fp32"``,
            ``"bf16"``, ``"default"`` (OpenVINO's own hint: bf16 on CPUs with bf16 kernels),
            ``"int8"`` (NNCF on ``calibration``), ``"auto"`` (int8 with calibration where the
            CPU has int8 kernels, else ``"default"``; logged). Needs the ``openvino`` extra.
            ``"auto"``: ``"openvino"`` where it applies (installed, CPU, no ``compile``, not
            fp16), ``"torch"`` otherwise, logged (:func:`~vggbackbone.deploy.precision.resolve_runtime`).

    Returns:
        :class:`InferenceModule` with the model's call signature; floating outputs are float32
        and within :data:`RELATIVE_TOLERANCE` ``[precision]`` of the fp32 eager model.
    """
    if runtime == "auto":
        where = torch.device(device) if device is not None else _model_device(model)
        runtime = resolve_runtime(runtime, where, str(precision), compile)  # type: ignore[assignment]
    if runtime == "openvino":
        if compile or device not in (None, "cpu", torch.device("cpu")):
            raise ValueError(
                "runtime='openvino' runs on the CPU and compiles itself: pass neither compile= nor a device"
            )
        ov_precision = resolve_openvino_precision(precision, calibrated=calibration is not None)
        model = copy.deepcopy(model) if not inplace else model
        return OpenVINOModule(model.eval().cpu(), ov_precision, calibration)
    if runtime != "torch":
        raise ValueError(f"runtime must be 'auto', 'torch' or 'openvino', got {runtime!r}")
    if precision == "default":
        raise ValueError("precision='default' (OpenVINO's own choice) needs runtime='openvino'")
    if compile not in COMPILE_MODES:
        raise ValueError(
            f"compile must be False, True, 'default', 'max-autotune' or 'reduce-overhead', got {compile!r}"
        )
    device = torch.device(device) if device is not None else _model_device(model)
    precision = resolve_precision(precision, device, calibrated=calibration is not None)  # type: ignore[assignment]

    if not inplace:
        model = copy.deepcopy(model)
    model = model.eval().to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    folded = fold_batchnorm(model) if fuse_bn else 0
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    quantized: tuple[str, ...] = ()
    if precision == "int8":
        assert calibration is not None
        move = _input_mover(device, channels_last)
        quantized = tuple(quantization_targets(model) or [""])
        model = quantize_int8(model, (map_tensors(b, move) for b in calibration), list(quantized))
        # the quantised parts are compiled by quantize_int8; compiling the whole model around them
        # again would nest two inductor graphs
        compile = False
    return InferenceModule(
        model,
        device=device,
        precision=precision,
        channels_last=channels_last,
        compile=compile,
        folded_batchnorms=folded,
        quantized=quantized,
    )
