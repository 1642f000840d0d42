"""Faster R-CNN training as py-faster-rcnn does it, on torchvision's ``FasterRCNN``.

Two details of the reference training (github.com/rbgirshick/py-faster-rcnn) that torchvision's
``RegionProposalNetwork`` and ``RoIHeads`` fix otherwise, and that :func:`fasterrcnn_vgg` offers as
options (``allowed_border``, ``rpn_loss_beta``, ``box_loss_beta``):

* **Anchors crossing the image border.** ``lib/rpn/anchor_target_layer.py`` keeps for RPN
  training only the anchors inside the image by its ``allowed_border`` (0 in every prototxt): the
  IoU matching, the "best anchor of each object" rule and the sampling of 256 anchors all run on
  those; the others are "don't care". torchvision's anchor matcher takes every anchor and has no
  such option, and ``assign_targets_to_anchors`` is not given the image sizes, so
  :class:`BorderRPN` keeps them from ``forward`` and runs torchvision's own matching on the
  anchors inside (labels -1 elsewhere).
* **Smooth-L1 betas.** torchvision uses ``beta = 1/9`` in both losses. py-faster-rcnn's
  ``SmoothL1Loss`` layers use ``sigma = 3`` in the RPN (``rpn_loss_bbox``; ``beta = 1/sigma**2``
  = 1/9) and the default ``sigma = 1`` (beta 1) in the box head (``loss_bbox``) of
  ``models/pascal_voc/VGG16/faster_rcnn_end2end/train.prototxt``. The beta is a literal inside
  torchvision's ``RegionProposalNetwork.compute_loss`` and ``roi_heads.fastrcnn_loss``, so
  :class:`BorderRPN` and :class:`SmoothL1RoIHeads` repeat those few lines with the beta as a
  setting (the normalisations stay torchvision's: over the sampled anchors, and over the sampled
  RoIs, which equal py-faster-rcnn's at one image per GPU).

``FasterRCNN`` builds its RPN and RoI heads itself (it takes no module for them), and these
subclasses add no parameter or buffer: :func:`use_reference_training` turns the built modules
into them in place, so state dicts, checkpoints and inference are those of torchvision's.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork

__all__ = ["TORCHVISION_BETA", "BorderRPN", "SmoothL1RoIHeads", "fastrcnn_loss", "use_reference_training"]

#: torchvision's smooth-L1 beta in both Faster R-CNN losses (py-faster-rcnn's RPN sigma 3).
TORCHVISION_BETA = 1.0 / 9.0


def _check_beta(name: str, beta: float) -> float:
    if not beta >= 0:  # also refuses NaN
        raise ValueError(f"{name} must be >= 0 (smooth-L1 beta = 1 / sigma**2 of Caffe's SmoothL1Loss), got {beta}")
    return float(beta)


class BorderRPN(RegionProposalNetwork):
    """torchvision's RPN with py-faster-rcnn's ``allowed_border`` and a settable smooth-L1 beta.

    ``allowed_border``: ``None`` (torchvision: every anchor takes part in RPN training) or the
    pixels an anchor may cross the image border by and still be matched and sampled (the
    reference: 0); the others are ignored (label -1) in training. Proposals and inference are
    unchanged. ``box_loss_beta``: the beta of the RPN's box loss (torchvision and the reference:
    1/9). Made by :func:`use_reference_training`.
    """

    allowed_border: float | None
    box_loss_beta: float
    _image_sizes: list[tuple[int, int]] | None

    def forward(
        self, images: ImageList, features: dict[str, Tensor], targets: list[dict[str, Tensor]] | None = None
    ) -> tuple[list[Tensor], dict[str, Tensor]]:
        # assign_targets_to_anchors needs each image's size (before batch padding)
        self._image_sizes = list(images.image_sizes) if self.training else None
        try:
            return super().forward(images, features, targets)
        finally:
            self._image_sizes = None

    def assign_targets_to_anchors(
        self, anchors: list[Tensor], targets: list[dict[str, Tensor]]
    ) -> tuple[list[Tensor], list[Tensor]]:
        sizes = self._image_sizes
        if self.allowed_border is None or sizes is None:
            return super().assign_targets_to_anchors(anchors, targets)
        b = self.allowed_border
        labels, matched = [], []
        for anchors_i, target_i, (h, w) in zip(anchors, targets, sizes):
            # anchor_target_layer.py keeps x1 >= -b, y1 >= -b, x2 < W + b, y2 < H + b in Caffe's
            # inclusive pixel coordinates (x2 = x1 + width - 1); torchvision's boxes end at x1 + width
            inside = (
                (anchors_i[:, 0] >= -b)
                & (anchors_i[:, 1] >= -b)
                & (anchors_i[:, 2] <= w + b)
                & (anchors_i[:, 3] <= h + b)
            )
            labels_i = anchors_i.new_full((anchors_i.shape[0],), -1.0, dtype=torch.float32)
            matched_i = anchors_i.new_zeros(anchors_i.shape)
            if bool(inside.any()):
                # torchvision's matching (IoU thresholds, best anchor per object) on the inside anchors only
                sub_labels, sub_matched = super().assign_targets_to_anchors([anchors_i[inside]], [target_i])
                labels_i[inside] = sub_labels[0]
                matched_i[inside] = sub_matched[0].to(matched_i.dtype)
            else:
                warnings.warn(
                    f"fasterrcnn_vgg: allowed_border={b}: an image (resized to {h}x{w}) has no anchor inside it, "
                    f"so it adds nothing to the RPN's loss (as in py-faster-rcnn); are the anchors larger than "
                    f"the images? (model.anchor_sizes, model.min_size, or allowed_border: null)",
                    stacklevel=2,
                )
            labels.append(labels_i)
            matched.append(matched_i)
        return labels, matched

    def compute_loss(
        self, objectness: Tensor, pred_bbox_deltas: Tensor, labels: list[Tensor], regression_targets: list[Tensor]
    ) -> tuple[Tensor, Tensor]:
        """torchvision's ``RegionProposalNetwork.compute_loss`` with ``beta=self.box_loss_beta``.

        When no anchor of the batch is sampled (every anchor outside the images) both losses are
        0, as Caffe's normalisation by ``max(1, count)`` makes them, instead of 0/0.
        """
        sampled_pos, sampled_neg = self.fg_bg_sampler(labels)
        sampled_pos_inds = torch.where(torch.cat(sampled_pos, dim=0))[0]
        sampled_neg_inds = torch.where(torch.cat(sampled_neg, dim=0))[0]
        sampled_inds = torch.cat([sampled_pos_inds, sampled_neg_inds], dim=0)
        objectness = objectness.flatten()
        if sampled_inds.numel() == 0:
            return objectness.sum() * 0.0, pred_bbox_deltas.sum() * 0.0
        all_labels = torch.cat(labels, dim=0)
        targets = torch.cat(regression_targets, dim=0)
        box_loss = F.smooth_l1_loss(
            pred_bbox_deltas[sampled_pos_inds], targets[sampled_pos_inds], beta=self.box_loss_beta, reduction="sum"
        ) / (sampled_inds.numel())
        objectness_loss = F.binary_cross_entropy_with_logits(objectness[sampled_inds], all_labels[sampled_inds])
        return objectness_loss, box_loss


def fastrcnn_loss(
    class_logits: Tensor,
    box_regression: Tensor,
    labels: list[Tensor],
    regression_targets: list[Tensor],
    beta: float = TORCHVISION_BETA,
) -> tuple[Tensor, Tensor]:
    """torchvision's ``roi_heads.fastrcnn_loss`` with the smooth-L1 ``beta`` as an argument.

    Cross-entropy over the sampled RoIs; smooth-L1 of the true class's box deltas of the
    foreground RoIs, summed and divided by the number of sampled RoIs.
    """
    labels_cat = torch.cat(labels, dim=0)
    targets = torch.cat(regression_targets, dim=0)
    classification_loss = F.cross_entropy(class_logits, labels_cat)
    pos = torch.where(labels_cat > 0)[0]
    n = class_logits.shape[0]
    box_regression = box_regression.reshape(n, box_regression.size(-1) // 4, 4)
    box_loss = F.smooth_l1_loss(box_regression[pos, labels_cat[pos]], targets[pos], beta=beta, reduction="sum")
    return classification_loss, box_loss / labels_cat.numel()


class SmoothL1RoIHeads(RoIHeads):
    """torchvision's box-only ``RoIHeads`` whose box loss uses ``box_loss_beta`` (py-faster-rcnn: 1).

    Inference, sampling and everything else are torchvision's; only the training branch is
    written out to pass the beta to :func:`fastrcnn_loss`. Made by :func:`use_reference_training`.
    """

    box_loss_beta: float

    def forward(
        self,
        features: dict[str, Tensor],
        proposals: list[Tensor],
        image_shapes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]] | None = None,
    ) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
        if not self.training:
            return super().forward(features, proposals, image_shapes, targets)
        proposals, _, labels, regression_targets = self.select_training_samples(proposals, targets)
        box_features = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        class_logits, box_regression = self.box_predictor(box_features)
        loss_classifier, loss_box_reg = fastrcnn_loss(
            class_logits, box_regression, labels, regression_targets, beta=self.box_loss_beta
        )
        return [], {"loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg}


def use_reference_training(
    model: FasterRCNN,
    *,
    allowed_border: float | None = None,
    rpn_loss_beta: float = TORCHVISION_BETA,
    box_loss_beta: float = TORCHVISION_BETA,
) -> FasterRCNN:
    """Give ``model`` (a torchvision ``FasterRCNN`` with box heads only) these training settings.

    With the defaults (torchvision's own) nothing changes. Otherwise ``model.rpn`` becomes a
    :class:`BorderRPN` and, for a ``box_loss_beta`` other than 1/9, ``model.roi_heads`` a
    :class:`SmoothL1RoIHeads`: the same modules (parameters, buffers, settings), with their class
    changed in place because ``FasterRCNN`` builds them itself.
    """
    rpn_loss_beta = _check_beta("rpn_loss_beta", rpn_loss_beta)
    box_loss_beta = _check_beta("box_loss_beta", box_loss_beta)
    if allowed_border is not None:
        allowed_border = float(allowed_border)
        if not torch.isfinite(torch.tensor(allowed_border)):
            raise ValueError(f"allowed_border must be a finite number of pixels or None, got {allowed_border}")
    if allowed_border is not None or rpn_loss_beta != TORCHVISION_BETA:
        rpn: Any = model.rpn
        if type(rpn) is not RegionProposalNetwork:
            raise TypeError(f"expected torchvision's RegionProposalNetwork, got {type(rpn).__name__}")
        rpn.__class__ = BorderRPN
        rpn.allowed_border, rpn.box_loss_beta, rpn._image_sizes = allowed_border, rpn_loss_beta, None
    if box_loss_beta != TORCHVISION_BETA:
        heads: Any = model.roi_heads
        if type(heads) is not RoIHeads or heads.has_mask() or heads.has_keypoint():
            raise TypeError(f"expected torchvision's box-only RoIHeads, got {type(heads).__name__}")
        heads.__class__ = SmoothL1RoIHeads
        heads.box_loss_beta = box_loss_beta
    return model
