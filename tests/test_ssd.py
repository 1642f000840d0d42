"""ssd_vgg: the paper's SSD300/SSD512 structure, torchvision equality, weights, training, ONNX."""

from __future__ import annotations

import pytest
import torch
from torchvision.models.detection.ssd import SSD, ssd300_vgg16

from vggbackbone import VGGBackbone, WeightsError
from vggbackbone.models import ssd_vgg
from vggbackbone.models.ssd import TORCHVISION_SSD_NORMALIZATION, L2Norm, SSDVGGBackbone, save_ssd_weights

# source map sizes and default boxes per location (4 or 6), from the paper's Fig. 2 / Caffe prototxts
SOURCES = {
    300: ([38, 19, 10, 5, 3, 1], [4, 6, 6, 6, 4, 4], 8732),
    512: ([64, 32, 16, 8, 4, 2, 1], [4, 6, 6, 6, 6, 4, 4], 24564),
}


def _conv(module: torch.nn.Module, layer: str) -> torch.nn.Conv2d:
    """The convolution of a named VGG layer (``"conv5_1"``, ``"fc6"``), whatever the module nesting."""
    return next(m for n, m in module.named_modules() if isinstance(m, torch.nn.Conv2d) and layer in n)


def _head_outputs(model: SSD, size: int) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    feats = list(model.backbone(torch.rand(1, 3, size, size)).values())
    return feats, model.head(feats)


@pytest.mark.parametrize("size", [300, 512])
def test_sources_channels_and_default_boxes(size) -> None:
    model = ssd_vgg("vgg16", size=size, num_classes=5, width_mult=0.125).eval()
    assert isinstance(model, SSD) and isinstance(model.backbone, SSDVGGBackbone)
    bb = model.backbone
    # Caffe ceil-mode pools everywhere (torchvision patches pool3: 75 -> 38 at 300)
    pools = [m for m in bb.body.modules() if isinstance(m, torch.nn.MaxPool2d)]
    assert len(pools) == 4 and all(m.ceil_mode for m in pools)  # pool1..pool4; pool5 is SSD's own
    assert isinstance(bb.l2norm, L2Norm) and torch.equal(bb.l2norm.weight, torch.full((64,), 20.0))
    pool5, fc6, fc7 = bb.fc.pool5, bb.fc.fc6, bb.fc.fc7
    assert (pool5.kernel_size, pool5.stride, pool5.padding) == (3, 1, 1)
    assert fc6.kernel_size == (3, 3) and fc6.dilation == (6, 6) and fc6.padding == (6, 6) and fc7.kernel_size == (1, 1)
    assert list(bb.extra) == ["conv8", "conv9", "conv10", "conv11"] + (["conv12"] if size == 512 else [])
    # every width scales by 1/8: conv4_3 512 -> 64, fc7 1024 -> 128, conv8_2 512 -> 64, others 256 -> 32
    assert bb.out_channels == [64, 128, 64] + [32] * (len(SOURCES[size][0]) - 3)
    sides, per_loc, total = SOURCES[size]
    with torch.no_grad():
        feats, head = _head_outputs(model, size)
    assert [tuple(f.shape[1:]) for f in feats] == [(c, s, s) for c, s in zip(bb.out_channels, sides, strict=True)]
    assert model.anchor_generator.num_anchors_per_location() == per_loc
    assert sum(s * s * a for s, a in zip(sides, per_loc, strict=True)) == total
    assert head["cls_logits"].shape == (1, total, 5) and head["bbox_regression"].shape == (1, total, 4)
    assert model.transform.fixed_size == (size, size)
    scales = model.anchor_generator.scales
    assert scales == (
        [0.07, 0.15, 0.33, 0.51, 0.69, 0.87, 1.05] if size == 300 else [0.04, 0.1, 0.26, 0.42, 0.58, 0.74, 0.9, 1.06]
    )


@pytest.mark.parametrize(
    "arch, width, c4",
    [
        ("vgg11", 0.125, 64),
        ("vgg16_bn", 0.25, 128),
        ("vgg19", 0.0625, 32),
        ([(1, 16), (1, 32), (2, 48), (2, 64), (2, 64)], 1.0, 64),
    ],
)
def test_other_archs_and_widths(arch, width, c4) -> None:
    model = ssd_vgg(arch, size=300, num_classes=3, width_mult=width).eval()
    with torch.no_grad():
        feats, head = _head_outputs(model, 300)
    assert [f.shape[-1] for f in feats] == SOURCES[300][0]
    assert feats[0].shape[1] == c4 == model.backbone.l2norm.weight.numel()
    assert head["cls_logits"].shape == (1, 8732, 3)
    out = model([torch.rand(3, 120, 90)])[0]  # any input size: resized to 300x300 inside, boxes back in input pixels
    assert out["boxes"].shape[1] == 4 and (out["boxes"][:, 2] <= 90).all() and (out["boxes"][:, 3] <= 120).all()


