"""The classic comparison, measured: LeNet-5, AlexNet, VGG A, A-LRN, B, C, D, E.

    python benchmarks/classic.py            # prints the table (a few minutes on 2 cores)
    python benchmarks/classic.py --write    # also updates docs/benchmarks.md and docs/img/classic.png

Parameters, GFLOPs (``FlopCounterMode``: conv + linear, 2 FLOPs per multiply-add), forward and
forward+backward time per image, all measured here. VGG columns are ``VGGBackbone`` with fc6/fc7
plus a 1000-way fc8 (a 1x1 conv on the 1x1 fc7 map of a 224 input), i.e. the full ImageNet
classifier, so the parameter counts are the paper's (Table 2) and fc6 is unpadded (a 7x7 valid conv
on the 7x7 pool5 map, exactly the Linear layer). AlexNet is torchvision's (the
single-tower "one weird trick" variant). LeNet-5 is the usual modern rendering (tanh,
average pooling, full C3 connectivity) on 32x32 grey images; all weights random.

Forward = eval mode under ``torch.inference_mode``; forward+backward = train mode (dropout on),
cross-entropy against random labels, ``backward()``; no optimizer step. Models are measured one
after the other (not interleaved: each VGG needs ~1-2 GB), each with warm-up and repeats.
"""

from __future__ import annotations

import gc
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (
    count_gflops,
    environment,
    environment_markdown,
    fmt,
    markdown_table,
    parse_args,
    save_figure,
    time_interleaved,
    update_section,
)
from vggbackbone import VGGBackbone

SCRIPT = "benchmarks/classic.py"
SECTION = "Classic networks: LeNet-5, AlexNet, VGG A-E (measured)"

#: Simonyan & Zisserman, Table 2: number of parameters (millions).
PAPER_PARAMS_M = {"vgg11": 133, "vgg11_lrn": 133, "vgg13": 133, "vgg16_c": 134, "vgg16": 138, "vgg19": 144}
PAPER_COLUMN = {"vgg11": "A", "vgg11_lrn": "A-LRN", "vgg13": "B", "vgg16_c": "C", "vgg16": "D", "vgg19": "E"}


