"""ONNX export of a detector as one batched graph (:class:`~.batched_detector.BatchedDetector`),
verified with onnxruntime at several batch sizes against the torchvision model.

>>> from vggbackbone.models import fasterrcnn_vgg
>>> from vggbackbone.deploy import export_batched_detector_onnx
>>> export_batched_detector_onnx(fasterrcnn_vgg("vgg16", 21), "det.onnx", size=(600, 800))  # doctest: +SKIP

The graph's input ``images`` is ``(batch, 3, H, W)`` with a dynamic batch and the size fixed at
export (resize before the graph: :func:`~.batched_detector.resize_for_graph`); its outputs are
``boxes (batch, D, 4)``, ``labels (batch, D)``, ``scores (batch, D)``, ``num_detections
(batch,)`` (see :mod:`.batched_detector`). It goes through torch's TorchScript-based exporter,
like the one-image detector export (:mod:`.detector_export`): ``torch.export`` cannot capture
torchvision's NMS. Unlike that export, nothing is unrolled per image: the batch is a dimension
of every tensor, so a graph traced on two images runs on any number.

The check runs the graph at batch 1, 2 and 5 (by default) and compares each image's first
``num_detections`` rows with what the torchvision model returns for that image, as a set
(:func:`~.detector_export.match_detections`: same count, each detection matched to one of the
same label with box and score within ``atol + rtol * max|output|``, ties at the top-k cut
allowed).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from ..utils import atomic_path
from .batched_detector import BATCHED_OUTPUTS, BatchedDetector
from .detector_export import match_detections, tracing_export_warnings
from .onnx_export import DEFAULT_OPSET, ExportVerificationError

__all__ = ["VERIFY_BATCH_SIZES", "export_batched_detector_onnx", "verify_batched_detector"]

#: The batch sizes an exported batched graph is checked at.
VERIFY_BATCH_SIZES = (1, 2, 5)


def onnxruntime_runner(path: str | os.PathLike[str]) -> Callable[[np.ndarray], list[np.ndarray]]:
    """``images -> [boxes, labels, scores, num_detections]`` through onnxruntime (CPU)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda images: session.run(None, {"images": images})


def verify_batched_detector(
    run: Callable[[np.ndarray], Sequence[np.ndarray]],
    model: nn.Module,
    images: Tensor,
    *,
    rtol: float = 1e-4,
    atol: float = 1e-5,
    name: object = "graph",
    runtime: str = "onnxruntime",
) -> float:
    """Compare a batched graph's outputs on ``images (B, 3, H, W)`` with the torchvision detector
    ``model`` called on the same images, image by image, as sets (see the module docstring).

    ``run``: the graph (``images`` array -> its four outputs). Raises
    :class:`~.onnx_export.ExportVerificationError` naming ``name``, the batch size and the image;
    returns the worst relative difference of matched boxes and scores.
    """
    boxes, labels, scores, count = (np.asarray(a) for a in run(images.detach().cpu().numpy()))
    with torch.no_grad():
        want = model(list(images))
    if len(count) != len(images):
        raise ExportVerificationError(f"{name}: {len(count)} counts for a batch of {len(images)} in {runtime}")
    worst = 0.0
    for i, ref in enumerate(want):
        k = int(count[i])
        if boxes[i, k:].any() or scores[i, k:].any():
            raise ExportVerificationError(f"{name}: rows past num_detections={k} are not zero for image {i}")
        expected = tuple(
            ref[key].float().numpy() if key != "labels" else ref[key].numpy() for key in ("boxes", "labels", "scores")
        )
        got = (boxes[i, :k], labels[i, :k], scores[i, :k])
        where = f"image {i} of a batch of {len(images)}"
        worst = max(worst, match_detections(expected, got, name, where, rtol=rtol, atol=atol, runtime=runtime))
    return worst


def _trace_to_onnx(wrapper: nn.Module, example: Tensor, path: Path, opset: int) -> None:
    with torch.no_grad(), tracing_export_warnings():
        torch.onnx.export(
            wrapper,
            (example,),
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=["images"],
            output_names=list(BATCHED_OUTPUTS),
            dynamic_axes={name: {0: "batch"} for name in ("images", *BATCHED_OUTPUTS)},
        )


def export_batched_detector_onnx(
    model: nn.Module,
    path: str | os.PathLike[str],
    size: tuple[int, int],
    opset: int = DEFAULT_OPSET,
    *,
    max_detections: int | None = None,
    verify: bool = True,
    verify_batch_sizes: Sequence[int] = VERIFY_BATCH_SIZES,
    rtol: float = 1e-4,
    atol: float = 1e-5,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Export a torchvision detector as one batched graph to ``path``, atomically.

    Args:
        model: ``FasterRCNN`` (classic or FPN), ``SSD``, ``RetinaNet`` or ``FCOS``; exported in
            eval mode (its mode is restored after).
        size: ``(H, W)`` of the graph's input, a size the model's resize keeps (else
            ``ValueError`` naming the size it resizes to).
        max_detections: rows per image (default: the model's ``detections_per_img``).
        verify: before the rename, run the file with onnxruntime on random images at each of
            ``verify_batch_sizes`` and compare with the model (:func:`verify_batched_detector`).
        metadata: ONNX ``metadata_props`` to add (the size is always written: ``input_size``).
    """
    path = Path(path)
    was_training = model.training
    wrapper = BatchedDetector(model, size, max_detections).eval()
    generator = torch.Generator().manual_seed(0)
    try:
        with atomic_path(path) as tmp:
            _trace_to_onnx(wrapper, torch.rand(2, 3, *wrapper.size, generator=generator), tmp, opset)
            import onnx

            proto = onnx.load(str(tmp))
            props = {p.key: p.value for p in proto.metadata_props}
            props.update({"producer": "vggbackbone", "input_size": f"{size[0]}x{size[1]}", **dict(metadata or {})})
            onnx.helper.set_model_props(proto, props)
            onnx.save(proto, str(tmp))
            if verify:
                run = onnxruntime_runner(tmp)
                for batch in verify_batch_sizes:
                    images = torch.rand(batch, 3, *wrapper.size, generator=generator)
                    verify_batched_detector(run, model, images, rtol=rtol, atol=atol, name=path)
    finally:
        model.train(was_training)
    return path
