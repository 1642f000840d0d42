"""End-to-end inference speed per task model, every runtime side by side on this CPU.

    python benchmarks/end_to_end.py --out results/e2e.md [--threads 2] [--repeats 3] [--tasks detect,ssd]
    python benchmarks/end_to_end.py --quick --out /tmp/e2e.md     # tiny widths and sizes, 1 repeat

For each task model at its real input size (Faster R-CNN VGG16 one 600x800 image, SSD300 one
image, FCN-8s 1x512x512, ReIDNet 32x256x128, classifier 8x224x224), rows: torchvision-style
fp32 eager (the model as built: NCHW, BatchNorm unfolded; = 1.0), ours fp32 / bf16 / int8
(``optimize_for_inference``), ONNX Runtime fp32, OpenVINO fp32 / its default hint / int8
(NNCF). All contenders of a task are built first, then timed interleaved
(:func:`benchmarks.common.time_interleaved`: medians, rotating order). Random weights and
random images: speed only (accuracy of int8 on trained models: ``benchmarks/int8_accuracy.py``).

Detectors in ONNX Runtime and OpenVINO run the batched graph (post-processing inside,
:mod:`vggbackbone.deploy.batched_detector`) on the image at the model's own resized size, so
every row does the same work. Where ours int8 leaves parts in fp32 (detector heads, NMS, the FCN
score layers, fc6/fc7 outside the backbone), the "fp32 part" column gives the share of the
int8 row's time spent outside the quantised modules (timed by forward hooks on one call).

Full run: 5 models x 8 rows; ``--repeats`` (default 3) interleaved rounds after one warm-up
call each; built to finish within ~15 minutes on 2 cores (inductor's int8 compilation and the
ONNX exports are most of it: ``setup s``). ``--quick``: width 1/16, small inputs, 1 repeat, and
ours int8 uncompiled (the reference kernels: inductor takes minutes on a busy CPU), for CI.
Writes a markdown table to ``--out`` and the plot beside it (``.png``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python benchmarks/end_to_end.py` from a clone
    sys.path.insert(0, str(ROOT))

from benchmarks.common import environment, environment_markdown, fmt, markdown_table, time_interleaved  # noqa: E402
from vggbackbone import optimize_for_inference  # noqa: E402
from vggbackbone.deploy import InferenceModule, int8_supported, quantization_targets, quantize_int8  # noqa: E402
from vggbackbone.utils import atomic_write  # noqa: E402

TASKS = ("detect", "ssd", "segment", "reid", "classify")


@dataclass
class Spec:
    """One task model and its input: ``shape`` is ``(N, H, W)`` (detectors: one image, N = 1)."""

    name: str
    build: Callable[[], nn.Module]
    shape: tuple[int, int, int]
    detector: bool = False


def specs(quick: bool) -> dict[str, Spec]:
    from vggbackbone.models import fasterrcnn_vgg, fcn_vgg, reid_vgg, ssd_vgg, vgg_classifier

    w = {"width_mult": 0.0625} if quick else {}
    fc = {"fc_channels": 64} if quick else {}
    size = (lambda full, small: small) if quick else (lambda full, small: full)
    det = size((600, 1000), (64, 96))
    return {
        "detect": Spec(
            "Faster R-CNN VGG16",
            lambda: fasterrcnn_vgg("vgg16", 21, min_size=det[0], max_size=det[1], **w),
            (1, det[0], size(800, 96)),
            True,
        ),
        "ssd": Spec("SSD300 VGG16", lambda: ssd_vgg("vgg16", size=300, num_classes=21, **w), (1, 300, 300), True),
        "segment": Spec(
            "FCN-8s VGG16", lambda: fcn_vgg("vgg16", 21, "8s", **w, **fc), (1, *size((512, 512), (64, 64)))
        ),
        "reid": Spec("ReIDNet VGG16", lambda: reid_vgg("vgg16", **w), size((32, 256, 128), (4, 64, 32))),
        "classify": Spec(
            "VGG16 classifier", lambda: vgg_classifier("vgg16", 1000, **w, **fc), size((8, 224, 224), (2, 64, 64))
        ),
    }


@dataclass
class Row:
    name: str
    precision: str
    run: Callable[[], Any]
    setup_s: float = 0.0
    output: Callable[[], Tensor] | None = None  # dense output to compare with the baseline
    fp32_share: float = float("nan")
    timing: Any = field(default=None)


def _timed(build: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = build()
    return out, time.perf_counter() - t0


def _dense_out(out: Any) -> Tensor:
    """The tensor a dense model's output is compared on (a backbone's last tap)."""
    if isinstance(out, dict):
        out = list(out.values())[-1]
    if isinstance(out, (list, tuple)):
        out = out[0]
    return torch.as_tensor(np.asarray(out) if not isinstance(out, Tensor) else out).float()


def fp32_share(module: nn.Module, call: Callable[[], Any], quantized: list[str]) -> float:
    """Share of one call's time spent outside the ``quantized`` submodules of ``module``."""
    inside = [0.0]
    starts: list[float] = []
    handles = []
    for name in quantized:
        sub = module.get_submodule(name)
        handles.append(sub.register_forward_pre_hook(lambda *_: starts.append(time.perf_counter())))
        handles.append(
            sub.register_forward_hook(lambda *_: inside.__setitem__(0, inside[0] + time.perf_counter() - starts.pop()))
        )
    try:
        t0 = time.perf_counter()
        call()
        total = time.perf_counter() - t0
    finally:
        for h in handles:
            h.remove()
    return max(0.0, 1.0 - inside[0] / total)