def test_loads_torchvision_ssd300_vgg16_and_gives_its_detections_exactly(tmp_path) -> None:
    torch.manual_seed(0)
    tv = ssd300_vgg16(weights=None, weights_backbone=None).eval()
    path = tmp_path / "ssd300_vgg16.pth"
    torch.save(tv.state_dict(), path)
    model = ssd_vgg("vgg16", size=300, num_classes=91, weights=path).eval()
    assert model.transform.image_mean == tv.transform.image_mean and model.transform.image_std == tv.transform.image_std
    assert model.normalization == TORCHVISION_SSD_NORMALIZATION
    assert model.backbone.body.frozen_stages == 1  # torchvision: trainable_backbone_layers=4 when trained
    # random weights give near-uniform scores: keep every box so all 200 detections are compared
    tv.score_thresh = model.score_thresh = 0.0
    heads = []
    for m in (tv, model):
        m.head.register_forward_hook(lambda _m, _i, out: heads.append(out))
    image = torch.rand(3, 240, 320)
    with torch.no_grad():
        expected, got = tv([image])[0], model([image])[0]
    for k in ("cls_logits", "bbox_regression"):
        assert torch.equal(heads[0][k], heads[1][k]), k
    assert len(got["boxes"]) == 200
    for k in ("boxes", "scores", "labels"):
        assert torch.equal(got[k], expected[k]), k

    # wrong model for the file, and a file with a key missing: errors that name the problem
    with pytest.raises(WeightsError, match="backbone layers"):
        ssd_vgg("vgg11", size=300, num_classes=91, weights=path)
    sd = torch.load(path, weights_only=True)
    del sd["head.regression_head.module_list.0.bias"]
    torch.save(sd, tmp_path / "broken.pth")
    with pytest.raises(WeightsError, match=r"missing keys \(1\).*regression_head.module_list.0.bias"):
        ssd_vgg("vgg16", size=300, num_classes=91, weights=tmp_path / "broken.pth")
    with pytest.raises(WeightsError, match="wrong shape"):
        ssd_vgg("vgg16", size=300, num_classes=21, weights=path)


def test_own_files_load_back_with_their_normalization(tmp_path) -> None:
    model = ssd_vgg("vgg11", size=300, num_classes=3, width_mult=0.125, normalization="caffe").eval()
    with torch.no_grad():
        model.backbone.l2norm.weight.mul_(1.5)  # something not in a fresh model
    image = torch.rand(3, 100, 140)
    with torch.no_grad():
        expected = model([image])[0]
    path = save_ssd_weights(model, tmp_path / "ssd.pth")
    again = ssd_vgg("vgg11", size=300, num_classes=3, width_mult=0.125, weights=path).eval()
    assert again.normalization == model.normalization and again.normalization.name == "caffe"
    with torch.no_grad():
        got = again([image])[0]
    for k in expected:
        assert torch.equal(got[k], expected[k]), k
    # a plain state dict carries no normalisation: said, not guessed silently
    torch.save(model.state_dict(), tmp_path / "plain.pth")
    with pytest.warns(UserWarning, match="declares no input normalisation"):
        ssd_vgg("vgg11", size=300, num_classes=3, width_mult=0.125, weights=tmp_path / "plain.pth")