class LeNet5(nn.Module):
    """LeNet-5 (LeCun et al. 1998) as usually re-implemented: 61,706 parameters, (N, 1, 32, 32) input."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 6, 5), nn.Tanh(), nn.AvgPool2d(2),  # C1, S2
            nn.Conv2d(6, 16, 5), nn.Tanh(), nn.AvgPool2d(2),  # C3, S4
        )  # fmt: skip
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(400, 120), nn.Tanh(), nn.Linear(120, 84), nn.Tanh(), nn.Linear(84, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class VGGClassifier(nn.Module):
    """The paper's ImageNet network: ``VGGBackbone`` up to fc7, then fc8 as a 1x1 conv.

    Input ``(N, 3, 224, 224)`` -> logits ``(N, 1000)``.
    """

    def __init__(self, arch: str, num_classes: int = 1000) -> None:
        super().__init__()
        # fc_padding="valid" (the default): fc6 is the Linear layer over the 7x7 pool5 map, 1x1 output.
        self.backbone = VGGBackbone(arch, return_layers=["fc7"])
        self.fc8 = nn.Conv2d(self.backbone.out_channels, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc8(self.backbone(x)["fc7"]).flatten(1)


def networks() -> list[tuple[str, Any, tuple[int, int, int]]]:
    """(label, builder, input CHW) in the order of the table."""
    import torchvision

    nets: list[tuple[str, Any, tuple[int, int, int]]] = [
        ("LeNet-5", LeNet5, (1, 32, 32)),
        ("AlexNet (torchvision)", torchvision.models.alexnet, (3, 224, 224)),
    ]
    for arch, col in PAPER_COLUMN.items():
        nets.append((f"VGG {col} ({arch})", lambda a=arch: VGGClassifier(a), (3, 224, 224)))
    return nets


def measure(label: str, build: Any, chw: tuple[int, int, int], args: Any) -> dict[str, Any]:
    device = args.device
    torch.manual_seed(0)
    model = build().to(device)
    params = sum(p.numel() for p in model.parameters())
    x1 = torch.randn(1, *chw, device=device)
    num_classes = 10 if chw[0] == 1 else 1000
    loss_fn = nn.CrossEntropyLoss()

    def forward(x: torch.Tensor) -> None:
        model.eval()
        with torch.inference_mode():
            model(x)

    def train_step(x: torch.Tensor) -> None:
        model.train()
        y = torch.randint(num_classes, (x.shape[0],), device=device)
        loss_fn(model(x), y).backward()
        model.zero_grad(set_to_none=True)

    gflop_fwd = count_gflops(lambda: forward(x1))
    gflop_train = count_gflops(lambda: train_step(x1))
    x = torch.randn(args.batch, *chw, device=device)
    t = time_interleaved({"fwd": lambda: forward(x), "train": lambda: train_step(x)}, device, args.repeats, args.warmup)
    model = None  # free it before the next network is built
    gc.collect()
    arch = label.split("(")[-1].rstrip(")")
    return dict(
        label=label,
        input="x".join(map(str, chw)),
        params=params,
        paper=PAPER_PARAMS_M.get(arch),
        gflop_fwd=gflop_fwd,
        gflop_train=gflop_train,
        fwd_ms=1000 * t["fwd"].median / args.batch,
        train_ms=1000 * t["train"].median / args.batch,
        fwd_spread=t["fwd"].spread,
        train_spread=t["train"].spread,
    )


def render(results: list[dict[str, Any]], batch: int) -> str:
    alex = next(r for r in results if r["label"].startswith("AlexNet"))
    headers = [
        "network", "input", "params (M)", "paper params (M)", "GFLOPs fwd", "GFLOPs fwd+bwd",
        "fwd ms/image", "fwd+bwd ms/image", "fwd+bwd vs AlexNet", "fwd GFLOP/s", "fwd+bwd GFLOP/s",
        "spread fwd / fwd+bwd",
    ]  # fmt: skip
    rows = [
        [
            r["label"],
            r["input"],
            f"{r['params'] / 1e6:.3f}" if r["params"] < 1e6 else f"{r['params'] / 1e6:.1f}",
            r["paper"] if r["paper"] is not None else "-",
            fmt(r["gflop_fwd"]),
            fmt(r["gflop_train"]),
            fmt(r["fwd_ms"]),
            fmt(r["train_ms"]),
            fmt(r["train_ms"] / alex["train_ms"]) + "x",
            fmt(r["gflop_fwd"] / r["fwd_ms"] * 1e3),
            fmt(r["gflop_train"] / r["train_ms"] * 1e3),
            f"{100 * r['fwd_spread']:.2g}% / {100 * r['train_spread']:.2g}%",
        ]
        for r in results
    ]
    note = (
        f"Batch {batch} per call, time per image = median call time / {batch}. GFLOPs per image count "
        "convolutions and linear layers only (2 FLOPs per multiply-add); fwd+bwd adds the backward "
        "(about 2x the forward: input and weight gradients; none for the image itself). "
        "`spread` = (max - min) / median of the repeats."
    )
    return markdown_table(headers, rows) + "\n\n" + note


def plot(results: list[dict[str, Any]], name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.2))
    labels = [r["label"].split(" (")[0] for r in results]
    idx = range(len(results))
    ax1.bar([i - 0.2 for i in idx], [r["fwd_ms"] for r in results], 0.4, label="forward")
    ax1.bar([i + 0.2 for i in idx], [r["train_ms"] for r in results], 0.4, label="forward+backward")
    ax1.set_xticks(list(idx), labels, rotation=30, ha="right", fontsize=8)
    ax1.set_yscale("log")
    ax1.set_ylabel("ms per image (log)")
    ax1.legend(fontsize=8)
    ax1.set_title("time per image, measured", fontsize=9)
    for r, label in zip(results, labels):
        ax2.scatter(r["gflop_fwd"], r["train_ms"], s=max(8.0, r["params"] / 1e6))
        ax2.annotate(label, (r["gflop_fwd"], r["train_ms"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax2.set_xscale("log")
    ax2.set_yscale("log")
    ax2.set_xlabel("forward GFLOPs per image (log)")
    ax2.set_ylabel("forward+backward ms per image (log)")
    ax2.set_title("cost vs time (marker area ~ parameters)", fontsize=9)
    save_figure(fig, name)


def main(argv: list[str] | None = None) -> None:
    def extra(p: Any) -> None:
        p.add_argument("--batch", type=int, default=2, help="images per timed call")
        p.set_defaults(repeats=3)

    args = parse_args(__doc__.splitlines()[0], argv, extra)
    env = environment(args.device)
    results = []
    for label, build, chw in networks():
        print(f"{label} ...", flush=True)
        results.append(measure(label, build, chw, args))
    command = f"python {SCRIPT} --batch {args.batch} --repeats {args.repeats} --write"
    body = f"Command: `{command}`\n\n{environment_markdown(env)}\n\n{render(results, args.batch)}"
    print(body)
    if args.write:
        where = "" if args.device.type == "cpu" else f"_{args.device.type}"
        plot(results, f"classic{where}")
        section = SECTION if not where else f"{SECTION} ({args.device.type})"
        update_section(section, body + f"\n\n![classic networks](img/classic{where}.png)", script=SCRIPT)


if __name__ == "__main__":
    main()
