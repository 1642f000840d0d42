"""py-faster-rcnn's training details as ``fasterrcnn_vgg`` options: ``allowed_border`` (anchors
crossing the image border ignored in RPN training), ``rpn_loss_beta`` and ``box_loss_beta``
(smooth-L1 betas), checked on a tiny model and against hand-computed losses."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vggbackbone.models import fasterrcnn_vgg
from vggbackbone.models.rcnn_training import BorderRPN, SmoothL1RoIHeads, fastrcnn_loss

#: conv5 of a 64x64 image is 4x4 (stride 16); one 16-px square anchor per cell, centred on
#: (16 i, 16 j): the anchor of cell (0, 0) is [-8, -8, 8, 8], half outside the image.
TINY = dict(width_mult=0.0625, min_size=64, max_size=64, anchor_sizes=(16,), aspect_ratios=(1.0,))
CORNER, INSIDE = 0, 5  # anchors of cells (0, 0) and (1, 1) = [8, 8, 24, 24]


class _Recorder:
    """Stands in for the RPN's sampler: records the labels it is given and what it samples."""

    def __init__(self, sampler) -> None:
        self.sampler, self.labels, self.positive = sampler, None, None

    def __call__(self, labels):
        pos, neg = self.sampler(labels)
        self.labels, self.positive = labels[0].clone(), pos[0].clone()
        return pos, neg


