"""fasterrcnn_vgg: structure of both forms, freezing, weights into the box head, training."""

from __future__ import annotations

import pytest
import torch
from torchvision.models.detection import FasterRCNN
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.misc import FrozenBatchNorm2d

from vggbackbone import VGGBackbone
from vggbackbone.models import fasterrcnn_vgg
from vggbackbone.models.detection import RoIPoolSingleLevel, VGGBoxHead, VGGFPNBackbone


def test_classic_form_is_the_papers_vgg16_setup() -> None:
    with torch.device("meta"):  # structure only: no 130M-parameter allocation
        model = fasterrcnn_vgg("vgg16", num_classes=21)
    assert isinstance(model, FasterRCNN)
    bb = model.backbone
    assert isinstance(bb, VGGBackbone) and bb.return_layers == {"conv5": "0"}
    assert bb.feature_info.reduction() == [16] and bb.out_channels == 512
    assert "pool5" not in bb.features  # nothing after conv5 is built
    anchors = model.rpn.anchor_generator
    assert anchors.sizes == ((128, 256, 512),) and anchors.aspect_ratios == ((0.5, 1.0, 2.0),)
    assert model.rpn.head.cls_logits.out_channels == 9
    pool = model.roi_heads.box_roi_pool
    assert isinstance(pool, MultiScaleRoIAlign) and pool.output_size == (7, 7)
    head = model.roi_heads.box_head
    assert isinstance(head, VGGBoxHead)
    assert head.fc6.weight.shape == (4096, 512 * 7 * 7) and head.fc7.weight.shape == (4096, 4096)
    assert model.roi_heads.box_predictor.cls_score.out_features == 21
    assert model.roi_heads.box_predictor.bbox_pred.out_features == 21 * 4
    assert model.transform.min_size == (600,) and model.transform.max_size == 1000
    assert model.roi_heads.fg_bg_sampler.batch_size_per_image == 128  # paper's 128 RoIs per image
    # from scratch nothing is frozen (torchvision's convention)
    assert all(p.requires_grad for p in model.parameters())


def test_pretrained_freezes_conv1_conv2_and_loads_the_classifier_into_the_box_head(tmp_path) -> None:
    src = VGGBackbone("vgg11", return_layers=["fc7"], width_mult=0.125, fc_dropout=0)
    path = src.save_weights(tmp_path / "vgg11_w125.safetensors")
    model = fasterrcnn_vgg("vgg11", num_classes=3, weights_backbone=path, width_mult=0.125)
    bb = model.backbone
    for name, p in bb.named_parameters():
        assert p.requires_grad == (not name.startswith(("features.conv1.", "features.conv2."))), name
    head = model.roi_heads.box_head
    fc6 = src.features["fc6"].conv
    torch.testing.assert_close(head.fc6.weight, fc6.weight.reshape(fc6.weight.shape[0], -1), rtol=0, atol=0)
    torch.testing.assert_close(head.fc7.bias, src.features["fc7"].conv.bias, rtol=0, atol=0)
    torch.testing.assert_close(bb.features["conv5"][0].weight, src.features["conv5"][0].weight, rtol=0, atol=0)
    model.train()
    assert not bb.features["conv1"].training and bb.features["conv3"].training


