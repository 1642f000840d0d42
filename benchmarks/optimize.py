"""Inference optimisation steps on VGG16 conv taps, torchvision fp32 eager = 1.0.

    python benchmarks/optimize.py                       # 8x224, prints the table
    python benchmarks/optimize.py --shapes 8x224,1x600x800 --write

Contenders (all share one set of random weights, so errors are comparable):

* torchvision ``create_feature_extractor`` on ``vgg16`` (taps = the ReLU before each pool) and
  ``vgg16_bn`` (BatchNorm statistics randomised so folding has work to do): the baselines;
* ours (``VGGBackbone``) eager, then :func:`vggbackbone.optimize_for_inference` step by step:
  channels_last, BN folding, bf16/fp16 autocast (NCHW, channels_last), ``torch.compile`` with
  freezing; int8 (torchao PT2E with the x86 inductor quantizer, calibrated on ``--calibration``
  random batches of the benchmark's shape, compiled with freezing: the setup column includes
  export + calibration, the first call the compile); smp's VGG16 encoder (weights=None) when
  segmentation-models-pytorch is installed;
  on CPU, the same backbone exported with ``torch.onnx.export`` and run by ONNX Runtime (when
  installed) — not part of ``optimize_for_inference``, shown for comparison.

A reduced precision that the device has no fast kernels for (bf16/fp16 on a CPU without
AMX/AVX512-BF16) runs 5-100x slower than fp32; those rows are measured on a small probe
input (``--probe``, default 1x64x64) next to the torchvision baseline *at that probe size*,
so their speedup is still a measured side-by-side ratio. ``--full-slow`` measures them at full
size anyway (can take many minutes).

Where oneDNN has no int8 kernels at all ``optimize_for_inference(precision="int8")`` falls back
to fp32; the int8 row is then built with :func:`vggbackbone.deploy.quantize_int8` directly (the
same quantised, compiled graph) and marked ``(no int8 kernels)``, so the table shows what it gives.
``--only REGEX`` keeps the contenders whose name matches (the torchvision baselines always run).
Each run writes its own sections, named after the shape and the CPU (model + features), so
tables of different machines stay side by side.
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (
    count_gflops,
    environment,
    environment_markdown,
    fmt,
    matmul_peak,
    parse_args,
    time_interleaved,
    update_section,
)
from benchmarks.optimize_report import cpu_tag, img_name, plot, render, section_name
from vggbackbone import VGGBackbone, optimize_for_inference
from vggbackbone.deploy import fast_reduced_precision, int8_supported, quantize_int8

SCRIPT = "benchmarks/optimize.py"


def parse_shape(text: str) -> tuple[int, int, int]:
    """``"8x224"`` -> (8, 224, 224); ``"1x600x800"`` -> (1, 600, 800)."""
    parts = [int(p) for p in text.lower().split("x")]
    if len(parts) == 2:
        return parts[0], parts[1], parts[1]
    if len(parts) == 3:
        return parts[0], parts[1], parts[2]
    raise ValueError(f"shape must be NxS or NxHxW, got {text!r}")


def torchvision_conv_taps(features: nn.Sequential) -> dict[str, str]:
    """``{"features.<i>": "convK"}`` for the ReLU before each max-pool of a torchvision VGG."""
    taps, block, last_relu = {}, 1, None
    for i, m in enumerate(features):
        if isinstance(m, nn.ReLU):
            last_relu = i
        elif isinstance(m, nn.MaxPool2d):
            taps[f"features.{last_relu}"] = f"conv{block}"
            block += 1
    return taps


def randomize_batchnorm(model: nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.1)


@dataclass
class Contender:
    name: str
    group: str  # the torchvision baseline it is compared with: "vgg16" or "vgg16_bn"
    model: Callable[[Tensor], dict[str, Tensor]]
    precision: str = "fp32"
    setup_s: float = 0.0  # optimize_for_inference / ONNX export + session creation


def timed(build: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = build()
    return out, time.perf_counter() - t0


def onnxruntime_runner(model: nn.Module, shape: tuple[int, int, int]) -> Callable[[Tensor], dict[str, Tensor]] | None:
    """``model`` exported with ``torch.onnx.export`` (static shape) and run by onnxruntime's CPU provider."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    n, h, w = shape
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        torch.onnx.export(model, (torch.randn(n, 3, h, w),), str(path), dynamo=True, external_data=False, verbose=False)
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name

    def run(x: Tensor) -> dict[str, Tensor]:
        return {"conv5": torch.from_numpy(session.run(None, {input_name: x.numpy()})[-1])}  # outputs in tap order

    return run


