"""Test-time augmentation of every task (``model.tta`` in the task YAML, off by default): one function per task kind.

Each works image by image (or on the batch a process holds), so evaluation over several
processes gathers and counts exactly what it does without TTA. Used by ``validate``/``test``
(also the validation during ``fit``), ``predict`` and ReID's ``extract``; ``export`` writes the
plain model. What is averaged, and after whom:

* segmentation (:func:`segment_logits`): every scale of ``scales`` (times ``inference_scale``),
  each also flipped with ``hflip``; the logits of each view, flipped back and resized to the
  full image, become softmax probabilities that are averaged, as mmseg's aug-test does
  (``SegTTAModel.merge_preds``); the log of the average is returned as the logits (its
  argmax is the prediction, and the evaluation's cross-entropy is that of the averaged probabilities);
* detection (:func:`detect_outputs`): the image and its horizontal flip; the flipped pass's
  boxes are flipped back (``x -> W - x``, exact) and the detections of both passes merged by
  per-class NMS (:func:`torchvision.ops.batched_nms`) at the model's own NMS IoU and limited to
  its detections per image, as detectron2's ``GeneralizedRCNNWithTTA`` does for flips;
* ReID (:func:`reid_embeddings`): the mean of the embeddings of the image and of its flip
  (fast-reid's ``TEST.FLIP``), L2-normalised again when the model normalises its embeddings;
* classification (:func:`classify_logits`): the mean of the logits of the views (``hflip``: the
  image and its flip; ``ten_crop``: torchvision's ten crops of that size, or its five crops
  without ``hflip``), as torchvision's ``TenCrop`` example averages its outputs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import batched_nms
from torchvision.transforms.v2 import functional as TF

__all__ = ["TTAConfig", "classify_logits", "detect_outputs", "reid_embeddings", "segment_logits", "tta_config"]

TaskKind = Literal["segment", "detect", "reid", "classify"]

#: the options each task kind reads (``hflip`` is every task's)
_OWN_FIELDS: dict[str, tuple[str, ...]] = {
    "segment": ("hflip", "scales"),
    "detect": ("hflip", "nms_iou"),
    "reid": ("hflip",),
    "classify": ("hflip", "ten_crop"),
}


@dataclass
class TTAConfig:
    """``model.tta``: test-time augmentation (``null``, the default: none).

    Args:
        hflip: add the horizontally flipped image (every task).
        scales: segmentation: image scales (relative to ``inference_scale``) whose predictions
            are averaged, e.g. ``[0.75, 1.0, 1.25]``.
        ten_crop: classification: the crop size (pixels) of torchvision's ten crops of the
            evaluation image (``null``: the whole image).
        nms_iou: detection: the IoU of the per-class NMS that merges both passes (``null``: the
            model's own NMS threshold).
    """

    hflip: bool = True
    scales: list[float] = field(default_factory=lambda: [1.0])
    ten_crop: int | None = None
    nms_iou: float | None = None

    def __post_init__(self) -> None:
        self.scales = [float(s) for s in self.scales]
        if not self.scales or any(s <= 0 for s in self.scales):
            raise ValueError(f"model.tta.scales must be positive numbers, got {self.scales}")
        if self.ten_crop is not None and self.ten_crop < 1:
            raise ValueError(f"model.tta.ten_crop must be a crop size >= 1, got {self.ten_crop}")
        if self.nms_iou is not None and not 0.0 < self.nms_iou <= 1.0:
            raise ValueError(f"model.tta.nms_iou must be in (0, 1], got {self.nms_iou}")


# Hyper-parameters of a task built in Python hold this dataclass itself: allow it in
# torch.load(weights_only=True), which every checkpoint load here uses.
torch.serialization.add_safe_globals([TTAConfig])


def tta_config(value: TTAConfig | Mapping[str, Any] | None, kind: TaskKind) -> TTAConfig | None:
    """``model.tta`` as a :class:`TTAConfig`, or ``None`` when off; an option another task kind
    reads (``scales`` for detection...) set away from its default is an error naming it."""
    if value is None:
        return None
    config = value if isinstance(value, TTAConfig) else TTAConfig(**dict(value))
    default = TTAConfig()
    foreign = [
        f.name
        for f in dataclasses.fields(TTAConfig)
        if f.name not in _OWN_FIELDS[kind] and getattr(config, f.name) != getattr(default, f.name)
    ]
    if foreign:
        raise ValueError(
            f"model.tta: {', '.join(foreign)} not used by {kind} (its options: {', '.join(_OWN_FIELDS[kind])})"
        )
    return config


def smallest_scale(config: TTAConfig | None) -> float:
    """The smallest scale segmentation TTA runs the network at (1 without TTA)."""
    return min(config.scales) if config is not None else 1.0


def segment_logits(logits_at: Callable[[Tensor, float], Tensor], image: Tensor, config: TTAConfig | None) -> Tensor:
    """Logits ``(N, K, H, W)`` of ``image`` ``(N, 3, H, W)``.

    ``logits_at(x, scale)``: the model's logits of ``x`` at ``scale``, resized to ``x``'s full
    ``H x W`` (whole image or sliding window). Without ``config``: ``logits_at(image, 1.0)``.
    """
    if config is None:
        return logits_at(image, 1.0)
    total: Tensor | None = None
    views = 0
    for scale in config.scales:
        for flip in (False, True) if config.hflip else (False,):
            logits = logits_at(image.flip(-1) if flip else image, scale)
            probs = (logits.flip(-1) if flip else logits).float().softmax(1)
            total = probs if total is None else total + probs
            views += 1
    assert total is not None
    return (total / views).log()


def classify_logits(model: nn.Module, images: Tensor, config: TTAConfig | None) -> Tensor:
    """Logits ``(N, K)`` of ``images`` ``(N, C, H, W)``: the mean over the views of ``config``."""
    if config is None:
        return model(images)
    if config.ten_crop is not None:
        size = [config.ten_crop, config.ten_crop]
        h, w = images.shape[-2:]
        if config.ten_crop > min(h, w):
            raise ValueError(f"model.tta.ten_crop {config.ten_crop} is larger than the evaluation images ({h}x{w})")
        views = list(TF.ten_crop(images, size) if config.hflip else TF.five_crop(images, size))
    else:
        views = [images, images.flip(-1)] if config.hflip else [images]
    return torch.stack([model(v).float() for v in views]).mean(0)


def reid_embeddings(model: nn.Module, images: Tensor, config: TTAConfig | None, *, normalize: bool) -> Tensor:
    """Embeddings ``(N, D)`` of ``images`` ``(N, 3, H, W)``; with ``hflip``, the mean of the image's and
    its flip's, L2-normalised again when ``normalize`` (the model's embeddings are unit vectors)."""
    emb = model(images)
    if config is None or not config.hflip:
        return emb
    mean = (emb.float() + model(images.flip(-1)).float()) / 2
    return F.normalize(mean, dim=1) if normalize else mean


def unflip_boxes(boxes: Tensor, width: int) -> Tensor:
    """Boxes ``(M, 4)`` ``x1, y1, x2, y2`` of a horizontally flipped image of ``width``, in the original image."""
    out = boxes.clone()
    out[:, 0] = width - boxes[:, 2]
    out[:, 2] = width - boxes[:, 0]
    return out


def model_nms(model: nn.Module) -> tuple[float, int]:
    """``(NMS IoU, detections per image)`` of a torchvision detector (Faster R-CNN's are its ``roi_heads``')."""
    owner = getattr(model, "roi_heads", model)
    return float(getattr(owner, "nms_thresh", 0.5)), int(getattr(owner, "detections_per_img", 100))


def detect_outputs(
    model: nn.Module, images: Sequence[Tensor], config: TTAConfig | None, nms: tuple[float, int] | None = None
) -> list[dict[str, Tensor]]:
    """Detections (``boxes`` in the image's pixels, ``scores``, ``labels``) of each ``(3, H, W)`` image.

    With ``hflip``, both passes merged (module doc); ``nms``: ``(IoU, detections per image)``,
    default :func:`model_nms` of ``model`` (``config.nms_iou`` wins over its IoU).
    """
    outputs = model(list(images))
    if config is None or not config.hflip:
        return outputs
    iou, limit = nms if nms is not None else model_nms(model)
    iou = config.nms_iou if config.nms_iou is not None else iou
    flipped = model([im.flip(-1) for im in images])
    merged = []
    for image, a, b in zip(images, outputs, flipped):
        boxes = torch.cat([a["boxes"], unflip_boxes(b["boxes"], image.shape[-1])])
        scores = torch.cat([a["scores"], b["scores"]])
        labels = torch.cat([a["labels"], b["labels"]])
        keep = batched_nms(boxes, scores, labels, iou)[:limit]  # sorted by decreasing score
        merged.append({"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]})
    return merged
