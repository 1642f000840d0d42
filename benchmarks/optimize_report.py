"""The report of ``benchmarks/optimize.py``: its markdown table, its bar chart, and the names of
the ``docs/benchmarks.md`` section and picture a run writes (one per shape, device and CPU)."""

from __future__ import annotations

import re
from typing import Any

import torch

from benchmarks.common import environment, fmt, markdown_table, save_figure
from vggbackbone.deploy import cpu_features

__all__ = ["cpu_tag", "img_name", "plot", "render", "section_name"]


def section_name(shape_text: str, device: torch.device) -> str:
    """One section per shape and device type (CPU runs never overwrite GPU ones)."""
    where = "" if device.type == "cpu" else f", {device.type}"
    return f"Inference optimisation steps (VGG16 conv taps, {shape_text}{where})"


def cpu_tag(slug: bool = False) -> str:
    """``"AMD EPYC, AVX2"`` / ``"Intel Xeon, AVX512 + AMX + AVX512-BF16"``: which CPU a table is from."""
    model = environment(torch.device("cpu"))["cpu"]
    for junk in ("(R)", "(TM)", " Processor", " CPU"):
        model = model.replace(junk, "")
    present = [name for name, has in cpu_features().items() if has]
    tag = f"{' '.join(model.split()[:3])}, {' + '.join([torch.backends.cpu.get_cpu_capability(), *present])}"
    return re.sub(r"[^a-z0-9]+", "_", tag.lower()).strip("_") if slug else tag


def img_name(shape_text: str, device: torch.device) -> str:
    return f"optimize_{shape_text}" + ("" if device.type == "cpu" else f"_{device.type}")


def render(results: list[dict[str, Any]], peaks: dict[str, float], probe: str, probed: bool) -> str:
    headers = [
        "step", "input", "images/s", "speedup vs torchvision", "speedup (best-of)", "GFLOP/s", "% fp32 peak",
        "% own-dtype peak",
        "conv5 max rel. err", "setup + first call s", "spread",
    ]  # fmt: skip
    rows = []
    for r in results:
        mark = " †" if r["input"] != results[0]["input"] else ""
        rows.append(
            [
                r["name"] + mark,
                r["input"],
                fmt(r["images_s"]),
                fmt(r["speedup"]) + "x",
                fmt(r["speedup_best"]) + "x",
                fmt(r["gflops_s"]),
                fmt(100 * r["gflops_s"] / peaks["fp32"]) + "%",
                "-"
                if r["precision"] not in peaks or r["precision"] == "fp32"
                else fmt(100 * r["gflops_s"] / peaks[r["precision"]]) + "%",
                f"{r['err']:.1e}",
                fmt(r["first_s"]),
                fmt(100 * r["spread"], 2) + "%",
            ]
        )
    notes = [
        "Speedup is against the torchvision baseline of the same arch (vgg16 rows: torchvision vgg16; "
        "vgg16_bn rows: torchvision vgg16_bn), timed interleaved in the same process; median of the repeats "
        "(`speedup (best-of)`: ratio of the fastest repeats, less sensitive to other processes' load). "
        "`spread` = (max - min) / median of the repeats. `setup + first call s`: optimize_for_inference or "
        "ONNX export + session creation, plus the first "
        "call, which includes compilation for compiled rows "
        "(a cold compile: the script gives inductor an empty cache directory). "
        "`% own-dtype peak`: a bf16/fp16 row against the measured matmul peak of that dtype (convolutions use "
        "other kernels than `torch.mm`, so it can exceed 100% where that dtype has no fast GEMM).",
    ]
    if probed:
        notes.append(
            f"† measured on the probe input {probe} (N x S) because this device has no fast kernels for that "
            "precision (see the environment lines); the speedup of a † row is against torchvision vgg16 fp32 "
            "timed at the same probe size. fp32 is less efficient on such a small input than at full size, so "
            "† ratios flatter the reduced precision (`--probe 1x112` or `--full-slow` for closer numbers)."
        )
    return markdown_table(headers, rows) + "\n\n" + "\n\n".join(notes)


def plot(results: list[dict[str, Any]], title: str, name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(8, 0.35 * len(results) + 1.2))
    labels = [r["name"] + (" †" if r["input"] != results[0]["input"] else "") for r in results]
    values = [r["speedup"] for r in results]
    palette = {"fp32": "tab:blue", "bf16": "tab:orange", "fp16": "tab:orange", "int8": "tab:green"}
    colors = ["tab:gray" if r["name"].startswith("torchvision") else palette[r["precision"]] for r in results]
    # bars grow from 1.0 (no change): right = faster, left = slower than torchvision
    ax.barh(range(len(results)), [v - 1.0 for v in values], left=1.0, color=colors)
    ax.set_yticks(range(len(results)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.axvline(1.0, color="k", lw=0.8)
    for i, v in enumerate(values):
        ax.text(max(v, 1.0), i, f" {v:.2g}x", va="center", fontsize=7)
    ax.set_xlabel("speedup vs torchvision fp32 eager (log scale; blue fp32, orange bf16/fp16, green int8)")
    ax.set_title(title, fontsize=9)
    save_figure(fig, name)