def int8_contender(model: VGGBackbone, device: torch.device, shape: tuple[int, int, int], batches: int) -> Contender:
    """int8 through optimize_for_inference, or (where that falls back to fp32: no int8 kernels)
    through quantize_int8 on the same BN-folded channels_last model."""
    n, h, w = shape
    g = torch.Generator().manual_seed(1)
    calibration = [torch.randn(n, 3, h, w, generator=g) for _ in range(batches)]
    name = f"int8 (PT2E, x86 quantizer, {batches} calibration batches) + channels_last + compile (freezing)"
    if int8_supported()[0]:
        fast, seconds = timed(
            lambda: optimize_for_inference(model, device=device, precision="int8", calibration=calibration)
        )
        return Contender(name, "vgg16", fast, "int8", seconds)

    def build() -> Callable[[Tensor], Any]:
        base = optimize_for_inference(model, device=device, precision="fp32")  # fold BN, channels_last
        cl = [x.contiguous(memory_format=torch.channels_last) for x in calibration]
        q = quantize_int8(base.model, cl)

        def run(x: Tensor) -> Any:
            with torch.inference_mode():
                return q(x.contiguous(memory_format=torch.channels_last))

        return run

    runner, seconds = timed(build)
    return Contender(name + " (no int8 kernels)", "vgg16", runner, "int8", seconds)