def torch_rows(model: nn.Module, call: Callable[[nn.Module], Any], calibration: list[Any], quick: bool) -> list[Row]:
    """torchvision-style fp32 eager (the baseline) and ours fp32 / bf16 / int8."""
    rows = [Row("torchvision-style fp32 eager", "fp32", lambda: call(model))]
    for precision in ("fp32", "bf16"):
        fast, s = _timed(lambda p=precision: optimize_for_inference(model, precision=p))
        rows.append(Row(f"ours {precision}", precision, lambda f=fast: call(f), s))
    if not int8_supported()[0]:
        return rows
    if quick:  # uncompiled reference kernels: inductor takes minutes on a busy CPU

        def build() -> nn.Module:
            base = optimize_for_inference(model, precision="fp32")  # BN folded, channels_last
            targets = quantization_targets(base.model) or [""]
            q = quantize_int8(base.model, calibration, targets, compile=False)
            return InferenceModule(
                q,
                device=torch.device("cpu"),
                precision="int8",
                channels_last=True,
                compile=False,
                folded_batchnorms=base.folded_batchnorms,
                quantized=tuple(targets),
            )

        fast, s = _timed(build)
    else:
        fast, s = _timed(lambda: optimize_for_inference(model, precision="int8", calibration=calibration))
    row = Row("ours int8", "int8", lambda: call(fast), s)
    call(fast)  # compiles (the first call per shape)
    quantized = [f"model.{n}" if n else "model" for n in fast.quantized]
    row.fp32_share = fp32_share(fast, lambda: call(fast), quantized)
    rows.append(row)
    return rows


def exported_rows(spec: Spec, model: nn.Module, x: Any, calibration: list[Any], tmp: Path) -> list[Row]:
    """ONNX Runtime fp32 and OpenVINO fp32 / default / int8, all on one exported file (detectors:
    the batched graph at the model's resized size)."""
    from vggbackbone.deploy import export_batched_detector_onnx, export_task_onnx

    path = tmp / f"{spec.name.replace(' ', '_')}.onnx"
    if spec.detector:
        _, export_s = _timed(lambda: export_batched_detector_onnx(model, path, spec.shape[1:], verify=False))
        feed = x[0][None].numpy()
        samples = [b[0][None].numpy() for b in calibration]
    else:
        _, export_s = _timed(lambda: export_task_onnx(model, path, x[:1], verify=False))
        feed = x.numpy()
        samples = [b.numpy() for b in calibration]
    rows = []
    try:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        session, s = _timed(lambda: ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]))
        name = session.get_inputs()[0].name
        rows.append(Row("ONNX Runtime fp32", "fp32", lambda: session.run(None, {name: feed}), export_s + s))
    except ImportError:
        print("onnxruntime not installed: no ONNX Runtime row")
    try:
        import openvino as ov
    except ImportError:
        print("openvino not installed: no OpenVINO rows (pip install 'vggbackbone[openvino]')")
        return rows
    from vggbackbone.deploy import compile_openvino, quantize_openvino

    for precision in ("fp32", "default", "int8"):

        def build(p: str = precision) -> Any:
            m = ov.Core().read_model(str(path))
            return compile_openvino(quantize_openvino(m, samples) if p == "int8" else m, p)

        compiled, s = _timed(build)
        label = {"default": "OpenVINO default (its own hint)"}.get(precision, f"OpenVINO {precision}")
        rows.append(Row(label, precision, lambda c=compiled: c(feed).to_tuple(), export_s + s))
    return rows


