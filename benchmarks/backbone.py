"""Backbone forward throughput, fp32 eager: VGGBackbone vs torchvision vs timm vs smp, same taps.

    python benchmarks/backbone.py                     # 8x224, prints the table
    python benchmarks/backbone.py --large --write     # + 1x600x800, updates docs/benchmarks.md

Contenders, all on the same weights (torchvision's ``vgg16(weights=None)`` init, loaded into the
other two) and the same input, returning the same three taps (conv3, conv4, conv5 = the ReLU
before pool3/4/5):

* torchvision: ``create_feature_extractor(vgg16(), {"features.15": ..., "features.22": ...,
  "features.29": ...})`` (the baseline, ratio 1.0);
* ours: ``VGGBackbone("vgg16", ["conv3", "conv4", "conv5"])``;
* timm: ``timm.create_model("vgg16", features_only=True, out_indices=(2, 3, 4))``;
* smp: ``segmentation_models_pytorch.encoders.get_encoder("vgg16", weights=None)`` (its
  outputs 2, 3, 4; it also returns conv1, conv2 and pool5, which cost one extra max-pool).

Timing, FLOP counting, the measured matmul peak and the doc section follow
``benchmarks/common.py`` (see docs/benchmarks.md, Methodology): interleaved repeats, medians,
FLOPs from ``torch.utils.flop_counter.FlopCounterMode`` (2 per multiply-add; VGG16 to conv5 at
224x224 is 30.7 GFLOPs per image), peak = best fp32 ``torch.mm`` GFLOP/s on the same threads.
The outputs are checked equal before anything is timed.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
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
    markdown_table,
    matmul_peak,
    parse_args,
    save_figure,
    time_interleaved,
    update_section,
)
from vggbackbone import VGGBackbone
from vggbackbone.weights import to_canonical

SCRIPT = "benchmarks/backbone.py"
SECTION = "Backbone forward (fp32 eager)"
IMAGE = "backbone"
TAPS = ("conv3", "conv4", "conv5")


def torchvision_tap_nodes(features: nn.Sequential, taps: tuple[str, ...]) -> dict[str, str]:
    """``{"features.<i>": "convK"}``: the ReLU before each max-pool of a torchvision VGG."""
    nodes, block, last_relu = {}, 1, None
    for i, m in enumerate(features):
        if isinstance(m, nn.ReLU):
            last_relu = i
        elif isinstance(m, nn.MaxPool2d):
            if f"conv{block}" in taps:
                nodes[f"features.{last_relu}"] = f"conv{block}"
            block += 1
    return nodes


def build_contenders(arch: str) -> dict[str, nn.Module]:
    """The three extractors, sharing torchvision's weights, in eval mode."""
    import torchvision
    from torchvision.models.feature_extraction import create_feature_extractor

    tv = torchvision.models.get_model(arch, weights=None).eval()
    contenders: dict[str, nn.Module] = {
        "torchvision create_feature_extractor": create_feature_extractor(
            tv, torchvision_tap_nodes(tv.features, TAPS)
        ).eval(),
    }
    ours = VGGBackbone(arch, list(TAPS)).eval()
    ours.load_state_dict(to_canonical(tv.features.state_dict(prefix="features."), ours.config)[0])
    contenders["vggbackbone VGGBackbone"] = ours
    try:
        import timm
    except ImportError:
        print("timm is not installed: its row is skipped", file=sys.stderr)
    else:
        out_indices = tuple(int(t[4:]) - 1 for t in TAPS)
        net = timm.create_model(arch, pretrained=False, features_only=True, out_indices=out_indices).eval()
        # FeatureListNet flattens "features.<i>" into "features_<i>"
        sd = tv.features.state_dict(prefix="features.")
        net.load_state_dict({k.replace("features.", "features_"): v for k, v in sd.items()})
        contenders["timm features_only"] = net
    try:
        import segmentation_models_pytorch as smp
    except ImportError:
        print("segmentation-models-pytorch is not installed: its row is skipped", file=sys.stderr)
    else:
        encoder = smp.encoders.get_encoder(arch, weights=None)
        encoder.load_state_dict(tv.features.state_dict(prefix="features."))
        contenders["smp encoder"] = _Taps(encoder.eval(), [int(t[4:]) - 1 for t in TAPS])
    return contenders


class _Taps(nn.Module):
    """The ``indices`` of a list-returning encoder (smp's returns conv1..conv5 and pool5)."""

    def __init__(self, encoder: nn.Module, indices: list[int]) -> None:
        super().__init__()
        self.encoder = encoder
        self.indices = indices

    def forward(self, x: Tensor) -> list[Tensor]:
        out = self.encoder(x)
        return [out[i] for i in self.indices]


def as_list(out: Any) -> list[Tensor]:
    return list(out.values()) if isinstance(out, dict) else list(out)


