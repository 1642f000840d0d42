"""What the device can run fast: CPU features, int8 kernels, fast reduced precisions.

The rules here read the hardware only (no timing): :mod:`vggbackbone.deploy.precision` measures
where the features alone do not decide. On AVX2-only CPUs oneDNN has no fast bf16/fp16
convolution kernels (5-100x *slower* than fp32); int8 runs on AVX2 multiply-adds, fast with the
VNNI/AMX dot-product instructions.
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path

import torch

__all__ = [
    "CPU_FEATURES",
    "INT8_FEATURES",
    "cpu_features",
    "cpu_has",
    "default_precision",
    "fast_reduced_precision",
    "int8_dot_product",
    "int8_supported",
    "slow_precision_message",
]

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
#: The reduced-float features (the slow-precision message lists these).
_REDUCED_FLOAT_FEATURES = CPU_FEATURES[:3]
#: Any of these gives oneDNN fast u8s8 convolutions (int8 dot-product instructions).
INT8_FEATURES: tuple[tuple[str, str], ...] = CPU_FEATURES[3:]
#: torch CPU capabilities under which oneDNN has int8 (u8s8) convolution kernels.
_INT8_CAPABILITIES = ("AVX2", "AVX512")
#: What a reduced precision needs on a CPU to have fast kernels.
_CPU_NEEDS = {"bf16": "AMX or AVX512-BF16", "fp16": "AMX-FP16"}


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


def cpu_has(feature: str) -> bool:
    """Whether this CPU has ``feature`` (a ``feature`` name of :data:`CPU_FEATURES`)."""
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
    return {name: cpu_has(feature) for feature, name in CPU_FEATURES}


def int8_dot_product() -> list[str]:
    """The int8 dot-product instruction sets of this CPU (AMX-INT8, AVX512-VNNI, AVX-VNNI) found."""
    return [name for feature, name in INT8_FEATURES if cpu_has(feature)]


def int8_supported() -> tuple[bool, str]:
    """Whether oneDNN runs int8 convolutions on this CPU, and how (the message says which kernels).

    With AMX-INT8 / AVX512-VNNI / AVX-VNNI they are dot-product instructions. On an x86 CPU with
    AVX2 but none of those they are AVX2 multiply-add sequences: slower than with VNNI, but
    measured faster than fp32 all the same (3.2x torchvision fp32 eager at 8x224 and 1.9x at
    1x600x800 on an AVX2-only AMD EPYC, docs/benchmarks.md), so int8 runs there too. Elsewhere
    (no AVX2, or not x86) there are no int8 kernels and
    :func:`~vggbackbone.deploy.optimize_for_inference` falls back to fp32 with a warning
    carrying this message.
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
        if cpu_has("amx_tile") or cpu_has("avx512_bf16"):
            fast.append("bf16")
        if cpu_has("amx_fp16"):
            fast.append("fp16")
        return fast
    return []


def default_precision(device: torch.device | str) -> str:
    """The precision ``device``'s features suggest (see :func:`fast_reduced_precision`).

    What ``precision="auto"`` picks on CUDA. On a CPU ``"auto"`` measures instead (a probe
    convolution in each candidate precision, see
    :func:`~vggbackbone.deploy.precision.measure_precisions`), because the features alone do not
    say which is faster (AVX512-BF16 without AMX: bf16 1.0-2.8x fp32 depending on the layer).
    """
    fast = fast_reduced_precision(device)
    return fast[0] if fast else "fp32"


def slow_precision_message(precision: str, device: torch.device) -> str:
    """Why ``precision`` is slow on ``device``, built from the same probes ``"auto"`` uses."""
    fast = fast_reduced_precision(device)
    if device.type == "cpu":
        found = [name for feature, name in _REDUCED_FLOAT_FEATURES if cpu_has(feature)]
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
