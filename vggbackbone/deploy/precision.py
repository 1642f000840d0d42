"""Which precision a model runs in: the ``precision=`` argument checked and resolved.

``"auto"`` on a CPU times a probe convolution in each candidate precision (fp32; bf16 where
oneDNN has bf16 kernels; int8 with calibration where oneDNN has int8 kernels) and picks the
fastest, once per process, logged; on CUDA it follows :func:`~.hardware.default_precision`.
An explicit precision the device runs slowly warns; ``"int8"`` without int8 kernels falls back
to fp32 with a warning.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from typing import Any, Literal

import torch

from .hardware import (
    default_precision,
    fast_reduced_precision,
    int8_dot_product,
    int8_supported,
    slow_precision_message,
)
from .loggers import optimize_log

__all__ = [
    "DTYPES",
    "PRECISIONS",
    "Precision",
    "auto_precision",
    "measure_precisions",
    "resolve_openvino_precision",
    "resolve_precision",
    "resolve_runtime",
]

Precision = Literal["auto", "fp32", "bf16", "fp16", "int8"]
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16", "fp16", "int8")
#: The floating precisions and their dtypes (bf16/fp16 run under autocast).
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

#: The probe of ``precision="auto"``: a 3x3 conv + ReLU, 64 -> 64 channels on 1x64x28x28 NHWC (a
#: VGG conv2-block layer at 112 px; ~58 MFLOP), timed in each candidate precision.
_PROBE_SHAPE = (1, 64, 28, 28)
#: Probe seconds per tuple of candidates, measured once per process.
_probe_cache: dict[tuple[str, ...], dict[str, float]] = {}
#: Choices already logged (one line per distinct measurement).
_logged_choices: set[tuple[Any, ...]] = set()


def _probe_call(precision: str) -> Callable[[], Any]:
    """A zero-argument call running the probe conv in ``precision`` through the kernels a model uses."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(_PROBE_SHAPE, generator=g).contiguous(memory_format=torch.channels_last)
    w = (torch.randn(64, 64, 3, 3, generator=g) / 24).contiguous(memory_format=torch.channels_last)
    if precision == "fp32":
        return lambda: torch.relu(torch.nn.functional.conv2d(x, w, padding=1))
    if precision in ("bf16", "fp16"):
        xd, wd = x.to(DTYPES[precision]), w.to(DTYPES[precision])
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
    time), after one untimed warm-up call (oneDNN creates and JIT-compiles its kernels on the
    first call: ~10 ms for int8). A precision whose first timed call already takes longer than
    ``budget`` is not timed further (it cannot win)."""
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


def auto_precision(device: torch.device, calibrated: bool) -> str:
    """``precision="auto"``: CUDA by capability; CPU by timing fp32 / bf16 (where oneDNN has bf16
    kernels) / int8 (with calibration, where oneDNN has int8 kernels) on the probe. Logged once
    per measurement (logger ``vggbackbone.optimize``, INFO) with the times and why a precision
    was not tried: e.g. ``precision='auto' picked int8 on this CPU (probe conv: fp32 2.10 ms, bf16
    0.95 ms, int8 0.40 ms)`` or ``... picked fp32 ... (probe conv: fp32 2.10 ms; bf16 not tried:
    oneDNN has no bf16 kernels here (needs AMX or AVX512-BF16); int8 not tried: no calibration
    images given)``."""
    if device.type != "cpu":
        return default_precision(device)
    candidates = ["fp32"]
    skipped: list[str] = []
    if torch.ops.mkldnn._is_mkldnn_bf16_supported():
        candidates.append("bf16")
    else:
        skipped.append("bf16 not tried: oneDNN has no bf16 kernels here (needs AMX or AVX512-BF16)")
    int8_ok, int8_why = int8_supported()
    if calibrated and int8_ok:
        candidates.append("int8")
    else:
        skipped.append(f"int8 not tried: {int8_why if calibrated else 'no calibration images given'}")
    times = measure_precisions(tuple(candidates))
    choice = min(times, key=times.__getitem__)
    key = (tuple(sorted(times.items())), calibrated)
    if key not in _logged_choices:
        _logged_choices.add(key)
        measured = ", ".join(f"{p} {1e3 * t:.2f} ms" for p, t in times.items())
        why = "".join(f"; {s}" for s in skipped)
        optimize_log.info("precision='auto' picked %s on this CPU (probe conv: %s%s)", choice, measured, why)
    return choice


def _int8_or_fallback(device: torch.device, calibrated: bool) -> str:
    """``precision="int8"``: refused without calibration or off the CPU; fp32 (warned) where
    oneDNN has no int8 kernels; the kernels it runs on logged when they are AVX2 alone."""
    if not calibrated:
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
            stacklevel=4,  # the caller of optimize_for_inference
        )
        return "fp32"
    if not int8_dot_product():
        optimize_log.info("precision='int8': %s", why)
    return "int8"


def resolve_precision(precision: str, device: torch.device, calibrated: bool) -> str:
    """The precision to run: ``precision`` checked, ``"auto"`` and the int8 fallback resolved.

    ``calibrated``: whether calibration batches were given (only ``"int8"`` and ``"auto"`` use
    them). Raises ``ValueError`` naming what is wrong; warns (at the caller of
    ``optimize_for_inference``) when the precision will be slow or falls back.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of 'auto', 'fp32', 'bf16', 'fp16', 'int8', got {precision!r}")
    if calibrated and precision not in ("int8", "auto"):
        raise ValueError(f"calibration is only used by precision='int8' or 'auto', got precision={precision!r}")
    if precision == "int8":
        return _int8_or_fallback(device, calibrated)
    if precision == "auto":
        return auto_precision(device, calibrated)
    if precision != "fp32" and precision not in fast_reduced_precision(device):
        warnings.warn(slow_precision_message(precision, device), stacklevel=3)
    return precision


