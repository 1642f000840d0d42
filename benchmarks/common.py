"""Shared benchmark helpers: honest timing, FLOP counting, machine peak, and doc writing.

Every benchmark script follows the same recipe:

1. :func:`parse_args` (``--device --threads --repeats --warmup --write``) and
   :func:`environment` for the header (device, threads, CPU capability, load average);
2. build all contenders first, then :func:`time_interleaved`: warm-up calls, then repeats in
   rotating order, so a burst of load from another process hits every contender alike and
   the ratios stay meaningful; the median is reported;
3. :func:`count_gflops` (``torch.utils.flop_counter.FlopCounterMode``: conv and matmul-type
   ops only, 2 FLOPs per multiply-add) and :func:`matmul_peak` (measured, not datasheet) give
   GFLOP/s and % of peak;
4. :func:`markdown_table` + :func:`update_section` replace one named section of
   ``docs/benchmarks.md`` in place (other sections untouched); :func:`save_figure` writes
   ``docs/img/<name>.png``. Nothing is written without ``--write``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python benchmarks/x.py` from a fresh clone, no install needed
    sys.path.insert(0, str(ROOT))

from vggbackbone.deploy import cpu_features  # noqa: E402
from vggbackbone.utils import atomic_path, atomic_write  # noqa: E402

DOC = ROOT / "docs" / "benchmarks.md"
IMG_DIR = ROOT / "docs" / "img"

__all__ = [
    "DOC",
    "IMG_DIR",
    "Timing",
    "count_gflops",
    "environment",
    "environment_markdown",
    "fmt",
    "markdown_table",
    "matmul_peak",
    "parse_args",
    "save_figure",
    "synchronize",
    "time_interleaved",
    "update_section",
]


# ---------------------------------------------------------------------------------------- CLI
def parse_args(
    description: str,
    argv: Sequence[str] | None = None,
    extra: Callable[[argparse.ArgumentParser], None] | None = None,
) -> argparse.Namespace:
    """Common flags; ``extra(parser)`` adds script-specific ones. Sets threads and picks the device."""
    p = argparse.ArgumentParser(description=description)
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    p.add_argument("--device", default=default_device, help="cpu or cuda (default: cuda if present)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's default)")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per contender (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls per contender before timing")
    p.add_argument("--write", action="store_true", help="update docs/benchmarks.md and docs/img/*.png")
    if extra is not None:
        extra(p)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.device = torch.device(args.device)
    return args


# ------------------------------------------------------------------------------ environment
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _loadavg() -> str:
    try:
        return " / ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def environment(device: torch.device) -> dict[str, Any]:
    """What the numbers depend on: device, threads, ISA, precision support, load at start."""
    features = cpu_features()
    env: dict[str, Any] = {
        "date": _dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "cpu capability": torch.backends.cpu.get_cpu_capability(),
        # the one feature list (vggbackbone.deploy.CPU_FEATURES) that also decides the precisions
        " / ".join(features): " / ".join("yes" if v else "no" for v in features.values()),
        "oneDNN bf16 / fp16 kernels": " / ".join(
            "yes" if f() else "no"
            for f in (torch.ops.mkldnn._is_mkldnn_bf16_supported, torch.ops.mkldnn._is_mkldnn_fp16_supported)
        ),
        "load average (1/5/15 min) at start": _loadavg(),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
        env["gpu bf16"] = "yes" if torch.cuda.is_bf16_supported() else "no"
    env["device"] = str(device)
    return env


def environment_markdown(env: dict[str, Any], extra: dict[str, Any] | None = None) -> str:
    """The environment as a one-line-per-item markdown list (the head of each section)."""
    items = {**env, "load average (1/5/15 min) at end": _loadavg(), **(extra or {})}
    return "\n".join(f"- {k}: {v}" for k, v in items.items())


# ------------------------------------------------------------------------------------ timing
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    """Seconds per call: ``samples`` (timed repeats) and ``first`` (the first call, compile included)."""

    samples: list[float] = field(default_factory=list)
    first: float = float("nan")

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def spread(self) -> float:
        """(max - min) / median of the repeats: how noisy this row was."""
        return (max(self.samples) - min(self.samples)) / self.median if self.samples else float("nan")


def time_interleaved(
    fns: dict[str, Callable[[], Any]],
    device: torch.device,
    repeats: int = 5,
    warmup: int = 1,
) -> dict[str, Timing]:
    """Time each zero-argument callable: ``warmup`` calls each (the first one timed separately,
    it includes compilation), then ``repeats`` rounds calling every contender once per round,
    in an order rotated each round. Returns per-contender :class:`Timing` (median = result).
    """
    timings = {name: Timing() for name in fns}

    def once(fn: Callable[[], Any]) -> float:
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        return time.perf_counter() - t0

    for name, fn in fns.items():
        timings[name].first = once(fn)
        for _ in range(warmup - 1):
            once(fn)
    names = list(fns)
    for r in range(repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            timings[name].samples.append(once(fns[name]))
    return timings


# ------------------------------------------------------------------------------------- FLOPs
def count_gflops(fn: Callable[[], Any]) -> float:
    """GFLOPs of one call of ``fn``, as counted by :class:`torch.utils.flop_counter.FlopCounterMode`.

    Counts convolutions and matmul-type ops (2 FLOPs per multiply-add), forward and, if ``fn``
    calls ``backward``, backward; pooling, ReLU, LRN and BatchNorm are not counted.
    """
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 1e9


def matmul_peak(dtype: torch.dtype, device: torch.device, seconds: float = 1.0) -> float:
    """Best measured GFLOP/s of a square ``torch.mm`` in ``dtype`` (the machine's practical peak).

    The size grows from 256 until one product takes >= 50 ms (or reaches 4096), so a dtype
    without fast kernels (bf16 on an AVX2 CPU) costs well under a second; then the best of
    repeated products within ``seconds`` is reported.
    """
    n = 256
    while True:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        torch.mm(a, b)
        synchronize(device)
        t0 = time.perf_counter()
        torch.mm(a, b)
        synchronize(device)
        if time.perf_counter() - t0 >= 0.05 or n >= 4096:
            break
        n *= 2
    best = float("inf")
    deadline = time.perf_counter() + seconds
    for i in range(1000):
        synchronize(device)
        t0 = time.perf_counter()
        torch.mm(a, b)
        synchronize(device)
        best = min(best, time.perf_counter() - t0)
        if time.perf_counter() > deadline and i >= 2:
            break
    return 2 * n**3 / best / 1e9


# ------------------------------------------------------------------------------------ output
def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; numbers are printed as given (format them before)."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- BEGIN SECTION: {name} -->", f"<!-- END SECTION: {name} -->"


def update_section(name: str, body: str, path: Path = DOC, script: str | None = None) -> Path:
    """Replace the text between the markers of section ``name`` in ``path`` (atomically).

    A section that does not exist yet is appended as ``## name`` with its markers; everything
    outside the markers (the methodology prose, other scripts' sections) is left as it is.
    """
    begin, end = _markers(name)
    note = f"<!-- written by {script}; edit the script, not this block -->\n" if script else ""
    block = f"{begin}\n{note}{body.strip()}\n{end}"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text, count=1)
    else:
        text = text.rstrip("\n") + f"\n\n## {name}\n\n{block}\n"
    with atomic_write(path, "w") as f:
        f.write(text)
    return path


def save_figure(fig: Any, name: str, img_dir: Path = IMG_DIR) -> Path:
    """Save a matplotlib figure as ``docs/img/<name>.png`` (atomically) and close it."""
    import matplotlib.pyplot as plt

    path = img_dir / f"{name}.png"
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def fmt(x: float, digits: int = 3) -> str:
    """Compact number formatting for tables (``nan`` -> ``-``)."""
    if x != x:  # nan
        return "-"
    if x == 0:
        return "0"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:.{digits}g}"
