"""An ONNX file of this package to an OpenVINO model (``.xml`` + ``.bin``), fp32 or int8 (NNCF on
a folder of calibration images): ``python -m vggbackbone.deploy.openvino_cli``.

    python -m vggbackbone.deploy.openvino_cli model.onnx --out model.xml
    python -m vggbackbone.deploy.openvino_cli model.onnx --out model-int8.xml \\
        --calibration-images DIR [--calibration-count 32] [--height 512 --width 512]

Calibration images are read as RGB, resized (bilinear) to the graph's input size (a batched
detector graph fixes it; otherwise ``--height``/``--width``, default 224) and scaled to ``[0,
1]``: what every task model's graph takes (segmentation, ReID and classification normalise
inside, detectors too). A bare backbone graph takes normalised images: calibrate it from
Python (:func:`~.openvino_runtime.quantize_openvino`). The one-image detector graph cannot be
quantised by NNCF (it fails to build its graph): export the batched one
(:func:`~.batched_export.export_batched_detector_onnx`). Both files are written to temporary
names and renamed, the ``.bin`` first.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

from .openvino_files import require_openvino, save_openvino
from .openvino_runtime import quantize_openvino

__all__ = ["calibration_arrays", "main", "save_openvino"]

_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp")


def calibration_arrays(folder: str | os.PathLike[str], count: int, size: tuple[int, int]) -> list[np.ndarray]:
    """Up to ``count`` images of ``folder`` (sorted by name, spread evenly), each ``(1, 3, H, W)``
    float32 in ``[0, 1]`` at ``size``. Raises ``ValueError`` naming the folder when it holds none."""
    from PIL import Image

    files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"{folder}: no images ({', '.join(_IMAGE_SUFFIXES)}) to calibrate on")
    picks = np.unique(np.linspace(0, len(files) - 1, min(count, len(files))).round().astype(int))
    arrays = []
    for i in picks:
        with Image.open(files[i]) as im:
            rgb = im.convert("RGB").resize((size[1], size[0]), Image.BILINEAR)
        arrays.append(np.ascontiguousarray(np.asarray(rgb, np.float32).transpose(2, 0, 1)[None] / 255.0))
    return arrays


def _input_size(model: object, height: int, width: int) -> tuple[int, int]:
    shape = model.inputs[0].get_partial_shape()  # type: ignore[attr-defined]
    if shape.rank.get_length() != 4:
        raise ValueError(
            "int8 needs a graph taking an image batch; this one takes one image (the one-image detector "
            "export, which NNCF cannot quantise): export the batched detector graph"
        )
    dims = [shape[2], shape[3]]
    return tuple(d.get_length() if d.is_static else v for d, v in zip(dims, (height, width)))  # type: ignore[return-value]


def main(argv: list[str] | None = None) -> Path:
    """Convert (and optionally quantise) an ONNX file; print what was written."""
    parser = argparse.ArgumentParser(prog="python -m vggbackbone.deploy.openvino_cli", description=__doc__)
    parser.add_argument("onnx", help="ONNX file written by this package (python -m tasks.<task> export ...)")
    parser.add_argument("--out", required=True, help="the OpenVINO model, a .xml file (its .bin beside it)")
    parser.add_argument("--calibration-images", help="folder of images: quantise to int8 with NNCF on them")
    parser.add_argument("--calibration-count", type=int, default=32, help="images to calibrate on (default 32)")
    parser.add_argument("--height", type=int, default=224, help="calibration height for a dynamic-size graph")
    parser.add_argument("--width", type=int, default=224, help="calibration width for a dynamic-size graph")
    args = parser.parse_args(argv)
    ov = require_openvino()
    if not Path(args.onnx).is_file():
        raise SystemExit(f"{args.onnx}: file not found")
    model = ov.Core().read_model(args.onnx)
    kind = "fp32"
    if args.calibration_images:
        size = _input_size(model, args.height, args.width)
        model = quantize_openvino(model, calibration_arrays(args.calibration_images, args.calibration_count, size))
        kind = "int8"
    out = save_openvino(model, args.out)
    print(f"openvino: {args.onnx} -> {out} ({kind})")
    return out


if __name__ == "__main__":
    main()
