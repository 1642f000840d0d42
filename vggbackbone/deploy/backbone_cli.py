"""The backbone's command line: ``python -m vggbackbone.export``.

Builds a :class:`~vggbackbone.VGGBackbone`, writes it as ONNX atomically with
:func:`~vggbackbone.deploy.onnx_export.export_onnx` and checks it against PyTorch::

    python -m vggbackbone.export --arch vgg16 --taps conv3 conv4 conv5 --weights vgg16.pth --out model.onnx

Exit status 0 when written and checked, 1 when the export or its check failed, 2 when the
arguments or the weights were refused (the message names which).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from ..vgg import VGGBackbone
from ..weights import WeightsError
from .loggers import export_log
from .onnx_export import DEFAULT_OPSET, ExportVerificationError, export_onnx

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The options of ``python -m vggbackbone.export``."""
    parser = argparse.ArgumentParser(
        prog="python -m vggbackbone.export",
        description="Export a VGGBackbone to ONNX (dynamic batch and image size) and check it with onnxruntime.",
    )
    parser.add_argument("--arch", default="vgg16", help="VGG arch name, e.g. vgg16, vgg16_bn, vgg16_c (default: vgg16)")
    parser.add_argument(
        "--taps", nargs="+", default=["conv3", "conv4", "conv5"], help="taps to output (default: conv3 conv4 conv5)"
    )
    parser.add_argument(
        "--weights", default=None,
        help="weights file (.pth/.safetensors from torchvision, timm or save_weights) or torchvision weights name",
    )  # fmt: skip
    parser.add_argument("--out", required=True, type=Path, help="output .onnx file")
    parser.add_argument("--input-size", nargs=2, type=int, default=[224, 224], metavar=("H", "W"))
    parser.add_argument("--batch-size", type=int, default=1, help="batch size of the example input")
    parser.add_argument("--output-stride", type=int, default=None, choices=[8, 16, 32])
    parser.add_argument("--ceil-mode", action="store_true", help="Caffe-style ceil rounding in the max-pools")
    parser.add_argument("--width-mult", type=float, default=1.0, help="channel width multiplier (must match --weights)")
    parser.add_argument(
        "--normalization", default=None, choices=["imagenet", "caffe"], help="override the weights' input normalisation"
    )
    parser.add_argument("--static", action="store_true", help="fix batch/height/width to the example input's")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET)
    parser.add_argument("--no-verify", action="store_true", help="skip the onnxruntime check")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m vggbackbone.export``: build the backbone, export it, check it; the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    export_log.setLevel(logging.INFO)  # our progress lines, not every exporter pass
    try:
        model = VGGBackbone(
            args.arch,
            list(args.taps),
            weights=args.weights,
            output_stride=args.output_stride,
            ceil_mode=args.ceil_mode,
            width_mult=args.width_mult,
            normalization=args.normalization,
        )
    except (ValueError, FileNotFoundError) as e:  # WeightsError is a ValueError
        kind = "weights" if isinstance(e, (WeightsError, FileNotFoundError)) else "arguments"
        print(f"error ({kind}): {e}", file=sys.stderr)
        return 2
    h, w = args.input_size
    example = torch.randn(args.batch_size, model.in_channels, h, w)
    try:
        export_onnx(model, args.out, example, dynamic=not args.static, opset=args.opset, verify=not args.no_verify)
    except (ValueError, ExportVerificationError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    norm = model.normalization
    print(
        f"wrote {args.out}: input 'images' (N, {model.in_channels}, H, W) "
        f"{'dynamic' if not args.static else f'fixed {tuple(example.shape)}'}; outputs "
        + ", ".join(f"{k} (C={c}, stride {s})" for k, c, s in zip(
            model.feature_info.get("key"), model.feature_info.channels(), model.feature_info.reduction()))
        + f"; normalise [0,1] RGB input with mean={tuple(round(m, 5) for m in norm.mean)} "
        f"std={tuple(round(s, 5) for s in norm.std)}"
    )  # fmt: skip
    return 0
