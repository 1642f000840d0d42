"""One call for fast inference: BN folding, channels_last, reduced precision, ``torch.compile``.

>>> from vggbackbone import VGGBackbone, optimize_for_inference
>>> fast = optimize_for_inference(VGGBackbone("vgg16_bn"))            # doctest: +SKIP
>>> feats = fast(images)                                              # doctest: +SKIP

What each step does, and when it helps (measured numbers: ``docs/benchmarks.md``):

* **BN folding**: every ``Conv2d -> BatchNorm2d`` (and ``Linear -> BatchNorm1d``) pair that sits
  next to each other in an ``nn.Sequential`` becomes one conv with rescaled weights
  (:func:`torch.nn.utils.fusion.fuse_conv_bn_eval`); the BatchNorm becomes ``nn.Identity``.
  Exact up to fp32 rounding. Only adjacent children of a ``Sequential`` are folded, because
  only there is the conv's output known to be the BatchNorm's input without tracing the model
  (detectors are not ``torch.fx``-traceable); VGG blocks, torchvision's
  ``Conv2dNormActivation`` and smp's ``Conv2dReLU`` are all ``Sequential``.
* **channels_last**: 4-D weights and 4-D floating inputs are converted to NHWC, the layout
  oneDNN (CPU) and cuDNN tensor cores run fastest.
* **precision**: ``"bf16"``/``"fp16"`` run the model under :func:`torch.autocast`, so ops that
  need fp32 (losses, box decoding, RoI ops, softmax) keep it; floating outputs are cast back
  to float32. ``"auto"`` picks bf16 only where the hardware runs it fast: CUDA (bf16 where
  supported, else fp16) and CPUs with AMX or AVX512-BF16. On other CPUs (e.g. AVX2-only)
  oneDNN has no fast bf16/fp16 convolution kernels and reduced precision is 5-100x *slower*
  than fp32, so ``"auto"`` stays in fp32.
* **compile**: :func:`torch.compile` with inductor and ``freezing`` (weights become constants,
  so inductor can pre-pack them for oneDNN and fold the autocast weight casts). ``True`` or
  ``"max-autotune"``; costs a one-off compile time on the first call of each input shape.

Tolerance (max relative error ``max|y - y_ref| / max|y_ref|`` per output tensor vs the fp32
eager model, VGG16 conv taps, checked in ``tests/test_optimize.py``): fp32 (with folding
and channels_last) <= 1e-4 (typically ~1e-6); fp16 <= 1e-2; bf16 <= 5e-2 (typically ~1e-2).
"""

from __future__ import annotations

import copy
import itertools
import warnings
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

__all__ = [
    "RELATIVE_TOLERANCE",
    "InferenceModule",
    "default_precision",
    "fast_reduced_precision",
    "fold_batchnorm",
    "optimize_for_inference",
]

Precision = Literal["auto", "fp32", "bf16", "fp16"]
CompileMode = bool | Literal["default", "max-autotune", "reduce-overhead"]

_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

#: Documented bound on ``max|y - y_ref| / max|y_ref|`` per output vs the fp32 eager model.
RELATIVE_TOLERANCE: dict[str, float] = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 5e-2}


def _cpu_has(feature: str) -> bool:
    # torch.cpu._is_*_supported are private (no public API reports AMX / AVX512-BF16 yet).
    probe = getattr(torch.cpu, f"_is_{feature}_supported", None)
    try:
        return bool(probe()) if probe is not None else False
    except RuntimeError:
        return False


_PROBES = [("amx_tile", "AMX"), ("avx512_bf16", "AVX512-BF16"), ("amx_fp16", "AMX-FP16")]


