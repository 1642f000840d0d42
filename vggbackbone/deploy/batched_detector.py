"""A torchvision detector as one batched graph: ``(B, 3, H, W)`` images of one fixed size in,
detections padded to ``max_detections`` per image out, post-processing inside.

>>> from vggbackbone.models import fasterrcnn_vgg
>>> from vggbackbone.deploy import BatchedDetector
>>> batched = BatchedDetector(fasterrcnn_vgg("vgg16", 21).eval(), size=(600, 800))  # doctest: +SKIP
>>> boxes, labels, scores, count = batched(torch.rand(5, 3, 600, 800))            # doctest: +SKIP

What the graph does, and what is left to the caller:

* **Resize: before the graph.** The size ``(H, W)`` is fixed when the graph is made, and must
  be a size the model's own resize keeps unchanged (Faster R-CNN, RetinaNet, FCOS: shorter side
  ``min_size`` and longer side at most ``max_size``, e.g. 600 x 800 for ``min_size=600``; SSD:
  its ``size`` x ``size``); any other size is refused, naming the one the model would resize
  to. Bring each image to ``(H, W)`` first (:func:`resize_for_graph`: torchvision's bilinear
  resize, no antialiasing, as the model's transform does) and scale the boxes back by the
  returned factors. Boxes come out in the pixels of the graph's input.
* **Inside the graph:** normalisation (the model's ``image_mean``/``image_std``), zero padding
  to the model's ``size_divisible``, backbone, heads, box decoding, the family's own
  score threshold, per-level / per-class top-k, clipping, small-box removal and NMS (one
  :func:`torchvision.ops.nms` over the batch, :mod:`.batched_nms`), and the best
  ``max_detections`` per image.
* **Anchors** depend on the size only, so they are computed once when the graph is made and
  stored as constants.

Outputs, in decreasing score per image: ``boxes (B, D, 4)`` xyxy float32, ``labels (B, D)``
int64, ``scores (B, D)`` float32, ``num_detections (B,)`` int64; rows past
``num_detections[i]`` are zero. On the same resized images the detections of each image are
those of the torchvision model (as a set: near-equal scores can come out in another order).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .batched_nms import nms_per_image, pad_per_image

__all__ = ["BATCHED_OUTPUTS", "BatchedDetector", "resize_for_graph"]

BATCHED_OUTPUTS = ("boxes", "labels", "scores", "num_detections")


def resize_for_graph(image: Tensor, size: tuple[int, int]) -> tuple[Tensor, tuple[float, float]]:
    """``image (3, h, w)`` resized to ``size = (H, W)`` as torchvision's detector transform resizes
    (bilinear, ``align_corners=False``, no antialiasing); returns it and the ``(y, x)`` factors that
    map the graph's boxes back to the image (``box * (x, y, x, y)``)."""
    h, w = image.shape[-2:]
    out = F.interpolate(image[None].float(), size=size, mode="bilinear", align_corners=False)[0]
    return out, (h / size[0], w / size[1])