def resolve_openvino_precision(precision: str, calibrated: bool) -> str:
    """The OpenVINO precision for ``optimize_for_inference(..., runtime="openvino")``: ``"fp32"``,
    ``"bf16"``, ``"default"`` (OpenVINO's own hint) or ``"int8"`` (NNCF; needs calibration).
    ``"auto"``: int8 with calibration where the CPU has int8 kernels, else ``"default"``
    (logged with the reason); ``"fp16"`` is refused (no CPU kernels)."""
    if precision not in (*PRECISIONS, "default") or precision == "fp16":
        raise ValueError(
            "precision with runtime='openvino' must be one of 'auto', 'fp32', 'bf16', 'default', 'int8', "
            f"got {precision!r}"
        )
    if calibrated and precision not in ("int8", "auto"):
        raise ValueError(f"calibration is only used by precision='int8' or 'auto', got precision={precision!r}")
    if precision == "int8" and not calibrated:
        raise ValueError(
            "precision='int8' needs calibration=: a few batches of real images, each passed as model(batch)"
        )
    if precision != "auto":
        return precision
    ok, why = int8_supported()
    choice = "int8" if calibrated and ok else "default"
    reason = (
        "calibration given and the CPU has int8 kernels"
        if choice == "int8"
        else ("no calibration given" if not calibrated else why) + "; OpenVINO's default hint"
    )
    optimize_log.info("precision='auto' with runtime='openvino' picked %s (%s)", choice, reason)
    return choice


def resolve_runtime(runtime: str, device: torch.device, precision: str, compile: object) -> str:
    """``runtime="auto"``: ``"openvino"`` where it applies (the ``openvino`` package installed, a
    CPU device, no ``compile``, a precision other than ``"fp16"``), since it measured fastest on
    every task model end to end (``benchmarks/end_to_end.py``, docs/benchmarks.md); else
    ``"torch"``. Logged with the reason (logger ``vggbackbone.optimize``). ``"torch"`` and
    ``"openvino"`` are returned as they are."""
    if runtime in ("torch", "openvino"):
        return runtime
    if runtime != "auto":
        raise ValueError(f"runtime must be 'auto', 'torch' or 'openvino', got {runtime!r}")
    import importlib.util

    if device.type != "cpu":
        why = f"the model is on {device.type} (OpenVINO runs here on the CPU)"
    elif compile:
        why = "compile= was asked for (torch.compile is a torch route)"
    elif precision == "fp16":
        why = "precision='fp16' (OpenVINO has no fp16 CPU kernels)"
    elif importlib.util.find_spec("openvino") is None:
        why = "the openvino package is not installed (pip install 'vggbackbone[openvino]')"
    else:
        optimize_log.info("runtime='auto' picked openvino (installed, CPU: the fastest route measured)")
        return "openvino"
    optimize_log.info("runtime='auto' picked torch: %s", why)
    return "torch"