def bench_task(key: str, spec: Spec, repeats: int, quick: bool, tmp: Path) -> list[dict[str, Any]]:
    """Build every contender of one task, time them interleaved; one result dict per row."""
    torch.manual_seed(0)
    model = spec.build().eval()
    with torch.no_grad():  # zero-initialised layers (FCN's scores) would make every output 0
        for prm in model.parameters():
            if prm.dim() > 1 and not prm.any():
                prm.normal_(0.0, 0.01)
    n, h, w = spec.shape
    g = torch.Generator().manual_seed(1)
    if spec.detector:
        x: Any = [torch.rand(3, h, w, generator=g)]
        calibration: list[Any] = [[torch.rand(3, h, w, generator=g)] for _ in range(2)]
    else:
        x = torch.rand(n, 3, h, w, generator=g)
        calibration = [torch.rand(n, 3, h, w, generator=g) for _ in range(2)]

    def call(m: nn.Module) -> Any:
        with torch.inference_mode():
            return m(x)

    rows = torch_rows(model, call, calibration, quick)
    rows += exported_rows(spec, model, x, calibration, tmp)
    timings = time_interleaved({r.name: r.run for r in rows}, torch.device("cpu"), repeats=repeats, warmup=1)
    base = timings[rows[0].name].median
    ref = None if spec.detector else _dense_out(call(model))
    results = []
    for r in rows:
        err = float("nan")
        if ref is not None:
            out = _dense_out(r.run())
            err = float((out.reshape(ref.shape) - ref).abs().max() / ref.abs().max())
        t = timings[r.name]
        results.append(
            {
                "task": spec.name,
                "input": "x".join(map(str, spec.shape)),
                "row": r.name,
                "precision": r.precision,
                "ms": 1e3 * t.median,
                "speedup": base / t.median,
                "err": err,
                "setup_s": r.setup_s,
                "fp32_share": r.fp32_share,
                "spread": t.spread,
            }
        )
    print(f"{key}: " + ", ".join(f"{d['row']} {d['speedup']:.2f}x" for d in results), flush=True)
    return results


def render(results: list[dict[str, Any]], env: dict[str, Any], args: argparse.Namespace) -> str:
    headers = [
        "task",
        "input",
        "row",
        "ms / call (median)",
        "speed vs torchvision fp32",
        "rel. error",
        "fp32 part of int8 time",
        "setup s",
        "spread",
    ]
    rows = [
        [
            r["task"],
            r["input"],
            r["row"],
            fmt(r["ms"]),
            f"{r['speedup']:.2f}x",
            fmt(r["err"], 2),
            "-" if r["fp32_share"] != r["fp32_share"] else f"{100 * r['fp32_share']:.0f}%",
            fmt(r["setup_s"]),
            fmt(r["spread"], 2),
        ]
        for r in results
    ]
    notes = [
        f"`python benchmarks/end_to_end.py {' '.join(args.argv)}`: medians of {args.repeats} interleaved rounds.",
        "rel. error: max |y - y_ref| / max |y_ref| of the dense output vs the torchvision-style fp32 eager model "
        "(detectors: '-', their detections are compared in tests/test_batched_export.py and tests/test_openvino.py).",
        "fp32 part of int8 time: the share of ours-int8's time outside its quantised modules (detector heads, "
        "RPN, NMS, the FCN score layers): what int8 cannot speed up; the next lever there is quantising those parts "
        "(OpenVINO's NNCF row quantises the whole graph).",
    ]
    return environment_markdown(env) + "\n\n" + markdown_table(headers, rows) + "\n\n" + "\n\n".join(notes) + "\n"


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in results))
    names = list(dict.fromkeys(r["row"] for r in results))
    fig, ax = plt.subplots(figsize=(9, 0.5 * len(tasks) * len(names) / 4 + 2))
    width = 0.8 / len(names)
    for j, name in enumerate(names):
        vals = [next((r["speedup"] for r in results if r["task"] == t and r["row"] == name), 0.0) for t in tasks]
        ax.barh([i + j * width for i in range(len(tasks))], vals, height=width, label=name)
    ax.set_yticks([i + 0.4 - width / 2 for i in range(len(tasks))], tasks)
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("speed vs torchvision-style fp32 eager (log)")
    ax.legend(fontsize=7, loc="lower right")
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="markdown table written here (the plot beside it, .png)")
    p.add_argument("--quick", action="store_true", help="tiny widths and inputs, 1 repeat (CI)")
    p.add_argument("--repeats", type=int, default=None, help="interleaved timed rounds (default 3; --quick 1)")
    p.add_argument("--threads", type=int, default=None, help="torch / ONNX Runtime / OpenVINO threads")
    p.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated subset of {','.join(TASKS)}")
    args = p.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    args.repeats = args.repeats or (1 if args.quick else 3)
    if args.threads:
        torch.set_num_threads(args.threads)
    keys = [k.strip() for k in args.tasks.split(",") if k.strip()]
    unknown = sorted(set(keys) - set(TASKS))
    if unknown:
        raise SystemExit(f"--tasks: unknown {unknown}; known: {', '.join(TASKS)}")
    env = environment(torch.device("cpu"))
    all_specs = specs(args.quick)
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="e2e-") as tmp:
        for key in keys:
            results += bench_task(key, all_specs[key], args.repeats, args.quick, Path(tmp))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(out, "w") as f:
        f.write(render(results, env, args))
    plot(results, out.with_suffix(".png"))
    print(f"end_to_end: {out} and {out.with_suffix('.png')}")
    return out


if __name__ == "__main__":
    main()
