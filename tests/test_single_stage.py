"""retinanet_vgg / fcos_vgg: P3-P7 on VGG + FPN, torchvision's defaults, refused arguments, training."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.models.detection.fcos import FCOS
from torchvision.models.detection.retinanet import RetinaNet
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from vggbackbone import VGGBackbone
from vggbackbone.models import fcos_vgg, retinanet_vgg


@pytest.mark.parametrize("builder, cls", [(retinanet_vgg, RetinaNet), (fcos_vgg, FCOS)])
def test_p3_to_p7_at_strides_8_to_128(builder, cls) -> None:
    model = builder("vgg11", num_classes=5, width_mult=0.25).eval()
    assert isinstance(model, cls)
    body = model.backbone.body
    assert body.return_layers == {"conv4": "0", "conv5": "1", "pool5": "2"}
    assert body.feature_info.reduction() == [8, 16, 32]
    assert isinstance(model.backbone.fpn.extra_blocks, LastLevelP6P7) and model.backbone.fpn.extra_blocks.use_P5
    assert model.transform.min_size == (800,) and model.transform.max_size == 1333  # torchvision's defaults
    with torch.no_grad():
        feats = model.backbone(torch.rand(1, 3, 256, 256))
    assert list(feats) == ["0", "1", "2", "p6", "p7"]
    assert [tuple(f.shape[1:]) for f in feats.values()] == [(64, 256 // s, 256 // s) for s in (8, 16, 32, 64, 128)]


def test_retinanet_anchors_and_head_are_torchvisions() -> None:
    model = retinanet_vgg("vgg16_bn", num_classes=91, width_mult=0.125)
    assert model.anchor_generator.sizes == (
        (32, 40, 50),
        (64, 80, 101),
        (128, 161, 203),
        (256, 322, 406),
        (512, 645, 812),
    )
    assert model.anchor_generator.aspect_ratios == ((0.5, 1.0, 2.0),) * 5
    assert model.head.classification_head.num_anchors == 9
    assert model.head.classification_head.cls_logits.out_channels == 9 * 91
    assert model.backbone.out_channels == 32 and model.score_thresh == 0.05


def test_fcos_anchor_points_and_groupnorm_width() -> None:
    model = fcos_vgg("vgg11", num_classes=3, width_mult=0.125)
    assert model.anchor_generator.sizes == ((8,), (16,), (32,), (64,), (128,))
    assert model.anchor_generator.aspect_ratios == ((1.0,),) * 5
    assert model.backbone.out_channels == 32  # 256/8 rounded to a multiple of 32 for GroupNorm(32, C)
    assert model.center_sampling_radius == 1.5 and model.score_thresh == 0.2
    with pytest.raises(ValueError, match="multiple of 32"):
        fcos_vgg("vgg11", num_classes=3, width_mult=0.125, fpn_channels=48)


def test_pretrained_backbone_freezes_two_blocks_and_loads(tmp_path) -> None:
    src = VGGBackbone("vgg11", return_layers=["pool5"], width_mult=0.125)
    path = src.save_weights(tmp_path / "vgg11.pth")
    src_convs = [m for m in src.modules() if isinstance(m, nn.Conv2d)]
    for builder in (retinanet_vgg, fcos_vgg):
        model = builder("vgg11", num_classes=3, weights_backbone=path, width_mult=0.125)
        body = model.backbone.body
        convs = [m for m in body.modules() if isinstance(m, nn.Conv2d)]
        assert all(torch.equal(a.weight, b.weight) for a, b in zip(convs, src_convs, strict=True))
        for name, p in body.named_parameters():  # torchvision's trainable_backbone_layers=3
            assert p.requires_grad == ("conv1_" not in name and "conv2_" not in name), name


@pytest.mark.parametrize("builder", [retinanet_vgg, fcos_vgg])
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"score_tresh": 0.1}, r"unknown argument\(s\) \['score_tresh'\].*'score_thresh'"),
        ({"min_sizes": 320}, r"unknown argument\(s\) \['min_sizes'\]"),
        ({"num_classes": 1}, "background"),
        ({"anchor_sizes": [32, 64, 128]}, "P3..P7"),
        ({"arch": [(1, 16), (1, 32), (1, 64), (1, 64)]}, "5-block"),
    ],
)
def test_bad_arguments_are_refused(builder, kwargs, message) -> None:
    args = {"arch": "vgg11", "num_classes": 3, "width_mult": 0.125} | kwargs
    with pytest.raises(ValueError, match=message):
        builder(**args)


@pytest.mark.parametrize(
    "builder, extra, lr, momentum, ratio",
    [
        # RetinaNet's classifier starts at the focal-loss prior (p = 0.01) and moves slowly: in 8 steps
        # the regression loss falls (0.69 -> 0.49) and the total ~13%
        (retinanet_vgg, {"anchor_sizes": (16, 32, 64, 128, 256)}, 0.05, 0.9, 0.92),
        (fcos_vgg, {}, 0.005, 0.0, 0.7),  # 2.83 -> 1.63
    ],
)
def test_a_few_training_steps_lower_the_loss(builder, extra, lr, momentum, ratio) -> None:
    model = builder("vgg11_bn", num_classes=3, width_mult=0.25, min_size=128, max_size=128, **extra).train()
    images = [torch.full((3, 128, 128), 0.2), torch.full((3, 128, 128), 0.8)]
    images[0][:, 20:70, 10:60] = 0.9
    images[1][:, 50:110, 60:120] = 0.1
    targets = [
        {"boxes": torch.tensor([[10.0, 20.0, 60.0, 70.0]]), "labels": torch.tensor([1])},
        {"boxes": torch.tensor([[60.0, 50.0, 120.0, 110.0]]), "labels": torch.tensor([2])},
    ]
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr, momentum=momentum)
    losses = []
    for _ in range(8):
        loss = sum(model(images, targets).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < ratio * losses[0], losses