def test_fc6_fc7_are_subsampled_from_the_classifier(tmp_path) -> None:
    src = VGGBackbone("vgg11", return_layers=["fc7"], width_mult=0.25)  # fc6/fc7: 1024 channels
    path = src.save_weights(tmp_path / "vgg11.pth")
    model = ssd_vgg("vgg11", size=300, num_classes=3, weights_backbone=path, width_mult=0.25)
    bb = model.backbone
    fc6, fc7 = _conv(src, "fc6"), _conv(src, "fc7")
    assert fc6.weight.shape == (1024, 128, 7, 7) and bb.fc.fc6.weight.shape == (256, 128, 3, 3)  # 1024 * 0.25
    assert torch.equal(bb.fc.fc6.weight, fc6.weight[::4, :, ::3, ::3])
    assert torch.equal(bb.fc.fc6.bias, fc6.bias[::4])
    assert torch.equal(bb.fc.fc7.weight, fc7.weight[::4, ::4]) and torch.equal(bb.fc.fc7.bias, fc7.bias[::4])
    assert torch.equal(_conv(bb.body, "conv5_2").weight, _conv(src, "conv5_2").weight)
    for name, p in bb.body.named_parameters():  # frozen_stages=1, as torchvision's trainable_backbone_layers=4
        assert p.requires_grad == ("conv1_" not in name), name

    no_fc = VGGBackbone("vgg11", return_layers=["conv5"], width_mult=0.25).save_weights(tmp_path / "nofc.pth")
    with pytest.warns(UserWarning, match="no classifier fc6/fc7; fc6/fc7 start from random"):
        ssd_vgg("vgg11", size=300, num_classes=3, weights_backbone=no_fc, width_mult=0.25)
    with pytest.raises(WeightsError, match="fc_init='classifier'"):
        ssd_vgg("vgg11", size=300, num_classes=3, weights_backbone=no_fc, width_mult=0.25, fc_init="classifier")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"score_tresh": 0.1}, r"unknown argument\(s\) \['score_tresh'\].*score_thresh"),
        ({"size": 400}, "300 or 512"),
        ({"num_classes": 1}, "background"),
        ({"arch": [(1, 16), (1, 32), (1, 64), (1, 64)]}, "5-block"),
        ({"box_scales": [0.1, 0.2]}, "needs 7 values"),
        ({"weights": "a.pth", "weights_backbone": "b.pth"}, "not both"),
        ({"frozen_stages": 6}, "frozen_stages"),
    ],
)
def test_bad_arguments_are_refused(kwargs, message) -> None:
    args = {"arch": "vgg11", "num_classes": 3, "width_mult": 0.125} | kwargs
    with pytest.raises(ValueError, match=message):
        ssd_vgg(**args)


def _shapes_batch() -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    images = [torch.full((3, 96, 96), 0.2), torch.full((3, 96, 96), 0.8)]
    images[0][:, 20:60, 10:50] = 0.9
    images[1][:, 40:80, 50:90] = 0.1
    images[1][:, 5:30, 5:35] = 0.5
    targets = [
        {"boxes": torch.tensor([[10.0, 20.0, 50.0, 60.0]]), "labels": torch.tensor([1])},
        {"boxes": torch.tensor([[50.0, 40.0, 90.0, 80.0], [5.0, 5.0, 35.0, 30.0]]), "labels": torch.tensor([2, 1])},
    ]
    return images, targets


def test_a_few_training_steps_lower_the_loss() -> None:
    model = ssd_vgg("vgg11_bn", size=300, num_classes=3, width_mult=0.0625).train()
    images, targets = _shapes_batch()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    losses = []
    for _ in range(6):
        loss = sum(model(images, targets).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.5 * losses[0], losses  # ~45 -> ~7 in 6 steps


@pytest.mark.parametrize("size", [300, 512])
def test_extra_norm_puts_batchnorm_after_every_added_conv(size) -> None:
    plain = ssd_vgg("vgg11", size=size, num_classes=3, width_mult=0.125)
    model = ssd_vgg("vgg11", size=size, num_classes=3, width_mult=0.125, extra_norm=True)
    added = [n for n, m in plain.backbone.named_modules() if isinstance(m, torch.nn.Conv2d) and "body" not in n]
    norms = {n for n, m in model.backbone.named_modules() if isinstance(m, torch.nn.BatchNorm2d) and "body" not in n}
    assert len(added) == 2 + 2 * (len(SOURCES[size][0]) - 2)  # fc6, fc7, two per extra source
    assert norms == {f"{n}_norm" for n in added}
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in plain.backbone.modules())  # the paper's: none
    model.eval()
    with torch.no_grad():
        feats, head = _head_outputs(model, size)
    assert [f.shape[-1] for f in feats] == SOURCES[size][0]
    assert head["cls_logits"].shape == (1, SOURCES[size][2], 3)
    # in training, each BatchNorm sees the batch: a batch of 2 images trains even at conv11_2's 1x1
    model.train()
    images, targets = _shapes_batch()
    loss = sum(model(images, targets).values())
    loss.backward()
    assert model.backbone.extra["conv9"].conv9_2_norm.weight.grad is not None


def test_onnx_export_equals_pytorch(tmp_path) -> None:
    import onnxruntime as ort

    from vggbackbone.models.export import export_task_onnx

    model = ssd_vgg("vgg11", size=300, num_classes=4, width_mult=0.125, detections_per_img=50).eval()
    image = torch.rand(3, 96, 128)
    path = export_task_onnx(model, tmp_path / "ssd.onnx", image)  # also verified inside, on two sizes
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for img in (image, torch.rand(3, 150, 80)):
        boxes, labels, scores = sess.run(None, {"image": img.numpy()})
        with torch.no_grad():
            expected = model([img])[0]
        assert len(labels) == len(expected["labels"]) == 50
        assert torch.equal(torch.from_numpy(labels), expected["labels"])
        torch.testing.assert_close(torch.from_numpy(boxes), expected["boxes"], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(torch.from_numpy(scores), expected["scores"], rtol=1e-4, atol=1e-5)