def fast_reduced_precision(device: torch.device | str) -> list[str]:
    """Reduced precisions (``"bf16"``, ``"fp16"``) that run fast on ``device``, best first.

    CUDA: bf16 where the GPU supports it (Ampere and later), and fp16. CPU: bf16 with AMX or
    AVX512-BF16, fp16 with AMX-FP16. Anything else runs reduced precision through slow
    fallback kernels, so it is not listed.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return (["bf16"] if torch.cuda.is_bf16_supported() else []) + ["fp16"]
    if device.type == "cpu":
        fast = []
        if _cpu_has("amx_tile") or _cpu_has("avx512_bf16"):
            fast.append("bf16")
        if _cpu_has("amx_fp16"):
            fast.append("fp16")
        return fast
    return []


def default_precision(device: torch.device | str) -> str:
    """The precision ``precision="auto"`` picks on ``device`` (see :func:`fast_reduced_precision`)."""
    fast = fast_reduced_precision(device)
    return fast[0] if fast else "fp32"


_CPU_NEEDS = {"bf16": "AMX or AVX512-BF16", "fp16": "AMX-FP16"}


def _slow_precision_message(precision: str, device: torch.device) -> str:
    """Why ``precision`` is slow on ``device``, built from the same probes ``"auto"`` uses."""
    fast = fast_reduced_precision(device)
    if device.type == "cpu":
        found = [name for feat, name in _PROBES if _cpu_has(feat)]
        why = (
            f"{precision} needs {_CPU_NEEDS[precision]} on a CPU; this CPU has "
            f"{', '.join(found) if found else 'none of AMX, AVX512-BF16, AMX-FP16'} "
            f"(capability {torch.backends.cpu.get_cpu_capability()})"
        )
    elif device.type == "cuda":
        why = "this GPU does not support bf16"
    else:
        why = f"no reduced precision is known to be fast on {device.type}"
    return (
        f"precision={precision!r} has no fast kernels on this {device.type} ({why}): it will likely be much "
        f"slower than fp32; fast reduced precisions here: {fast or 'none'}; "
        f"precision='auto' picks {default_precision(device)} here"
    )


def _is_batchnorm(m: nn.Module) -> bool:
    # FrozenBatchNorm2d (torchvision.ops.misc) has the same buffers but is not a _BatchNorm.
    return isinstance(m, nn.modules.batchnorm._BatchNorm) or type(m).__name__ == "FrozenBatchNorm2d"


def fold_batchnorm(model: nn.Module) -> int:
    """Fold, in place, every BatchNorm that directly follows a conv/linear in an ``nn.Sequential``.

    ``Conv{1,2,3}d -> BatchNorm`` and ``ConvTranspose{1,2,3}d -> BatchNorm`` are folded with
    :func:`~torch.nn.utils.fusion.fuse_conv_bn_eval`, ``Linear -> BatchNorm1d`` with
    :func:`~torch.nn.utils.fusion.fuse_linear_bn_eval`; the BatchNorm is replaced by
    ``nn.Identity`` (so ``bn5_3`` style names stay, and a tap on them still works). The model
    must be in eval mode. Returns the number of folded pairs.
    """
    if model.training:
        raise ValueError("fold_batchnorm needs an eval-mode model (BatchNorm folds its running statistics)")
    folded = 0
    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        names = list(seq._modules)
        for prev_name, bn_name in itertools.pairwise(names):
            prev, bn = seq._modules[prev_name], seq._modules[bn_name]
            if prev is None or bn is None or not _is_batchnorm(bn) or getattr(bn, "running_mean", None) is None:
                continue
            if isinstance(prev, nn.modules.conv._ConvTransposeNd):
                fused = fuse_conv_bn_eval(prev, bn, transpose=True)
            elif isinstance(prev, nn.modules.conv._ConvNd):
                fused = fuse_conv_bn_eval(prev, bn)
            elif isinstance(prev, nn.Linear) and prev.out_features == bn.num_features:
                fused = fuse_linear_bn_eval(prev, bn)
            else:
                continue
            seq._modules[prev_name] = fused
            seq._modules[bn_name] = nn.Identity()
            folded += 1
    return folded


def _map_tensors(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """Apply ``fn`` to every tensor in nested lists/tuples/dicts (keeps OrderedDict, namedtuple)."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return type(obj)((k, _map_tensors(v, fn)) for k, v in obj.items())
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(_map_tensors(v, fn) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map_tensors(v, fn) for v in obj)
    return obj


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
    ) -> None:
        super().__init__()
        self.model = model
        self.device = device  # fixed: autocast and compilation are set up for it
        self.precision = precision
        self.channels_last = channels_last
        self.compile_mode = compile
        self.folded_batchnorms = folded_batchnorms
        amp_dtype = None if precision == "fp32" else _DTYPES[precision]
        runner: nn.Module = _Autocast(model, device.type, amp_dtype)
        if compile:
            runner = torch.compile(runner, options=_compile_options(compile, device))
        # Not a registered submodule: it wraps ``self.model``, whose weights must appear once in state_dict.
        self.__dict__["_runner"] = runner
        super().train(False)

    def _prepare_input(self, t: torch.Tensor) -> torch.Tensor:
        if self.channels_last and t.dim() == 4 and t.is_floating_point():
            return t.to(self.device, memory_format=torch.channels_last)
        return t.to(self.device)

    @staticmethod
    def _restore_output(t: torch.Tensor) -> torch.Tensor:
        return t.float() if t.is_floating_point() and t.dtype != torch.float32 else t

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        args, kwargs = _map_tensors((args, kwargs), self._prepare_input)
        with torch.inference_mode():
            out = self._runner(*args, **kwargs)
        return _map_tensors(out, self._restore_output)

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
        )


