"""OpenVINO as a runtime: our ONNX files read by ``openvino.Core``, int8 by NNCF, and a module with
the PyTorch model's call interface (``optimize_for_inference(model, runtime="openvino")``).

>>> from vggbackbone.models import fcn_vgg
>>> from vggbackbone import optimize_for_inference
>>> fast = optimize_for_inference(fcn_vgg("vgg16", 21), precision="int8", runtime="openvino",
...                               calibration=batches)                                 # doctest: +SKIP
>>> logits = fast(images)                                                              # doctest: +SKIP

The route: the model is exported to ONNX by this package's own exporters
(:func:`~.task_export.export_task_onnx`: dynamic batch and size; detectors one image per call),
read with ``openvino.Core().read_model``, quantised by ``nncf.quantize`` on the calibration
batches for int8, and compiled for the CPU with as many threads as torch uses
(``INFERENCE_NUM_THREADS``). The conversion happens on the first call (its input is the export
example), like ``torch.compile``.

Precisions (``INFERENCE_PRECISION_HINT``): ``"fp32"`` (``f32``); ``"bf16"`` (``bf16``);
``"default"`` (no hint: OpenVINO's own choice, bf16 on CPUs with AMX or AVX512-BF16, else
fp32); ``"int8"`` (NNCF post-training quantisation, default preset, on every calibration
batch). Tolerances, max relative error per output against the fp32 PyTorch model (checked in
``tests/test_openvino.py``): :data:`OPENVINO_TOLERANCE`. Detections are compared as sets at
fp32 only: in bf16 or int8 the boxes near a score or IoU cut differ, as in PyTorch's own bf16.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .batched_detector import BatchedDetector, resize_for_graph
from .batched_export import export_batched_detector_onnx
from .detector_export import torchvision_detector_types
from .int8 import INT8_TOLERANCE
from .openvino_files import require_openvino
from .signal_stack import keep_signal_stack
from .task_export import export_task_onnx

__all__ = [
    "OPENVINO_PRECISIONS",
    "OPENVINO_TOLERANCE",
    "OpenVINOModule",
    "compile_openvino",
    "openvino_config",
    "quantize_openvino",
    "require_openvino",
]

OPENVINO_PRECISIONS = ("fp32", "bf16", "default", "int8")
#: Documented bound on ``max|y - y_ref| / max|y_ref|`` per output vs the fp32 PyTorch model.
#: ``int8``: the bound of our own int8 (:data:`~.int8.INT8_TOLERANCE`'s ``relative_error``).
OPENVINO_TOLERANCE: dict[str, float] = {
    "fp32": 1e-4,
    "bf16": 5e-2,
    "default": 5e-2,
    "int8": INT8_TOLERANCE["relative_error"],
}
_HINTS = {"fp32": "f32", "bf16": "bf16"}


def openvino_config(precision: str, threads: int | None = None) -> dict[str, Any]:
    """The CPU plugin's configuration for ``precision`` (see the module docstring) and ``threads``
    (default: ``torch.get_num_threads()``, so both runtimes use the same cores)."""
    if precision not in OPENVINO_PRECISIONS:
        raise ValueError(f"OpenVINO precision must be one of {OPENVINO_PRECISIONS}, got {precision!r}")
    config: dict[str, Any] = {"INFERENCE_NUM_THREADS": int(threads or torch.get_num_threads())}
    if precision in _HINTS:
        config["INFERENCE_PRECISION_HINT"] = _HINTS[precision]
    return config


def compile_openvino(model: Any, precision: str = "fp32", threads: int | None = None) -> Any:
    """``model`` (an ``openvino.Model`` or a path OpenVINO reads: ``.onnx``, ``.xml``) compiled for
    the CPU in ``precision`` (``int8`` means an already quantised model: compiled as ``default``)."""
    ov = require_openvino()
    core = ov.Core()
    if isinstance(model, (str, os.PathLike)):
        model = core.read_model(str(model))
    with keep_signal_stack():  # OpenVINO leaves the thread a signal stack it later unmaps (signal_stack.py)
        return core.compile_model(
            model, "CPU", openvino_config("default" if precision == "int8" else precision, threads)
        )


def quantize_openvino(model: Any, samples: Sequence[np.ndarray]) -> Any:
    """``model`` (``openvino.Model`` with one input) quantised to int8 by NNCF's post-training
    quantisation (default preset: symmetric weights, activations per tensor) on ``samples``,
    each an array the model takes; all of them are used (``subset_size``)."""
    import nncf

    if not samples:
        raise ValueError("int8 with OpenVINO needs calibration samples, got none")
    with keep_signal_stack():  # NNCF compiles with OpenVINO (signal_stack.py)
        return nncf.quantize(model, nncf.Dataset(list(samples)), subset_size=len(samples))


def _numpy(t: Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().float().cpu().numpy())


class OpenVINOModule(nn.Module):
    """The PyTorch model's call interface, run by OpenVINO; made by
    ``optimize_for_inference(..., runtime="openvino")``.

    Dense models (backbone: dict of taps; segmentation, ReID, classification: a tensor) take a
    ``(N, 3, H, W)`` tensor; the first call exports and compiles (its input is the example; batch
    and size stay dynamic). Detectors take a list of ``(3, H, W)`` images and return a list of
    ``{boxes, labels, scores}`` in the images' pixels: each image is resized as the model resizes
    it, and the images of one resized size go through one batched graph
    (:class:`~.batched_detector.BatchedDetector`: post-processing inside), made on the first call
    with that size (NNCF quantises this graph; it cannot build its graph of the one-image
    export). Outputs are float32 CPU tensors (labels int64); the wrapped model's attributes are
    reachable, like :class:`~.inference.InferenceModule`.
    """

    def __init__(
        self, model: nn.Module, precision: str, calibration: Iterable[Any] | None = None, threads: int | None = None
    ) -> None:
        super().__init__()
        if precision not in OPENVINO_PRECISIONS:
            raise ValueError(f"OpenVINO precision must be one of {OPENVINO_PRECISIONS}, got {precision!r}")
        if precision == "int8" and calibration is None:
            raise ValueError("precision='int8' with runtime='openvino' needs calibration= batches")
        require_openvino()
        self.model = model.eval()
        self.precision = precision
        self.runtime = "openvino"
        self.threads = threads
        self.calibration = list(calibration) if calibration is not None else None
        self.is_detector = isinstance(model, torchvision_detector_types())
        self.__dict__["_graphs"] = {}  # compiled graphs: "dense", or one per resized detector input size
        super().train(False)

    def _compile(self, model: nn.Module, example: Tensor, samples: Any) -> Any:
        """``model`` exported (ONNX, in a temporary folder), read, quantised on ``samples()`` for
        int8, compiled."""
        ov = require_openvino()
        with tempfile.TemporaryDirectory(prefix="vggbackbone-ov-") as tmp:
            path = Path(tmp) / "model.onnx"
            if isinstance(model, BatchedDetector):
                export_batched_detector_onnx(self.model, path, model.size, verify=False)
            else:
                export_task_onnx(model, path, example, verify=False)
            ov_model = ov.Core().read_model(str(path))
            if self.precision == "int8":
                ov_model = quantize_openvino(ov_model, samples())
            return compile_openvino(ov_model, self.precision, self.threads)

    def _run(self, compiled: Any, x: np.ndarray) -> list[Tensor]:
        result = compiled(x)
        return [torch.from_numpy(np.asarray(result[o])) for o in compiled.outputs]

    def _detect(self, images: Sequence[Tensor]) -> list[dict[str, Tensor]]:
        """Each image resized as the model resizes it, images of one resized size batched through
        that size's graph (:class:`~.batched_detector.BatchedDetector`), boxes scaled back."""
        transform = self.model.transform
        resized = [transform.resize(image.float().cpu(), None)[0] for image in images]
        out: list[dict[str, Tensor]] = [{} for _ in images]
        for size in dict.fromkeys(tuple(r.shape[-2:]) for r in resized):
            idx = [i for i, r in enumerate(resized) if tuple(r.shape[-2:]) == size]
            if size not in self._graphs:

                def samples(size: tuple[int, ...] = size) -> list[np.ndarray]:
                    return [
                        _numpy(resize_for_graph(transform.resize(image, None)[0], size)[0][None])
                        for batch in self.calibration or ()
                        for image in batch
                    ]

                self._graphs[size] = self._compile(BatchedDetector(self.model, size), None, samples)
            boxes, labels, scores, count = self._run(self._graphs[size], _numpy(torch.stack([resized[i] for i in idx])))
            for row, i in enumerate(idx):
                h, w = images[i].shape[-2:]
                scale = torch.tensor([w / size[1], h / size[0], w / size[1], h / size[0]])
                k = int(count[row])
                out[i] = {"boxes": boxes[row, :k] * scale, "labels": labels[row, :k], "scores": scores[row, :k]}
        return out

    def forward(self, x: Any) -> Any:
        if self.is_detector:
            return self._detect(x)
        if "dense" not in self._graphs:
            self._graphs["dense"] = self._compile(self.model, x, lambda: [_numpy(b) for b in self.calibration or ()])
        compiled = self._graphs["dense"]
        outs = self._run(compiled, _numpy(x))
        names = [o.get_any_name() for o in compiled.outputs]
        if names == ["output"]:
            return outs[0]
        if all(n == f"output{i}" for i, n in enumerate(names)):
            return tuple(outs)
        return dict(zip(names, outs))

    def train(self, mode: bool = True) -> OpenVINOModule:
        if mode:
            raise RuntimeError("an OpenVINOModule cannot be trained: train the original model")
        return super().train(False)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("model"), name)

    def extra_repr(self) -> str:
        return f"runtime=openvino, precision={self.precision}, compiled graphs={len(self._graphs)}"
