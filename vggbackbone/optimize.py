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
  to float32. ``"int8"`` (CPU, needs ``calibration``) quantises every VGG backbone inside the
  model with torchao's PT2E flow and the x86 inductor quantizer and compiles it
  (:func:`quantize_int8`); on a CPU without AMX-INT8/AVX512-VNNI/AVX-VNNI it falls back to
  fp32 with a warning. ``"auto"``: on a CPU, the fastest of fp32 / bf16 / int8 (int8 only
  with ``calibration`` and VNNI/AMX) on a probe convolution, measured once per process and
  logged; on CUDA bf16 where supported, else fp16. On AVX2-only CPUs oneDNN has no fast
  bf16/fp16 convolution kernels (5-100x *slower* than fp32), and the probe sees it.
* **compile**: :func:`torch.compile` with inductor and ``freezing`` (weights become constants,
  so inductor can pre-pack them for oneDNN and fold the autocast weight casts). ``True`` or
  ``"max-autotune"``; costs a one-off compile time on the first call of each input shape.

Tolerance (max relative error ``max|y - y_ref| / max|y_ref|`` per output tensor vs the fp32
eager model, VGG16 conv taps, checked in ``tests/test_optimize.py``): fp32 (with folding
and channels_last) <= 1e-4 (typically ~1e-6); fp16 <= 1e-2; bf16 <= 5e-2 (typically ~1e-2);
int8: :data:`INT8_TOLERANCE` (``tests/test_int8.py``).
"""

from __future__ import annotations

import copy
import functools
import itertools
import logging
import platform
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

__all__ = [
    "CPU_FEATURES",
    "INT8_TOLERANCE",
    "RELATIVE_TOLERANCE",
    "InferenceModule",
    "QuantizedModule",
    "cpu_features",
    "default_precision",
    "fast_reduced_precision",
    "fold_batchnorm",
    "int8_dot_product",
    "int8_supported",
    "optimize_for_inference",
    "quantize_int8",
]

logger = logging.getLogger(__name__)

Precision = Literal["auto", "fp32", "bf16", "fp16", "int8"]
CompileMode = bool | Literal["default", "max-autotune", "reduce-overhead"]

_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

#: Documented bound on ``max|y - y_ref| / max|y_ref|`` per output vs the fp32 eager model.
RELATIVE_TOLERANCE: dict[str, float] = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 5e-2}


#: CPU features that decide which precision is fast: ``(feature, display name)``. ``feature`` is
#: the name of torch's probe (``torch.cpu._is_<feature>_supported``) where torch has one, else
#: the ``/proc/cpuinfo`` flag. The one list used here and by ``benchmarks/`` (environment lines).
CPU_FEATURES: tuple[tuple[str, str], ...] = (
    ("amx_tile", "AMX"),
    ("avx512_bf16", "AVX512-BF16"),
    ("amx_fp16", "AMX-FP16"),
    ("amx_int8", "AMX-INT8"),
    ("avx512_vnni", "AVX512-VNNI"),
    ("avx_vnni", "AVX-VNNI"),
)
_PROBES = CPU_FEATURES[:3]  # the reduced-float features (the slow-precision message lists these)
#: Any of these gives oneDNN fast u8s8 convolutions (int8 dot-product instructions).
INT8_FEATURES: tuple[tuple[str, str], ...] = CPU_FEATURES[3:]


@functools.cache
def _cpuinfo_flags() -> frozenset[str]:
    """The ``flags`` of ``/proc/cpuinfo`` (empty where there is no such file, e.g. macOS/Windows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def _cpu_has(feature: str) -> bool:
    # torch.cpu._is_*_supported are private (no public API reports AMX / AVX512-BF16 yet); torch has
    # no probe for the VNNI flavours or AMX-INT8, so those are read from /proc/cpuinfo.
    probe = getattr(torch.cpu, f"_is_{feature}_supported", None)
    if probe is None:
        return feature in _cpuinfo_flags()
    try:
        return bool(probe())
    except RuntimeError:
        return False


def cpu_features() -> dict[str, bool]:
    """``{display name: present}`` for every entry of :data:`CPU_FEATURES` on this CPU."""
    return {name: _cpu_has(feature) for feature, name in CPU_FEATURES}


def int8_dot_product() -> list[str]:
    """The int8 dot-product instruction sets of this CPU (AMX-INT8, AVX512-VNNI, AVX-VNNI) found."""
    return [name for feature, name in INT8_FEATURES if _cpu_has(feature)]


#: torch CPU capabilities under which oneDNN has int8 (u8s8) convolution kernels.
_INT8_CAPABILITIES = ("AVX2", "AVX512")


def int8_supported() -> tuple[bool, str]:
    """Whether oneDNN runs int8 convolutions on this CPU, and how (the message says which kernels).

    With AMX-INT8 / AVX512-VNNI / AVX-VNNI they are dot-product instructions. On an x86 CPU with
    AVX2 but none of those they are AVX2 multiply-add sequences: slower than with VNNI, but
    measured faster than fp32 all the same (3.2x torchvision fp32 eager at 8x224 and 1.9x at
    1x600x800 on an AVX2-only AMD EPYC, docs/benchmarks.md), so int8 runs there too. Elsewhere
    (no AVX2, or not x86) there are no int8 kernels and :func:`optimize_for_inference` falls back
    to fp32 with a warning carrying this message.
    """
    found = int8_dot_product()
    if found:
        return True, f"this CPU has {', '.join(found)}"
    capability = torch.backends.cpu.get_cpu_capability()
    names = ", ".join(name for _, name in INT8_FEATURES)
    if capability in _INT8_CAPABILITIES and platform.machine().lower() in ("x86_64", "amd64"):
        return True, (
            f"this CPU has none of {names}: oneDNN's int8 convolutions run on {capability} multiply-adds "
            "(slower than with VNNI, measured faster than fp32)"
        )
    return False, (
        f"this CPU has none of {names} (no /proc/cpuinfo flag {' / '.join(f for f, _ in INT8_FEATURES)}) "
        f"and no x86 AVX2 (capability {capability}, machine {platform.machine()})"
    )


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
    """The precision ``device``'s features suggest (see :func:`fast_reduced_precision`).

    What ``precision="auto"`` picks on CUDA. On a CPU ``"auto"`` measures instead (a probe
    convolution in each candidate precision, see :func:`measure_precisions`), because the
    features alone do not say which is faster (AVX512-BF16 without AMX: bf16 1.0-2.8x fp32
    depending on the layer).
    """
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
        + (
            "precision='auto' times fp32 and the fast ones here and picks the fastest"
            if device.type == "cpu"
            else f"precision='auto' picks {default_precision(device)} here"
        )
    )