def build_models(
    device: torch.device,
    compile_modes: list[Any],
    shape: tuple[int, int, int],
    int8_batches: int = 2,
    keep: Callable[[str], bool] = lambda name: True,
) -> tuple[list[Contender], dict[str, Contender]]:
    """The contenders whose name ``keep`` accepts (same weights per arch) and the two torchvision baselines."""
    import torchvision
    from torchvision.models.feature_extraction import create_feature_extractor

    torch.manual_seed(0)
    tv16 = torchvision.models.vgg16().eval()
    tv16bn = torchvision.models.vgg16_bn().eval()
    randomize_batchnorm(tv16bn)
    ours: dict[str, VGGBackbone] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for arch, tv in (("vgg16", tv16), ("vgg16_bn", tv16bn)):
            path = Path(tmp) / f"{arch}.pth"
            torch.save(tv.state_dict(), path)
            ours[arch] = VGGBackbone(arch, weights=str(path)).eval().to(device)

    def eager(m: nn.Module) -> Callable[[Tensor], Any]:
        def run(x: Tensor) -> Any:
            with torch.inference_mode():
                return m(x)

        return run

    baselines = {}
    for arch, tv in (("vgg16", tv16), ("vgg16_bn", tv16bn)):
        extractor = create_feature_extractor(tv, torchvision_conv_taps(tv.features)).to(device)
        baselines[arch] = Contender(f"torchvision {arch} (fp32 eager)", arch, eager(extractor))
    rows = [baselines["vgg16"], Contender("ours vgg16 (fp32 eager)", "vgg16", eager(ours["vgg16"]))]
    try:
        import segmentation_models_pytorch as smp

        enc = smp.encoders.get_encoder("vgg16", weights=None)
        enc.load_state_dict({k: v for k, v in tv16.state_dict().items() if k.startswith("features.")})
        enc = enc.eval().to(device)
        smp_run = eager(enc)
        rows.append(Contender("smp vgg16 encoder (fp32 eager)", "vgg16", lambda x: {"conv5": smp_run(x)[4]}))
    except ImportError:
        pass

    def opt(name: str, arch: str, precision: str = "fp32", **kw: Any) -> Contender:
        model, seconds = timed(lambda: optimize_for_inference(ours[arch], device=device, precision=precision, **kw))
        return Contender(name, arch, model, precision, seconds)

    rows += [
        opt("+ channels_last", "vgg16"),
        opt("bf16 autocast, NCHW", "vgg16", "bf16", channels_last=False),
        opt("bf16 autocast + channels_last", "vgg16", "bf16"),
        opt("fp16 autocast + channels_last", "vgg16", "fp16"),
    ]
    for mode in compile_modes:
        label = "compile" if mode is True else f"compile {mode}"
        for precision in ("fp32", "bf16"):
            rows.append(opt(f"{precision} + channels_last + {label} (freezing)", "vgg16", precision, compile=mode))
    if device.type == "cpu" and int8_batches > 0 and keep("int8"):
        rows.append(int8_contender(ours["vgg16"], device, shape, int8_batches))
    onnx_name = "ONNX Runtime fp32 (torch.onnx.export, CPU provider)"
    if device.type == "cpu" and keep(onnx_name):
        runner, seconds = timed(lambda: onnxruntime_runner(ours["vgg16"], shape))
        if runner is not None:
            rows.append(Contender(onnx_name, "vgg16", runner, "fp32", seconds))
    rows += [
        baselines["vgg16_bn"],
        Contender("ours vgg16_bn (fp32 eager)", "vgg16_bn", eager(ours["vgg16_bn"])),
        opt("+ BN folding, NCHW", "vgg16_bn", channels_last=False),
        opt("+ BN folding + channels_last", "vgg16_bn"),
    ]
    base = list(baselines.values())
    groups = {r.group for r in rows if r not in base and keep(r.name)}  # a baseline runs where it has rows
    return [r for r in rows if (r.group in groups if r in base else keep(r.name))], baselines


def measure(
    rows: list[Contender],
    baselines: dict[str, Contender],
    shape: tuple[int, int, int],
    device: torch.device,
    repeats: int,
    warmup: int,
) -> list[dict[str, Any]]:
    """Time ``rows`` side by side on one input of ``shape``; error of conv5 vs the group's baseline."""
    n, h, w = shape
    x = torch.randn(n, 3, h, w, generator=torch.Generator().manual_seed(0)).to(device)
    with torch.inference_mode():
        ref = {g: b.model(x)["conv5"].float() for g, b in baselines.items() if any(r.group == g for r in rows)}
    gflop = {g: count_gflops(lambda b=b: b.model(x[:1])) * n for g, b in baselines.items()}
    conv5: dict[str, Tensor] = {}

    def call(r: Contender) -> Callable[[], None]:
        def run() -> None:
            conv5[r.name] = r.model(x)["conv5"]  # keep only conv5 (the taps at 8x224 are ~200 MB)

        return run

    all_rows = [b for b in baselines.values() if b.group in ref and b not in rows] + rows
    timings = time_interleaved({r.name: call(r) for r in all_rows}, device, repeats=repeats, warmup=warmup)
    out = []
    for r in all_rows:
        t = timings[r.name]
        base = timings[baselines[r.group].name].median
        err = ((conv5[r.name].float() - ref[r.group]).abs().max() / ref[r.group].abs().max()).item()
        out.append(
            dict(
                name=r.name,
                group=r.group,
                precision=r.precision,
                input=f"{n}x3x{h}x{w}",
                images_s=n / t.median,
                speedup=base / t.median,
                speedup_best=min(timings[baselines[r.group].name].samples) / min(t.samples),
                gflops_s=gflop[r.group] / t.median,
                err=err,
                first_s=t.first + r.setup_s,
                spread=t.spread,
            )
        )
    return out