def _kept_size(model: nn.Module, size: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
    """What the model's transform makes of one ``size`` image: (resized size, padded size)."""
    with torch.no_grad():
        images, _ = model.transform([torch.zeros(3, *size)])
    return tuple(images.image_sizes[0]), tuple(images.tensors.shape[-2:])  # type: ignore[return-value]


class BatchedDetector(nn.Module):
    """One graph for a batch of images of one size: see the module docstring.

    Args:
        model: a torchvision ``FasterRCNN`` (classic or FPN), ``SSD``, ``RetinaNet`` or ``FCOS``
            (any of ``vggbackbone.models``' detectors); used in eval mode, weights shared.
        size: ``(H, W)`` of the graph's input; must be kept unchanged by the model's resize.
        max_detections: detections per image (default: the model's ``detections_per_img``).
    """

    def __init__(self, model: nn.Module, size: tuple[int, int], max_detections: int | None = None) -> None:
        super().__init__()
        from torchvision.models.detection.fcos import FCOS
        from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
        from torchvision.models.detection.retinanet import RetinaNet
        from torchvision.models.detection.ssd import SSD

        kinds = ((GeneralizedRCNN, "rcnn"), (SSD, "ssd"), (RetinaNet, "retinanet"), (FCOS, "fcos"))
        kind = next((k for cls, k in kinds if isinstance(model, cls)), None)
        if kind is None:
            raise TypeError(
                f"BatchedDetector takes torchvision's FasterRCNN, SSD, RetinaNet or FCOS, got {type(model).__name__}"
            )
        model.eval()
        self.model, self.kind = model, kind
        self.size = (int(size[0]), int(size[1]))
        resized, padded = _kept_size(model, self.size)
        if resized != self.size:
            raise ValueError(
                f"the model resizes a {self.size[0]}x{self.size[1]} image to {resized[0]}x{resized[1]}: export at "
                f"{resized[0]}x{resized[1]} (or change the model's min_size/max_size) so that the graph's input "
                "is what the model itself sees"
            )
        self.pad = (0, padded[1] - self.size[1], 0, padded[0] - self.size[0])
        heads = model.roi_heads if kind == "rcnn" else model
        self.max_detections = int(max_detections or heads.detections_per_img)
        t = model.transform
        self.register_buffer("mean", torch.tensor(t.image_mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(t.image_std).view(1, -1, 1, 1), persistent=False)
        anchors, self.per_level = self._anchors(padded)
        self.register_buffer("anchors", anchors, persistent=False)

    def _anchors(self, padded: tuple[int, int]) -> tuple[Tensor, list[int]]:
        """The anchors of one image of the graph's size ``(A, 4)``, and their count per level."""
        from torchvision.models.detection.image_list import ImageList
        from torchvision.ops.poolers import _setup_scales

        m = self.model
        with torch.no_grad():
            x = torch.zeros(1, 3, *padded)
            named = m.backbone(x)
            features = list(named.values()) if isinstance(named, dict) else [named]
            pooler = m.roi_heads.box_roi_pool if self.kind == "rcnn" else None
            if hasattr(pooler, "featmap_names") and pooler.scales is None:  # set on the first call otherwise
                pooler.scales, pooler.map_levels = _setup_scales(
                    [named[k] for k in pooler.featmap_names],
                    [self.size],
                    pooler.canonical_scale,
                    pooler.canonical_level,
                )
            generator = m.rpn.anchor_generator if self.kind == "rcnn" else m.anchor_generator
            anchors = generator(ImageList(x, [self.size]), features)[0]
            counts = generator.num_anchors_per_location()
            per_level = [int(f.shape[-2] * f.shape[-1]) * int(n) for f, n in zip(features, counts)]
        return anchors, per_level

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``images (B, 3, H, W)`` in ``[0, 1]`` -> ``boxes (B, D, 4)``, ``labels (B, D)``, ``scores
        (B, D)``, ``num_detections (B,)``."""
        x = F.pad((images - self.mean) / self.std, self.pad)
        batch_ids = torch.arange(images.shape[0], device=images.device)
        features = self.model.backbone(x)
        if self.kind == "rcnn":
            boxes, scores, labels, image = self._rcnn(features, batch_ids)
        else:
            features = list(features.values()) if isinstance(features, dict) else [features]
            boxes, scores, labels, image = getattr(self, f"_{self.kind}")(features, batch_ids)
        nms_thresh = self.model.roi_heads.nms_thresh if self.kind == "rcnn" else self.model.nms_thresh
        keep, kept_image, rank = nms_per_image(
            boxes, scores, labels, image, batch_ids, iou_threshold=nms_thresh, size=self.size, top=self.max_detections
        )
        (out_boxes, out_labels, out_scores), count = pad_per_image(
            [boxes[keep], labels[keep], scores[keep]], kept_image, rank, batch_ids, self.max_detections
        )
        return out_boxes, out_labels, out_scores, count

    # -- the families' candidates: (boxes (N, 4) clipped, scores (N,), labels (N,), image (N,)) --

    def _clip(self, boxes: Tensor) -> Tensor:
        h, w = self.size
        return torch.stack(
            [
                boxes[..., 0].clamp(0, w),
                boxes[..., 1].clamp(0, h),
                boxes[..., 2].clamp(0, w),
                boxes[..., 3].clamp(0, h),
            ],
            -1,
        )

    def _level_topk(self, scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """Top ``k`` (or all) of each level's ``(B, per_level * C)`` slice of ``scores (B, A * C)``:
        the scores and their flat indices, ``(B, sum k_l)``."""
        per_class = scores.shape[1] // sum(self.per_level)
        outs, idxs, start = [], [], 0
        for n in self.per_level:
            n *= per_class
            top, idx = scores[:, start : start + n].topk(min(k, n), dim=1)
            outs.append(top)
            idxs.append(idx + start)
            start += n
        return torch.cat(outs, 1), torch.cat(idxs, 1)

    def _dense(self, scores: Tensor, regression: Tensor, batch_ids: Tensor, decode) -> tuple[Tensor, ...]:
        """RetinaNet / FCOS: ``scores (B, A * C)`` and ``regression (B, A, 4)`` to candidates (top-k
        per level above ``score_thresh``; torchvision thresholds then takes the top-k, the same set)."""
        m = self.model
        num_classes = scores.shape[1] // len(self.anchors)
        top, idx = self._level_topk(scores, m.topk_candidates)
        anchor_idx, labels = idx // num_classes, idx % num_classes
        reg = regression.gather(1, anchor_idx[..., None].expand(-1, -1, 4))
        boxes = self._clip(decode(reg.reshape(-1, 4), self.anchors[anchor_idx.reshape(-1)]))
        image = batch_ids[:, None].expand_as(top).reshape(-1)
        valid = torch.where(top.reshape(-1) > m.score_thresh)[0]
        return boxes[valid], top.reshape(-1)[valid], labels.reshape(-1)[valid], image[valid]

    def _retinanet(self, features: list[Tensor], batch_ids: Tensor) -> tuple[Tensor, ...]:
        out = self.model.head(features)
        scores = torch.sigmoid(out["cls_logits"]).flatten(1)
        return self._dense(scores, out["bbox_regression"], batch_ids, self.model.box_coder.decode_single)

    def _fcos(self, features: list[Tensor], batch_ids: Tensor) -> tuple[Tensor, ...]:
        out = self.model.head(features)
        scores = torch.sqrt(torch.sigmoid(out["cls_logits"]) * torch.sigmoid(out["bbox_ctrness"])).flatten(1)
        return self._dense(scores, out["bbox_regression"], batch_ids, self.model.box_coder.decode)

    def _ssd(self, features: list[Tensor], batch_ids: Tensor) -> tuple[Tensor, ...]:
        """SSD: softmax over classes, per class (background dropped) the top ``topk_candidates`` anchors."""
        m = self.model
        out = m.head(features)
        num_anchors = len(self.anchors)
        boxes = m.box_coder.decode_single(
            out["bbox_regression"].reshape(-1, 4), self.anchors.repeat(batch_ids.shape[0], 1)
        )
        boxes = self._clip(boxes).reshape(-1, num_anchors, 4)
        probs = F.softmax(out["cls_logits"], dim=-1)[..., 1:].transpose(1, 2)  # (B, C-1, A)
        top, idx = probs.topk(min(m.topk_candidates, num_anchors), dim=2)  # (B, C-1, k)
        labels = torch.arange(1, probs.shape[1] + 1, device=probs.device)[None, :, None].expand_as(idx)
        sel = boxes.gather(1, idx.reshape(idx.shape[0], -1, 1).expand(-1, -1, 4))  # (B, (C-1) k, 4)
        image = batch_ids[:, None, None].expand_as(idx).reshape(-1)
        valid = torch.where(top.reshape(-1) > m.score_thresh)[0]
        return sel.reshape(-1, 4)[valid], top.reshape(-1)[valid], labels.reshape(-1)[valid], image[valid]

    def _proposals(self, features: dict[str, Tensor], batch_ids: Tensor) -> tuple[Tensor, Tensor]:
        """Faster R-CNN's RPN, batched: proposals ``(P, 4)`` and their image ``(P,)``."""
        from torchvision.models.detection.rpn import concat_box_prediction_layers

        rpn = self.model.rpn
        objectness, deltas = rpn.head(list(features.values()))
        objectness, deltas = concat_box_prediction_layers(objectness, deltas)
        batch = batch_ids.shape[0]
        proposals = rpn.box_coder.decode_single(
            deltas.reshape(batch, -1, 4).reshape(-1, 4), self.anchors.repeat(batch, 1)
        )
        objectness = objectness.reshape(batch, -1)
        top_idx = rpn._get_top_n_idx(objectness, self.per_level)  # (B, k): per level, as torchvision
        levels = torch.cat([torch.full((n,), i, dtype=torch.int64) for i, n in enumerate(self.per_level)])
        scores = torch.sigmoid(objectness.gather(1, top_idx)).reshape(-1)
        boxes = self._clip(
            proposals.reshape(batch, -1, 4).gather(1, top_idx[..., None].expand(-1, -1, 4)).reshape(-1, 4)
        )
        level = levels.to(top_idx.device)[top_idx].reshape(-1)
        image = batch_ids[:, None].expand_as(top_idx).reshape(-1)
        w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        valid = torch.where((w >= rpn.min_size) & (h >= rpn.min_size) & (scores >= rpn.score_thresh))[0]
        boxes, scores, level, image = boxes[valid], scores[valid], level[valid], image[valid]
        keep, kept_image, _ = nms_per_image(
            boxes,
            scores,
            level,
            image,
            batch_ids,
            iou_threshold=rpn.nms_thresh,
            size=self.size,
            top=rpn.post_nms_top_n(),
        )
        return boxes[keep], kept_image

    def _pool(self, features: dict[str, Tensor], rois: Tensor) -> Tensor:
        """The RoI pooler of the model on ``rois (P, 5)`` (image index, xyxy) of many images."""
        from torchvision.ops import MultiScaleRoIAlign, roi_align

        pooler = self.model.roi_heads.box_roi_pool
        if not isinstance(pooler, MultiScaleRoIAlign):  # RoIPoolSingleLevel: Fast R-CNN's RoI max-pooling
            return pooler.pool(features[pooler.featmap_name], rois)
        feats = [features[k] for k in pooler.featmap_names]
        if len(feats) == 1:
            return roi_align(feats[0], rois, pooler.output_size, pooler.scales[0], pooler.sampling_ratio)
        levels = pooler.map_levels([rois[:, 1:]])
        result = feats[0].new_zeros((rois.shape[0], feats[0].shape[1], *tuple(pooler.output_size)))
        for level, (feat, scale) in enumerate(zip(feats, pooler.scales)):
            idx = torch.where(levels == level)[0]
            pooled = roi_align(feat, rois[idx], pooler.output_size, scale, pooler.sampling_ratio)
            result = result.index_put((idx,), pooled)
        return result

    def _rcnn(self, features: dict[str, Tensor], batch_ids: Tensor) -> tuple[Tensor, ...]:
        """Faster R-CNN: proposals, RoI pooling, box head, per-class boxes above ``score_thresh``."""
        heads = self.model.roi_heads
        proposals, image = self._proposals(features, batch_ids)
        rois = torch.cat([image[:, None].to(proposals.dtype), proposals], 1)
        logits, regression = heads.box_predictor(heads.box_head(self._pool(features, rois)))
        num_classes = logits.shape[-1]
        boxes = heads.box_coder.decode_single(regression, proposals).reshape(-1, num_classes, 4)
        boxes = self._clip(boxes[:, 1:]).reshape(-1, 4)
        scores = F.softmax(logits, -1)[:, 1:].reshape(-1)
        labels = torch.arange(1, num_classes, device=logits.device).repeat(proposals.shape[0])
        image = image[:, None].expand(-1, num_classes - 1).reshape(-1)
        w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        valid = torch.where((scores > heads.score_thresh) & (w >= 1e-2) & (h >= 1e-2))[0]
        return boxes[valid], scores[valid], labels[valid], image[valid]