def _is_batchnorm(m: nn.Module) -> bool:
    # FrozenBatchNorm2d (torchvision.ops.misc) has the same buffers but is not a _BatchNorm.
    return isinstance(m, nn.modules.batchnorm._BatchNorm) or type(m).__name__ == "FrozenBatchNorm2d"


def fold_batchnorm(model: nn.Module) -> int:
    """Fold, in place, every BatchNorm that directly follows a conv/linear in an ``nn.Sequential``.

    ``Conv{1,2,3}d -> BatchNorm`` and ``ConvTranspose{1,2,3}d -> BatchNorm`` are folded with
    :func:`~torch.nn.utils.fusion.fuse_conv_bn_eval`, ``Linear -> BatchNorm1d`` with
    :func:`~torch.nn.utils.fusion.fuse_linear_bn_eval`; the BatchNorm is replaced by
    ``nn.Identity`` (so ``bn5_3`` style names stay, and a tap on them still works). A pair whose
    conv output is itself returned (a :class:`~vggbackbone.VGGBackbone` tap before the BatchNorm,
    such as ``conv3_1`` of a ``_bn`` arch) is left unfolded, and logged: folding would turn the
    returned tensor into the conv + BN value. The model must be in eval mode. Returns the number
    of folded pairs.
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
            if prev_name in (getattr(seq, "taps", None) or {}):  # a returned pre-BN tap (VGGBackbone's _Stage)
                logger.info("fold_batchnorm: %s -> %s not folded: %s is a returned tap", prev_name, bn_name, prev_name)
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


# ------------------------------------------------------------------------------------- int8
#: Documented bounds for int8 vs the fp32 eager model (``tests/test_int8.py``, tiny random-weight
#: VGGs; real trained weights quantise better): max relative error ``max|y - y_ref| / max|y_ref|``
#: of dense outputs (backbone taps, segmentation logits), and the minimum cosine similarity of
#: each ReID embedding to its fp32 counterpart.
INT8_TOLERANCE: dict[str, float] = {"relative_error": 0.15, "embedding_cosine": 0.99}


def _vgg_backbones(model: nn.Module) -> list[str]:
    """Qualified names of the outermost :class:`~vggbackbone.VGGBackbone` modules (``""``: the model)."""
    from .vgg import VGGBackbone

    names: list[str] = []
    for name, m in model.named_modules():
        if isinstance(m, VGGBackbone) and not any(name.startswith(f"{n}.") or n == "" for n in names):
            names.append(name)
    return names


def _example_for_export(t: Any) -> Any:
    # torch.export specialises dimensions of size 1 (a one-image batch would fix N = 1), so the
    # traced example gets 2 images; calibration itself sees the real inputs.
    if isinstance(t, torch.Tensor) and t.dim() == 4 and t.shape[0] == 1:
        return torch.cat([t, t])
    return t


def _dynamic_shapes(args: tuple[Any, ...]) -> tuple[Any, ...]:
    from torch.export import Dim

    return tuple(
        {0: Dim.AUTO, 2: Dim.AUTO, 3: Dim.AUTO} if isinstance(a, torch.Tensor) and a.dim() == 4 else None for a in args
    )


class QuantizedModule(nn.Module):
    """A submodule replaced by its int8 graph (made by :func:`quantize_int8`).

    ``forward`` validates the input as the original did (``_check_input`` where the original
    has one) and runs the quantised graph, compiled with inductor and ``freezing`` when
    ``compiled`` (the first call per input shape compiles). Attributes of the original
    (``return_layers``, ``feature_info``, ``out_channels`` ...) stay reachable; the original's
    weights are kept off the state dict.
    """

    def __init__(self, quantized: nn.Module, original: nn.Module, compiled: bool) -> None:
        super().__init__()
        self.quantized = quantized
        self.compiled = compiled
        self.training = False
        self.__dict__["original"] = original  # attributes only: not a registered submodule
        self.__dict__["_runner"] = torch.compile(quantized) if compiled else quantized

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        check = getattr(self.original, "_check_input", None)
        if check is not None and args and isinstance(args[0], torch.Tensor):
            check(args[0])
        if not self.compiled:
            return self._runner(*args, **kwargs)
        # Inductor's int8 weight prepacking (onednn.qconv_prepack) only runs when ``freezing`` is
        # set in the global config while compiling: torch.compile(options={"freezing": True}) fails
        # on this graph with "UnsupportedOperatorException: onednn.qconv_prepack" (torch 2.14).
        with torch._inductor.config.patch(freezing=True):
            return self._runner(*args, **kwargs)

    def train(self, mode: bool = True) -> QuantizedModule:
        # an exported graph refuses .train()/.eval() (torchao's move_exported_model_to_eval is the
        # way); it is put in eval mode once, when made, and there is no training mode to go to
        if mode:
            raise RuntimeError("an int8 QuantizedModule cannot be trained; quantise the trained model again")
        self.training = False
        return self

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["original"], name)

    def extra_repr(self) -> str:
        return f"original={type(self.original).__name__}, compiled={self.compiled}"


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def quantize_int8(
    model: nn.Module,
    calibration: Iterable[Any],
    targets: list[str] | None = None,
    *,
    compile: bool = True,
) -> nn.Module:
    """Quantise ``targets`` of ``model`` to int8 with torchao's PT2E flow; returns the model.

    Static quantisation for x86 (``X86InductorQuantizer`` with its default config: per-channel
    symmetric int8 weights, per-tensor affine uint8 activations observed with a histogram):
    each target is exported with :func:`torch.export.export` (batch, height and width dynamic),
    annotated, observed on the inputs it receives while the *whole* model runs on the
    ``calibration`` batches, converted, and optionally compiled with inductor + freezing (which
    lowers the quantise/conv/dequantise patterns to oneDNN int8 convolutions; without
    compiling, the graph runs reference kernels and is slow: for checking accuracy only).

    Args:
        model: an eval-mode model on the CPU; modified in place (targets are replaced by
            :class:`QuantizedModule`).
        calibration: input batches, each passed as ``model(batch)`` (a tensor, or for a
            detector a list of images); a few batches of real images suffice.
        targets: qualified submodule names to quantise (``""`` = the whole model); default:
            every outermost :class:`~vggbackbone.VGGBackbone` (the part that dominates the
            time of every task model; a detector's RPN/RoI heads stay fp32), or the whole
            model when it contains none.
        compile: compile the quantised graphs.

    Does not look at the CPU's features (see :func:`int8_supported`); the kernels run on any
    x86 CPU with AVX2, fast with VNNI/AMX.
    """
    from torchao.quantization.pt2e import move_exported_model_to_eval
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    if model.training:
        raise ValueError("quantize_int8 needs an eval-mode model")
    if targets is None:
        targets = _vgg_backbones(model) or [""]
    modules = {name: model.get_submodule(name) if name else model for name in targets}
    captured: dict[str, list[tuple[tuple[Any, ...], dict[str, Any]]]] = {name: [] for name in targets}

    def capture(name: str) -> Callable[..., None]:
        def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            captured[name].append((args, kwargs))

        return hook

    hooks = [m.register_forward_pre_hook(capture(n), with_kwargs=True) for n, m in modules.items()]
    batches = 0
    try:
        with torch.no_grad():
            for batch in calibration:
                model(batch)
                batches += 1
    finally:
        for h in hooks:
            h.remove()
    if batches == 0:
        raise ValueError("int8 calibration gave no batches: pass an iterable of input batches")
    unused = [name or "<model>" for name, seen in captured.items() if not seen]
    if unused:
        raise ValueError(f"int8: submodules {unused} were never called on the {batches} calibration batches")

    quantizer = X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config())
    for name, module in modules.items():
        args, kwargs = captured[name][0]
        example = tuple(_example_for_export(a) for a in args)
        with torch.no_grad():
            graph = torch.export.export(module, example, kwargs, dynamic_shapes=_dynamic_shapes(example)).module()
        prepared = prepare_pt2e(graph, quantizer)
        with torch.no_grad():
            for a, k in captured[name]:
                prepared(*a, **k)
        quantized = QuantizedModule(move_exported_model_to_eval(convert_pt2e(prepared)), module, compiled=compile)
        if name:
            _set_submodule(model, name, quantized)
        else:
            model = quantized
    return model


# ---------------------------------------------------------------------------- auto precision
#: The probe of ``precision="auto"``: a 3x3 conv + ReLU, 64 -> 64 channels on 1x64x28x28 NHWC (a
#: VGG conv2-block layer at 112 px; ~58 MFLOP), timed in each candidate precision.
_PROBE_SHAPE = (1, 64, 28, 28)
_probe_cache: dict[tuple[str, ...], dict[str, float]] = {}


def _probe_call(precision: str) -> Callable[[], Any]:
    """A zero-argument call running the probe conv in ``precision`` through the kernels a model uses."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(_PROBE_SHAPE, generator=g).contiguous(memory_format=torch.channels_last)
    w = (torch.randn(64, 64, 3, 3, generator=g) / 24).contiguous(memory_format=torch.channels_last)
    if precision == "fp32":
        return lambda: torch.relu(torch.nn.functional.conv2d(x, w, padding=1))
    if precision in ("bf16", "fp16"):
        xd, wd = x.to(_DTYPES[precision]), w.to(_DTYPES[precision])
        return lambda: torch.relu(torch.nn.functional.conv2d(xd, wd, padding=1))
    if precision == "int8":
        # The oneDNN ops inductor lowers a frozen PT2E int8 conv to (what an int8 model runs).
        qx = torch.randint(0, 256, _PROBE_SHAPE, dtype=torch.uint8, generator=g)
        qx = qx.contiguous(memory_format=torch.channels_last)
        qw = torch.randint(-127, 128, (64, 64, 3, 3), dtype=torch.int8, generator=g)
        ws, wz = torch.full((64,), 0.01), torch.zeros(64, dtype=torch.int64)
        packed = torch.ops.onednn.qconv_prepack(qw, ws, 0.05, 0, [1, 1], [1, 1], [1, 1], 1, list(_PROBE_SHAPE))
        return lambda: torch.ops.onednn.qconv2d_pointwise(
            qx, 0.05, 0, packed, ws, wz, None, [1, 1], [1, 1], [1, 1], 1, 0.05, 0, None, "relu", [], ""
        )
    raise ValueError(f"no probe for precision {precision!r}")


def _probe_seconds(precision: str, budget: float) -> float:
    """Best-of-5 seconds of the probe in ``precision`` (the minimum: other processes only ever add
    time), after one untimed warm-up call (oneDNN
    creates and JIT-compiles its kernels on the first call: ~10 ms for int8). A precision whose
    first timed call already takes longer than ``budget`` is not timed further (it cannot win)."""
    fn = _probe_call(precision)
    with torch.inference_mode():
        fn()
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
            if best > budget:
                break
    return best


def measure_precisions(candidates: tuple[str, ...]) -> dict[str, float]:
    """Probe seconds per candidate precision on this CPU, measured once per process (cached).

    Well under a second in all: each candidate's warm-up call plus 5 timed calls of a ~58 MFLOP
    conv; a precision that is 4x slower than the best so far on its first timed call stops there.
    """
    if candidates not in _probe_cache:
        times: dict[str, float] = {}
        for p in candidates:
            times[p] = _probe_seconds(p, 4 * min(times.values(), default=float("inf")))
        _probe_cache[candidates] = times
    return _probe_cache[candidates]


_logged_choices: set[tuple[Any, ...]] = set()


def _auto_precision(device: torch.device, calibrated: bool) -> str:
    """``precision="auto"``: CUDA by capability; CPU by timing fp32 / bf16 (where oneDNN has bf16
    kernels) / int8 (with calibration, where oneDNN has int8 kernels) on the probe. Logged once."""
    if device.type != "cpu":
        return default_precision(device)
    candidates = ["fp32"]
    if torch.ops.mkldnn._is_mkldnn_bf16_supported():
        candidates.append("bf16")
    if calibrated and int8_supported()[0]:
        candidates.append("int8")
    times = measure_precisions(tuple(candidates))
    choice = min(times, key=times.__getitem__)
    key = (tuple(sorted(times.items())), calibrated)
    if key not in _logged_choices:
        _logged_choices.add(key)
        measured = ", ".join(f"{p} {1e3 * t:.2f} ms" for p, t in times.items())
        why = "" if not calibrated or "int8" in candidates else f"; int8 not tried: {int8_supported()[1]}"
        logger.info("precision='auto' picked %s on this CPU (probe conv: %s%s)", choice, measured, why)
    return choice


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
        amp_dtype = _DTYPES[precision] if precision in ("bf16", "fp16") else None
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
    precision: Precision = "auto",
    channels_last: bool = True,
    fuse_bn: bool = True,
    compile: CompileMode = False,
    device: torch.device | str | None = None,
    inplace: bool = False,
    calibration: Iterable[Any] | None = None,
) -> InferenceModule:
    """Return an eval-mode, inference-only version of ``model`` that runs faster.

    Works on any ``nn.Module``: a :class:`~vggbackbone.VGGBackbone` (dict of taps), a task
    model (detector taking a list of images, segmenter, ReID net), or a user model with VGG
    blocks inside.

    Args:
        model: the trained model (its mode does not matter; the result is in eval mode).
        precision: ``"auto"``, ``"fp32"``, ``"bf16"``, ``"fp16"`` (autocast; outputs come back as
            float32) or ``"int8"`` (CPU; needs ``calibration``: the VGG backbones are quantised
            with :func:`quantize_int8` and compiled, the rest stays fp32; fast with VNNI/AMX,
            slower but still ahead of fp32 on AVX2 alone (logged); on a CPU with neither it
            falls back to fp32 with a warning naming what is missing).
            ``"auto"``: on a CPU, whichever of fp32 / bf16 / int8 (int8 only with
            ``calibration`` where :func:`int8_supported`) runs a probe convolution fastest, measured once per
            process and logged (``logging``, logger ``vggbackbone.optimize``); on CUDA bf16
            where supported, else fp16. Asking for a precision the device runs slowly warns.
        channels_last: convert 4-D weights and inputs to NHWC.
        fuse_bn: fold BatchNorm into the preceding conv/linear (:func:`fold_batchnorm`).
        compile: ``False``; ``True`` (inductor with freezing) or ``"max-autotune"``. The first
            call per input shape compiles (tens of seconds on a small CPU). With int8 the
            quantised parts are always compiled and the rest runs eager.
        device: where to run; default: the device of the model's parameters.
        inplace: modify ``model`` itself instead of a deep copy (saves memory for large models).
        calibration: for int8, an iterable of input batches, each called as ``model(batch)``
            (tensors, or lists of images for a detector); a few batches of real images (e.g.
            64 training images) suffice. Only used by ``"int8"`` (and ``"auto"``).

    Returns:
        :class:`InferenceModule` with the model's call signature; floating outputs are float32
        and within :data:`RELATIVE_TOLERANCE` ``[precision]`` of the fp32 eager model.
    """
    if precision not in ("auto", "int8", *_DTYPES):
        raise ValueError(f"precision must be one of 'auto', 'fp32', 'bf16', 'fp16', 'int8', got {precision!r}")
    if compile not in (False, True, "default", "max-autotune", "reduce-overhead"):
        raise ValueError(
            f"compile must be False, True, 'default', 'max-autotune' or 'reduce-overhead', got {compile!r}"
        )
    device = torch.device(device) if device is not None else _model_device(model)
    if calibration is not None and precision not in ("int8", "auto"):
        raise ValueError(f"calibration is only used by precision='int8' or 'auto', got precision={precision!r}")
    if precision == "int8":
        if calibration is None:
            raise ValueError(
                "precision='int8' needs calibration=: an iterable of input batches (a few batches of real "
                "images, each passed as model(batch)) to measure the activation ranges"
            )
        if device.type != "cpu":
            raise ValueError(f"precision='int8' runs on the CPU only (x86 oneDNN kernels), got device {device}")
        ok, why = int8_supported()
        if not ok:
            warnings.warn(
                f"precision='int8' falls back to fp32: {why}, so oneDNN has no int8 convolutions here",
                stacklevel=2,
            )
            precision = "fp32"
        elif not int8_dot_product():
            logger.info("precision='int8': %s", why)
    elif precision == "auto":
        precision = _auto_precision(device, calibrated=calibration is not None)
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
    quantized: tuple[str, ...] = ()
    if precision == "int8":
        assert calibration is not None

        def prepare(t: torch.Tensor) -> torch.Tensor:
            if channels_last and t.dim() == 4 and t.is_floating_point():
                return t.to(device, memory_format=torch.channels_last)
            return t.to(device)

        quantized = tuple(_vgg_backbones(model) or [""])
        model = quantize_int8(model, (_map_tensors(b, prepare) for b in calibration), list(quantized))
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