def check_same_outputs(contenders: dict[str, nn.Module], x: Tensor) -> None:
    """Refuse to time contenders that do not compute the same thing."""
    ref_name, ref_model = next(iter(contenders.items()))
    with torch.inference_mode():
        ref = as_list(ref_model(x))
        for name, model in contenders.items():
            out = as_list(model(x))
            assert [t.shape for t in out] == [t.shape for t in ref], f"{name}: shapes differ from {ref_name}"
            for a, b in zip(out, ref):
                err = float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))
                assert err < 1e-5, f"{name}: outputs differ from {ref_name} (max rel. err {err:.2g})"


def bench_shape(
    contenders: dict[str, nn.Module], shape: tuple[int, int, int, int], args: Any, peak: float
) -> list[list[str]]:
    """Time every contender on one input shape; one table row each."""
    x = torch.randn(*shape, device=args.device)
    check_same_outputs(contenders, x)
    fns: dict[str, Callable[[], Any]] = {}
    for name, model in contenders.items():

        def run(model: nn.Module = model) -> Any:
            with torch.inference_mode():
                return model(x)

        fns[name] = run
    gflops = count_gflops(fns["vggbackbone VGGBackbone"])  # identical convs in all three
    timings = time_interleaved(fns, args.device, repeats=args.repeats, warmup=args.warmup)
    base = timings["torchvision create_feature_extractor"]
    rows = []
    for name, t in timings.items():
        rate = gflops / t.median
        rows.append([
            name, "x".join(map(str, shape)), fmt(t.median * 1e3), fmt(shape[0] / t.median),
            f"{base.median / t.median:.3f}", f"{min(base.samples) / min(t.samples):.3f}",
            fmt(rate), f"{100 * rate / peak:.0f}%", f"{100 * t.spread:.0f}%",
        ])  # fmt: skip
    return rows


def plot(rows: list[list[str]], title: str) -> None:
    """Bars of the speed ratio vs torchvision, one group per input shape."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(dict.fromkeys(r[1] for r in rows))
    names = list(dict.fromkeys(r[0] for r in rows))
    fig, ax = plt.subplots(figsize=(7, 3.2))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        ratios = [float(next(r[4] for r in rows if r[0] == name and r[1] == s)) for s in shapes]
        bars = ax.bar([j + i * width for j in range(len(shapes))], ratios, width, label=name)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(shapes))], shapes)
    ax.set_ylabel("speed vs torchvision (median)")
    ax.set_ylim(0, max(1.3, ax.get_ylim()[1]))
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2)
    save_figure(fig, IMAGE)


def main(argv: list[str] | None = None) -> None:
    def extra(p: Any) -> None:
        p.add_argument("--arch", default="vgg16", help="torchvision/timm VGG arch (default vgg16)")
        p.add_argument("--batch", type=int, default=8, help="batch of the 224x224 input (default 8)")
        p.add_argument("--large", action="store_true", help="also time one 600x800 image (Faster R-CNN size)")

    args = parse_args(
        "Backbone forward throughput: VGGBackbone vs torchvision vs timm vs smp (fp32 eager).", argv, extra
    )
    env = environment(args.device)
    torch.manual_seed(0)
    contenders = {name: m.to(args.device) for name, m in build_contenders(args.arch).items()}
    peak = matmul_peak(torch.float32, args.device)
    print(f"measured fp32 torch.mm peak: {peak:.1f} GFLOP/s on {torch.get_num_threads()} threads")

    shapes = [(args.batch, 3, 224, 224)] + ([(1, 3, 600, 800)] if args.large else [])
    headers = ["implementation", "input", "median ms", "images/s", "vs torchvision", "vs tv (best-of)",
               "GFLOP/s", "% of fp32 mm peak", "spread"]  # fmt: skip
    rows: list[list[str]] = []
    for shape in shapes:
        rows += bench_shape(contenders, shape, args, peak)
        print(markdown_table(headers, rows[-len(contenders) :]), flush=True)

    table = markdown_table(headers, rows)
    command = f"python {SCRIPT} " + " ".join(sys.argv[1:] if argv is None else argv)
    body = "\n\n".join([
        f"`{command.strip()}`, taps {', '.join(TAPS)} of {args.arch}, same weights and input for all; "
        f"ratios > 1 mean faster than torchvision. {args.repeats} interleaved repeats, median.",
        environment_markdown(env, {"fp32 torch.mm peak (measured)": f"{peak:.1f} GFLOP/s"}),
        table,
        f"![backbone forward speed vs torchvision](img/{IMAGE}.png)",
    ])  # fmt: skip
    if args.write:
        plot(rows, f"{args.arch} taps {', '.join(TAPS)}, fp32 eager, {torch.get_num_threads()} threads ({env['cpu']})")
        print(f"updated {update_section(SECTION, body, script=SCRIPT)}")
    else:
        print("\n(not written: add --write to update docs/benchmarks.md)")


if __name__ == "__main__":
    main()