def test_box_head_on_a_whole_image_roi_is_the_backbones_fc7(tmp_path) -> None:
    """RoIPool 7x7 of conv5 over a 224x224 image is pool5, so the head must give the fc7 tap."""
    src = VGGBackbone("vgg11", return_layers=["fc7"], width_mult=0.25).eval()
    path = src.save_weights(tmp_path / "vgg11_w25.pth")
    model = fasterrcnn_vgg("vgg11", num_classes=3, weights_backbone=path, width_mult=0.25, roi_pool="pool").eval()
    assert isinstance(model.roi_heads.box_roi_pool, RoIPoolSingleLevel)
    x = torch.rand(1, 3, 224, 224)
    with torch.no_grad():
        # RoIPool's legacy rounding: x1 = 208 -> bin 13 of 14, so the 7x7 bins are exactly 2x2 = pool5
        rois = model.roi_heads.box_roi_pool(model.backbone(x), [torch.tensor([[0.0, 0.0, 208.0, 208.0]])], [(224, 224)])
        ours = model.roi_heads.box_head(rois)
        # fc6 is an unpadded 7x7 conv over pool5 (7x7 here): its one cell sees exactly the whole pool5
        theirs = src(x)["fc7"].flatten(1)
    assert rois.shape == (1, 128, 7, 7)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def test_torchvision_classifier_shapes_load_into_the_head() -> None:
    """torchvision keeps fc6 as a Linear over the flattened (C, 7, 7) pool5: same order as the head."""
    head = VGGBoxHead(16, 32, dropout=0.0)
    linear = {"features.fc6.conv.weight": torch.randn(32, 16 * 49), "features.fc6.conv.bias": torch.randn(32),
              "features.fc7.conv.weight": torch.randn(32, 32), "features.fc7.conv.bias": torch.randn(32)}  # fmt: skip
    assert head.load_classifier(linear)
    x = torch.randn(2, 16, 7, 7)
    fc6 = torch.relu(x.flatten(1) @ linear["features.fc6.conv.weight"].T + linear["features.fc6.conv.bias"])
    expected = torch.relu(fc6 @ linear["features.fc7.conv.weight"].T + linear["features.fc7.conv.bias"])
    torch.testing.assert_close(head(x), expected)
    with pytest.raises(ValueError, match="do not fit"):
        VGGBoxHead(8, 32).load_classifier(linear)
    nan = dict(linear, **{"features.fc7.conv.bias": torch.full((32,), float("nan"))})
    with pytest.warns(UserWarning, match="not finite"):
        assert not head.load_classifier(nan)


def test_weights_without_a_classifier_warn_and_keep_a_random_head(tmp_path) -> None:
    src = VGGBackbone("vgg11_bn", return_layers=["conv5"], width_mult=0.125)
    path = src.save_weights(tmp_path / "cut_at_conv5.pth")
    with pytest.warns(UserWarning, match="no classifier fc6/fc7"):
        model = fasterrcnn_vgg("vgg11_bn", num_classes=3, weights_backbone=path, width_mult=0.125)
    # pretrained BN archs get FrozenBatchNorm2d, as torchvision's detectors
    assert any(isinstance(m, FrozenBatchNorm2d) for m in model.backbone.modules())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.backbone.modules())


def test_fpn_form_levels_and_channels() -> None:
    model = fasterrcnn_vgg("vgg11_bn", num_classes=4, fpn=True, width_mult=0.25, min_size=128, max_size=160)
    bb = model.backbone
    assert isinstance(bb, VGGFPNBackbone)
    assert bb.body.feature_info.reduction() == [4, 8, 16]
    assert bb.out_channels == 64  # 256 x width_mult
    feats = bb(torch.rand(1, 3, 128, 160))
    assert list(feats) == ["0", "1", "2", "pool"]
    assert [tuple(f.shape[-2:]) for f in feats.values()] == [(32, 40), (16, 20), (8, 10), (4, 5)]
    assert all(f.shape[1] == 64 for f in feats.values())
    assert model.rpn.anchor_generator.sizes == ((32,), (64,), (128,), (256,))
    assert model.roi_heads.box_head.fc6.in_features == 64 * 49
    assert model.roi_heads.box_predictor.cls_score.in_features == 256  # 1024 x width_mult


def test_eval_returns_boxes_in_input_coordinates() -> None:
    model = fasterrcnn_vgg("vgg11", num_classes=3, width_mult=0.125, min_size=96, max_size=128, roi_pool="pool").eval()
    images = [torch.rand(3, 70, 50), torch.rand(3, 40, 90)]
    with torch.no_grad():
        out = model(images)
    assert len(out) == 2
    for img, det in zip(images, out):
        h, w = img.shape[-2:]
        assert det["boxes"].shape[1] == 4 and len(det["boxes"]) == len(det["scores"]) == len(det["labels"])
        if len(det["boxes"]):
            assert det["boxes"][:, 0::2].max() <= w + 1e-3 and det["boxes"][:, 1::2].max() <= h + 1e-3
            assert det["labels"].min() >= 1 and det["labels"].max() <= 2


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"arch": [(1, 16), (1, 32), (1, 64), (1, 64)]}, "5-block"),
        ({"fpn": True, "anchor_sizes": [32, 64]}, "one size per level"),
        ({"num_classes": 1}, "background"),
        ({"roi_pool": "max"}, "roi_pool"),
    ],
)
def test_bad_arguments_are_refused(kwargs, message) -> None:
    args = {"arch": "vgg11", "num_classes": 3, "width_mult": 0.125} | kwargs
    with pytest.raises(ValueError, match=message):
        fasterrcnn_vgg(**args)


