"""ONNX export of any task model of :mod:`vggbackbone.models`: what ``python -m tasks.<task>
export`` calls.

>>> from vggbackbone.models import fasterrcnn_vgg, fcn_vgg
>>> from vggbackbone.deploy import export_task_onnx
>>> export_task_onnx(fcn_vgg("vgg16", num_classes=21).eval(), "fcn.onnx", torch.rand(1, 3, 320, 320))  # doctest: +SKIP
>>> export_task_onnx(fasterrcnn_vgg("vgg16", 21).eval(), "det.onnx", torch.rand(3, 600, 800))      # doctest: +SKIP

* Segmentation (``FCN``, ``UNetVGG``), ReID (``ReIDNet``, eval embedding) and classification
  models take one image batch and return one tensor: they go through
  :func:`~vggbackbone.deploy.onnx_export.export_onnx` (``torch.onnx.export(dynamo=True)``;
  dynamic batch, height and width; checked on a second input of another size).
* torchvision's detectors go through :func:`~vggbackbone.deploy.detector_export.export_detector_onnx`
  (one image per call; detections checked as a set).
* A ``path`` ending in ``.xml`` writes an OpenVINO model instead (``.xml`` + ``.bin``, fp32):
  the ONNX file is written and checked in a temporary folder as above, then read by OpenVINO
  and saved (:func:`~vggbackbone.deploy.openvino_files.save_openvino`); so ``python -m
  tasks.<task> export --ckpt C --out model.xml`` goes from a checkpoint to OpenVINO in one command.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from torch import Tensor, nn

from .detector_export import export_detector_onnx, torchvision_detector_types
from .onnx_export import export_onnx

__all__ = ["export_task_onnx"]


def export_task_onnx(model: nn.Module, path: str | os.PathLike[str], example_input: Tensor, **kwargs: object) -> Path:
    """Export any task model of :mod:`vggbackbone.models` to ONNX (see the module docstring).

    ``example_input``: ``(N, 3, H, W)`` for segmentation/ReID/classification models; one
    ``(3, H, W)`` image (or a batch of one) for a detector. ``kwargs`` go to
    :func:`~vggbackbone.deploy.detector_export.export_detector_onnx` or
    :func:`~vggbackbone.deploy.onnx_export.export_onnx`.
    """
    if Path(path).suffix == ".xml":
        return _export_openvino(model, Path(path), example_input, **kwargs)
    if isinstance(model, torchvision_detector_types()):
        image = example_input[0] if example_input.dim() == 4 else example_input
        return export_detector_onnx(model, path, image, **kwargs)  # type: ignore[arg-type]
    return export_onnx(model, path, example_input, **kwargs)  # type: ignore[arg-type]


def _export_openvino(model: nn.Module, path: Path, example_input: Tensor, **kwargs: object) -> Path:
    from .openvino_files import require_openvino, save_openvino

    ov = require_openvino()
    with tempfile.TemporaryDirectory(prefix=".onnx-", dir=path.parent) as tmp:
        onnx_path = export_task_onnx(model, Path(tmp) / path.with_suffix(".onnx").name, example_input, **kwargs)
        return save_openvino(ov.Core().read_model(str(onnx_path)), path)