def _model_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def optimize_for_inference(
    model: nn.Module,
    precision: Precision = "auto",
    channels_last: bool = True,
    fuse_bn: bool = True,
    compile: CompileMode = False,
    device: torch.device | str | None = None,
    inplace: bool = False,
) -> InferenceModule:
    """Return an eval-mode, inference-only version of ``model`` that runs faster.

    Works on any ``nn.Module``: a :class:`~vggbackbone.VGGBackbone` (dict of taps), a task
    model (detector taking a list of images, segmenter, ReID net), or a user model with VGG
    blocks inside.

    Args:
        model: the trained model (its mode does not matter; the result is in eval mode).
        precision: ``"auto"`` (see :func:`default_precision`: bf16 on CPUs with AMX/AVX512-BF16,
            bf16/fp16 on CUDA, fp32 otherwise), ``"fp32"``, ``"bf16"`` or ``"fp16"`` (autocast;
            outputs come back as float32). Asking for a precision the device runs slowly warns.
        channels_last: convert 4-D weights and inputs to NHWC.
        fuse_bn: fold BatchNorm into the preceding conv/linear (:func:`fold_batchnorm`).
        compile: ``False``; ``True`` (inductor with freezing) or ``"max-autotune"``. The first
            call per input shape compiles (tens of seconds on a small CPU).
        device: where to run; default: the device of the model's parameters.
        inplace: modify ``model`` itself instead of a deep copy (saves memory for large models).

    Returns:
        :class:`InferenceModule` with the model's call signature; floating outputs are float32
        and within :data:`RELATIVE_TOLERANCE` ``[precision]`` of the fp32 eager model.
    """
    if precision not in ("auto", *_DTYPES):
        raise ValueError(f"precision must be one of 'auto', 'fp32', 'bf16', 'fp16', got {precision!r}")
    if compile not in (False, True, "default", "max-autotune", "reduce-overhead"):
        raise ValueError(
            f"compile must be False, True, 'default', 'max-autotune' or 'reduce-overhead', got {compile!r}"
        )
    device = torch.device(device) if device is not None else _model_device(model)
    if precision == "auto":
        precision = default_precision(device)
    elif precision != "fp32" and precision not in fast_reduced_precision(device):
        warnings.warn(_slow_precision_message(precision, device), stacklevel=2)

    if not inplace:
        model = copy.deepcopy(model)
    model = model.eval().to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    folded = fold_batchnorm(model) if fuse_bn else 0
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return InferenceModule(
        model,
        device=device,
        precision=precision,
        channels_last=channels_last,
        compile=compile,
        folded_batchnorms=folded,
    )