def test_a_few_training_steps_lower_the_loss() -> None:
    torch.manual_seed(0)
    model = fasterrcnn_vgg(
        "vgg11_bn", num_classes=3, fpn=True, width_mult=0.125, min_size=96, max_size=128,
        anchor_sizes=[16, 32, 64, 128], box_batch_size_per_image=64,
    )  # fmt: skip
    model.train()
    images = [torch.full((3, 96, 96), 0.2), torch.full((3, 96, 96), 0.8)]
    images[0][:, 20:60, 10:50] = 0.9
    images[1][:, 40:80, 50:90] = 0.1
    targets = [
        {"boxes": torch.tensor([[10.0, 20.0, 50.0, 60.0]]), "labels": torch.tensor([1])},
        {"boxes": torch.tensor([[50.0, 40.0, 90.0, 80.0]]), "labels": torch.tensor([2])},
    ]
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.02, momentum=0.9)
    losses = []
    for _ in range(15):
        loss = sum(model(images, targets).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses  # ~0.5 x after 15 steps


@pytest.mark.parametrize("roi_pool", ["align", "pool"])
def test_bfloat16_autocast_on_cpu(roi_pool) -> None:
    """``trainer.precision: bf16-mixed`` on CPU: torchvision's CPU RoIPool has no bf16 kernel, ours copes."""
    model = fasterrcnn_vgg("vgg11", num_classes=3, width_mult=0.125, min_size=64, max_size=96,
                           anchor_sizes=[16, 32, 64], roi_pool=roi_pool)  # fmt: skip
    images = [torch.rand(3, 64, 64)]
    targets = [{"boxes": torch.tensor([[5.0, 5.0, 40.0, 40.0]]), "labels": torch.tensor([1])}]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model(images, targets)
    loss = sum(losses.values())
    loss.backward()
    assert torch.isfinite(loss)
    assert model.backbone.features["conv1"][0].weight.grad is not None


@pytest.mark.parametrize("fpn", [False, True])
def test_backbone_lr_mult_reaches_the_vgg_only(fpn) -> None:
    from tasks.core import OptimConfig
    from tasks.detect import DetectionTask

    task = DetectionTask(classes=["a", "b"], arch="vgg11", width_mult=0.125, fpn=fpn,
                         optim=OptimConfig(lr=0.1, backbone_lr_mult=0.1))  # fmt: skip
    opt = task.configure_optimizers()["optimizer"]
    vgg = {id(p) for p in (task.model.backbone.body if fpn else task.model.backbone).parameters()}
    for group in opt.param_groups:
        in_vgg = {id(p) in vgg for p in group["params"]}
        assert len(in_vgg) == 1  # a group is all VGG or all new layers
        assert group["lr"] == pytest.approx(0.01 if in_vgg.pop() else 0.1)


def test_empty_training_batch_gives_a_zero_loss_on_every_parameter() -> None:
    from tasks.data.detection import DetectionBatch
    from tasks.detect import DetectionTask

    task = DetectionTask(classes=["a", "b"], arch="vgg11", width_mult=0.125, fpn=True)
    loss = task.training_step(DetectionBatch([], [], [("x.jpg", "cannot decode image")]), 0)
    assert loss.item() == 0.0
    loss.backward()  # every process joins DDP's gradient all-reduce, with zeros
    assert all(p.grad is not None and not p.grad.any() for p in task.parameters() if p.requires_grad)
