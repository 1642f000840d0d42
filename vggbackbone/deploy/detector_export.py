"""ONNX export of torchvision's detectors (``fasterrcnn_vgg``, ``ssd_vgg``, ``retinanet_vgg``,
``fcos_vgg``), verified with onnxruntime.

>>> from vggbackbone.models import fasterrcnn_vgg
>>> from vggbackbone.deploy import export_detector_onnx
>>> export_detector_onnx(fasterrcnn_vgg("vgg16", 21).eval(), "det.onnx", torch.rand(3, 600, 800))  # doctest: +SKIP

``torch.export`` cannot capture torchvision's batched NMS (a data-dependent shape guard in
``torchvision.ops.boxes``), so detectors go through torch's TorchScript-based exporter, the path
torchvision itself tests for its detectors. The graph takes one image ``image`` of shape
``(3, H, W)`` in ``[0, 1]`` (dynamic H, W; resizing and normalisation are inside) and returns
``boxes (n, 4)``, ``labels (n,)``, ``scores (n,)``; it is checked with onnxruntime on the
example image and on an image of another size and aspect ratio. Classic and FPN detectors both
export.

The check compares detections as a set: every PyTorch detection must have one onnxruntime
detection of the same label with score and box within tolerance, in any order
(:func:`verify_detector_onnx`). Detections whose scores are nearly equal can come out in
another order, since the two runtimes' float rounding (``1e-7``) reorders their top-k and NMS
ranks; an element-wise check then compares different boxes. FCOS, whose score is
``sqrt(sigmoid(cls) * sigmoid(centerness))``, gives many such near-ties (hundreds of candidates
within ``1e-6`` of each other on an untrained model). For the same reason a detection whose
score is within tolerance of the lowest kept score (the top-k / ``detections_per_img`` cut) may
be kept by one runtime and not the other: only such detections may go unmatched.

There is no batch axis: call the graph once per image. The tracer unrolls torchvision's
per-image loops (transform, proposal filtering, post-processing) for the number of images it
sees, so a graph traced on 2 images only runs on 2; ``torch.export``, which could keep a
symbolic batch, cannot capture the NMS (above).
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor, nn

from ..utils import atomic_path
from .onnx_export import DEFAULT_OPSET, ExportVerificationError

if TYPE_CHECKING:  # torchvision is imported where a detector is exported, not with vggbackbone
    from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN

__all__ = [
    "DETECTION_OUTPUTS",
    "DetectorForExport",
    "export_detector_onnx",
    "torchvision_detector_types",
    "verify_detector_onnx",
]

DETECTION_OUTPUTS = ("boxes", "labels", "scores")


@contextlib.contextmanager
def tracing_export_warnings() -> Iterator[None]:
    """The warnings of ``torch.onnx.export(..., dynamo=False)`` on a torchvision detector, silenced.

    The TorchScript exporter is deprecated in favour of torch.export, which cannot capture
    torchvision's NMS (see the module docstring); tracer warnings about torchvision's shape
    arithmetic are expected (torchvision is written for it).
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit")
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.onnx|torch\.nn|torchvision")
        yield


def torchvision_detector_types() -> tuple[type[nn.Module], ...]:
    """torchvision's detector classes (``GeneralizedRCNN``, ``SSD``, ``RetinaNet``, ``FCOS``): a list
    of images in, a list of ``{boxes, labels, scores}`` out in eval mode; what
    :func:`export_detector_onnx` exports."""
    from torchvision.models.detection.fcos import FCOS
    from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
    from torchvision.models.detection.retinanet import RetinaNet
    from torchvision.models.detection.ssd import SSD

    return (GeneralizedRCNN, SSD, RetinaNet, FCOS)


class DetectorForExport(nn.Module):
    """One image ``(3, H, W)`` in ``[0, 1]`` -> ``(boxes (n, 4), labels (n,), scores (n,))``."""

    def __init__(self, detector: GeneralizedRCNN) -> None:
        super().__init__()
        self.detector = detector

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        out = self.detector([image])[0]
        return out["boxes"], out["labels"], out["scores"]


def _other_image(image: Tensor) -> Tensor:
    """An image of another size and aspect ratio (transposed shape, plus a margin)."""
    c, h, w = image.shape
    return torch.rand(c, w + 16, h + 8, dtype=image.dtype)