def run(args: Any) -> None:
    device = args.device
    compile_modes: list[Any] = [] if args.no_compile else [True] + (["max-autotune"] if args.max_autotune else [])
    print(f"measuring matmul peaks on {device} ...", flush=True)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    peaks = {p: matmul_peak(dt, device) for p, dt in dtypes.items()}
    print("  " + ", ".join(f"{p} {v:.1f} GFLOP/s" for p, v in peaks.items()), flush=True)
    fast = set(fast_reduced_precision(device))
    probe = parse_shape(args.probe)

    for shape_text in args.shapes.split(","):
        shape = parse_shape(shape_text)
        env = environment(device)
        if not args.warm_compile_cache:  # first call of compiled rows = a cold compile, for every shape
            torch._dynamo.reset()
            cache = tempfile.mkdtemp(prefix="vggbackbone-bench-inductor-")
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
            atexit.register(shutil.rmtree, cache, ignore_errors=True)
        keep = (lambda name: re.search(args.only, name) is not None) if args.only else (lambda name: True)
        # fresh models: compiled ones see one shape
        rows, baselines = build_models(device, compile_modes, shape, args.int8_calibration, keep)
        # int8 always runs at full size: where optimize_for_inference would fall back, the row shows what it gives
        slow = [r for r in rows if r.precision in ("bf16", "fp16") and r.precision not in fast and not args.full_slow]
        full = [r for r in rows if r not in slow]
        print(f"{shape_text}: timing {len(full)} contenders at full size ...", flush=True)
        results = measure(full, baselines, shape, device, args.repeats, args.warmup)
        if slow:
            print(f"{shape_text}: timing {len(slow)} slow contenders at probe size {args.probe} ...", flush=True)
            results += measure(slow, {"vgg16": baselines["vgg16"]}, probe, device, min(args.repeats, 3), 1)
        # peak = best of a measurement before and after the shape's run (less hurt by a burst of load)
        peaks = {p: max(v, matmul_peak(dtypes[p], device)) for p, v in peaks.items()}
        table = render(results, peaks, args.probe, bool(slow))
        peak_lines = {f"{p} matmul peak (measured)": f"{fmt(v)} GFLOP/s" for p, v in peaks.items()}
        header = environment_markdown(env, peak_lines)
        command = f"python {SCRIPT} --shapes {shape_text} --repeats {args.repeats}"
        command += "".join(f" {flag}" for flag in args.extra_flags) + " --write"
        body = f"Command: `{command}`\n\n{header}\n\n{table}"
        print(body, flush=True)
        if args.write:
            name, img = section_name(shape_text, device), img_name(shape_text, device)
            name, img = f"{name[:-1]}, {cpu_tag()})", f"{img}_{cpu_tag(slug=True)}"
            plot(results, name, img)
            update_section(name, body + f"\n\n![{name}](img/{img}.png)", script=SCRIPT)
        del rows, baselines


def main(argv: list[str] | None = None) -> None:
    def extra(p: Any) -> None:
        p.add_argument("--shapes", default="8x224", help="comma-separated NxS or NxHxW inputs, e.g. 8x224,1x600x800")
        p.add_argument("--probe", default="1x64", help="input for precisions without fast kernels on this device")
        p.add_argument("--full-slow", action="store_true", help="measure slow precisions at full size too")
        p.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
        p.add_argument("--max-autotune", action="store_true", help="also compile with mode='max-autotune'")
        p.add_argument("--warm-compile-cache", action="store_true", help="reuse inductor's cache (faster first call)")
        p.add_argument("--int8-calibration", type=int, default=2, help="calibration batches for int8 (0: no int8 row)")
        p.add_argument("--only", default=None, help="regex: keep contenders whose name matches (baselines always)")

    args = parse_args(__doc__.splitlines()[0], argv, extra)
    args.extra_flags = [f"--only '{args.only}'"] if args.only else []
    args.extra_flags += ["--no-compile"] if args.no_compile else []
    run(args)


if __name__ == "__main__":
    main()