def _rpn_training_labels(**options) -> _Recorder:
    torch.manual_seed(0)
    model = fasterrcnn_vgg("vgg11", num_classes=2, **TINY, **options).train()
    recorder = _Recorder(model.rpn.fg_bg_sampler)
    model.rpn.fg_bg_sampler = recorder
    # one object in the top-left corner: best matched by the corner anchor (IoU 0.22), which crosses the border
    target = {"boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0]]), "labels": torch.tensor([1])}
    losses = model([torch.rand(3, 64, 64)], [target])
    assert all(math.isfinite(float(v.detach())) for v in losses.values())
    return recorder


def test_a_cross_border_anchor_is_sampled_with_null_and_ignored_with_allowed_border_0() -> None:
    kept = _rpn_training_labels(allowed_border=None)
    assert kept.labels[CORNER] == 1 and kept.positive[CORNER]  # torchvision: the corner anchor trains as positive
    border = _rpn_training_labels(allowed_border=0)
    assert border.labels[CORNER] == -1 and not border.positive[CORNER]  # py-faster-rcnn: don't care
    assert border.labels[INSIDE] == 1 and border.positive[INSIDE]  # the best anchor inside takes the object
    # every anchor crossing the border is ignored; the inside ones are labelled
    anchors = torch.tensor(
        [[16.0 * x - 8, 16.0 * y - 8, 16.0 * x + 8, 16.0 * y + 8] for y in range(4) for x in range(4)]
    )
    inside = (anchors[:, :2] >= 0).all(1) & (anchors[:, 2:] <= 64).all(1)
    assert torch.equal(border.labels >= 0, inside)
    # a border of 8 px lets the corner anchor back in
    assert _rpn_training_labels(allowed_border=8).labels[CORNER] == 1


def test_images_without_any_anchor_inside_give_a_zero_rpn_loss_and_a_warning() -> None:
    model = fasterrcnn_vgg("vgg11", num_classes=2, width_mult=0.0625, min_size=64, max_size=64, allowed_border=0)
    target = {"boxes": torch.tensor([[4.0, 4.0, 40.0, 40.0]]), "labels": torch.tensor([1])}
    with pytest.warns(UserWarning, match="has no anchor inside it"):
        losses = model.train()([torch.rand(3, 64, 64)], [target])  # anchors of 128 px and more
    assert float(losses["loss_objectness"]) == 0.0 and float(losses["loss_rpn_box_reg"]) == 0.0
    assert math.isfinite(float(losses["loss_classifier"]))


def test_fastrcnn_loss_with_beta_1_equals_a_hand_computation() -> None:
    # three sampled RoIs: class 1, background, class 2 (3 classes, 4 deltas each)
    logits = torch.zeros(3, 3)
    deltas = torch.zeros(3, 12)
    deltas[0, 4:8] = torch.tensor([0.5, -2.0, 0.05, 0.0])  # class 1's deltas of RoI 0
    deltas[2, 8:12] = torch.tensor([1.0, 0.1, -0.3, 3.0])  # class 2's deltas of RoI 2
    labels = [torch.tensor([1, 0, 2])]
    targets = [torch.zeros(3, 4)]
    cls, box = fastrcnn_loss(logits, deltas, labels, targets, beta=1.0)
    assert float(cls) == pytest.approx(math.log(3))
    # smooth-L1(x), beta 1: x^2 / 2 below 1, |x| - 1/2 above; summed, divided by the 3 sampled RoIs
    hand = (0.125 + 1.5 + 0.00125 + 0.0) + (0.5 + 0.005 + 0.045 + 2.5)
    assert float(box) == pytest.approx(hand / 3)
    assert float(fastrcnn_loss(logits, deltas, labels, targets)[1]) != pytest.approx(hand / 3)  # torchvision's 1/9


def test_rpn_loss_with_beta_1_equals_a_hand_computation() -> None:
    rpn = fasterrcnn_vgg("vgg11", num_classes=2, **TINY, rpn_loss_beta=1.0).rpn
    assert isinstance(rpn, BorderRPN)
    objectness = torch.tensor([[2.0], [-1.0], [0.0], [0.5]])
    deltas = torch.tensor([[0.5, 0.0, 0.0, 0.0], [9.0, 9.0, 9.0, 9.0], [9.0, 9.0, 9.0, 9.0], [0.0, -3.0, 0.0, 0.2]])
    labels = [torch.tensor([1.0, 0.0, -1.0, 1.0])]  # 2 positives, 1 negative, 1 ignored: all sampled
    obj, box = rpn.compute_loss(objectness, deltas, labels, [torch.zeros(4, 4)])
    bce = -(math.log(torch.sigmoid(torch.tensor(2.0))) + math.log(1 - torch.sigmoid(torch.tensor(-1.0))))
    bce -= math.log(torch.sigmoid(torch.tensor(0.5)))
    assert float(obj) == pytest.approx(bce / 3)
    assert float(box) == pytest.approx((0.125 + 2.5 + 0.02) / 3)  # positives only, over the 3 sampled


def test_the_betas_reach_both_losses_of_a_training_step(monkeypatch: pytest.MonkeyPatch) -> None:
    betas: list[float] = []
    smooth_l1 = F.smooth_l1_loss

    def spy(*args, beta=1.0, **kwargs):
        betas.append(beta)
        return smooth_l1(*args, beta=beta, **kwargs)

    model = fasterrcnn_vgg("vgg11", num_classes=2, **TINY, box_loss_beta=1.0).train()
    assert isinstance(model.roi_heads, SmoothL1RoIHeads) and type(model.rpn).__name__ == "RegionProposalNetwork"
    monkeypatch.setattr(F, "smooth_l1_loss", spy)
    target = {"boxes": torch.tensor([[4.0, 4.0, 40.0, 40.0]]), "labels": torch.tensor([1])}
    model([torch.rand(3, 64, 64)], [target])
    assert betas == [pytest.approx(1 / 9), 1.0]  # RPN (py-faster-rcnn's sigma 3), box head (sigma 1)
    # the state dict is torchvision's: a model with the defaults loads it
    plain = fasterrcnn_vgg("vgg11", num_classes=2, **TINY)
    plain.load_state_dict(model.state_dict())


def test_the_options_reach_the_model_through_the_detection_task() -> None:
    from tasks.detect import DetectionTask

    task = DetectionTask(classes=["a"], arch="vgg11", **TINY, allowed_border=0, box_loss_beta=1.0, rpn_loss_beta=0.5)
    assert task.model.rpn.allowed_border == 0 and task.model.rpn.box_loss_beta == 0.5
    assert task.model.roi_heads.box_loss_beta == 1.0
    assert task.hparams["allowed_border"] == 0 and task.hparams["box_loss_beta"] == 1.0
    with pytest.raises(ValueError, match="box_loss_beta must be >= 0"):
        fasterrcnn_vgg("vgg11", num_classes=2, **TINY, box_loss_beta=-1.0)