def match_detections(
    want: Sequence[np.ndarray],
    got: Sequence[np.ndarray],
    label: object,
    where: str,
    *,
    rtol: float = 1e-4,
    atol: float = 1e-5,
    runtime: str = "onnxruntime",
) -> float:
    """Match one image's detections ``got = (boxes, labels, scores)`` to PyTorch's ``want``, as a set.

    Both have the same number; each PyTorch detection is matched to a distinct one of the same
    label whose score and box are within ``atol + rtol * max|output|`` (scores and boxes apart),
    greedily in PyTorch's order; only detections tied with the lowest kept score (within
    tolerance) may go unmatched. Raises :class:`ExportVerificationError` naming ``label``,
    ``where`` and the first detection without a match; returns the worst relative difference.
    """
    boxes, labels, scores = (np.asarray(a, dtype=np.float64 if i != 1 else np.int64) for i, a in enumerate(want))
    o_boxes, o_labels, o_scores = (np.asarray(a) for a in got)
    if len(o_boxes) != len(boxes):
        raise ExportVerificationError(
            f"{label}: {len(o_boxes)} detections in {runtime} but {len(boxes)} in PyTorch for {where}"
        )
    if not len(boxes):
        return 0.0
    worst = 0.0
    box_scale, score_scale = float(np.abs(boxes).max()), float(np.abs(scores).max())
    box_tol, score_tol = atol + rtol * box_scale, atol + rtol * score_scale
    box_diff = np.abs(boxes[:, None] - o_boxes[None]).max(-1)  # (torch, other)
    score_diff = np.abs(scores[:, None] - o_scores[None])
    ok = (box_diff <= box_tol) & (score_diff <= score_tol) & (labels[:, None] == o_labels[None])
    used = np.zeros(len(o_boxes), bool)
    unmatched = []
    for i in range(len(boxes)):
        candidates = np.flatnonzero(ok[i] & ~used)
        if not len(candidates):
            unmatched.append(i)
            continue
        j = int(candidates[np.argmin(box_diff[i, candidates])])
        used[j] = True
        worst = max(worst, box_diff[i, j] / max(box_scale, 1e-12), score_diff[i, j] / max(score_scale, 1e-12))
    # The list is cut at a score (top-k, detections_per_img): detections tied with the cut
    # within the tolerance may be kept by one runtime and not the other. Only those may miss.
    at_cut = scores[unmatched] <= scores.min() + score_tol if unmatched else np.ones(0, bool)
    others_at_cut = o_scores[~used] <= o_scores.min() + score_tol
    if not (at_cut.all() and others_at_cut.all()):
        i = unmatched[int(np.argmin(at_cut))] if not at_cut.all() else unmatched[0]
        j = int(np.argmin(np.where(used, np.inf, box_diff[i])))
        raise ExportVerificationError(
            f"{label}: PyTorch detection {i} (label {int(labels[i])}, score {scores[i]:.6g}, box "
            f"{boxes[i].tolist()}) has no {runtime} match for {where}; the nearest "
            f"unmatched one is off by {box_diff[i, j]:.3g} px, score {score_diff[i, j]:.3g} "
            f"(allowed {box_tol:.3g} px, {score_tol:.3g}; atol={atol:g}, rtol={rtol:g})"
        )
    return float(worst)


def verify_detector_onnx(
    path: str | os.PathLike[str],
    model: nn.Module,
    images: Sequence[Tensor],
    *,
    rtol: float = 1e-4,
    atol: float = 1e-5,
    name: str | os.PathLike[str] | None = None,
) -> float:
    """Run the detector graph at ``path`` with onnxruntime on each image and compare with ``model``
    (a :class:`DetectorForExport`), order-free among near-equal scores (see the module docstring).

    Both give the same number of detections; each PyTorch detection is matched to a distinct
    onnxruntime detection of the same label whose score and box coordinates are within
    ``atol + rtol * max|output|`` (scores and boxes apart), taken greedily in PyTorch's order;
    only detections tied with the lowest kept score (within tolerance) may go unmatched.
    Raises :class:`~vggbackbone.deploy.onnx_export.ExportVerificationError` naming the file (or ``name``),
    the image shape and the first detection without a match. Returns the worst relative
    difference of matched boxes and scores.
    """
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    label = name if name is not None else path
    worst = 0.0
    for x in images:
        with torch.no_grad():
            want = tuple(t.detach().float().cpu().numpy() for t in model(x))
        got = session.run(None, {"image": x.detach().cpu().numpy()})
        worst = max(worst, match_detections(want, got, f"{label}", f"image {tuple(x.shape)}", rtol=rtol, atol=atol))
    return float(worst)


def export_detector_onnx(
    model: GeneralizedRCNN,
    path: str | os.PathLike[str],
    example_image: Tensor,
    opset: int = DEFAULT_OPSET,
    *,
    verify: bool = True,
    verify_images: Sequence[Tensor] | None = None,
    rtol: float = 1e-4,
    atol: float = 1e-5,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Export a torchvision detector (``fasterrcnn_vgg``, ``ssd_vgg``...) to ONNX at ``path``, atomically.

    Args:
        model: the detector; exported in eval mode (its mode is restored after).
        example_image: ``(3, H, W)`` image the graph is traced with.
        opset: ONNX opset (>= 11 for torchvision's detection ops).
        verify: check the file with onnxruntime (same number of detections, each matched to one
            of the same label with box and score within ``atol + rtol * max|output|``, in any
            order: :func:`verify_detector_onnx`) before renaming it into place.
        verify_images: images to check on; default ``example_image`` and one of another size.
        metadata: ONNX ``metadata_props`` to store (e.g. the class names of a task model).

    The file holds the whole model (no external data): fine for every VGG detector (< 2 GiB).
    """
    path = Path(path)
    if example_image.dim() != 3:
        raise ValueError(f"example_image must be one (3, H, W) image, got shape {tuple(example_image.shape)}")
    wrapper = DetectorForExport(model).eval()  # the exporter restores the wrapper's mode afterwards
    was_training = model.training
    model.eval()
    try:
        with atomic_path(path) as tmp, torch.no_grad(), tracing_export_warnings():
            torch.onnx.export(
                wrapper,
                (example_image,),
                str(tmp),
                dynamo=False,
                opset_version=opset,
                input_names=["image"],
                output_names=list(DETECTION_OUTPUTS),
                dynamic_axes={"image": {1: "height", 2: "width"}, **{k: {0: "detections"} for k in DETECTION_OUTPUTS}},
            )
            if metadata:  # the TorchScript exporter takes none: added to the written file
                import onnx

                proto = onnx.load(str(tmp))
                onnx.helper.set_model_props(proto, {**{p.key: p.value for p in proto.metadata_props}, **metadata})
                onnx.save(proto, str(tmp))
            if verify:
                images = [example_image, _other_image(example_image)] if verify_images is None else list(verify_images)
                verify_detector_onnx(tmp, wrapper, images, rtol=rtol, atol=atol, name=path)
    finally:
        model.train(was_training)
    return path
