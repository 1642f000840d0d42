"""The segmentation LightningModule: normalisation, optimiser groups, losses, inference modes."""

from __future__ import annotations

import pytest
import torch

from tasks.core import OptimConfig
from tasks.segment import SegmentationModel

TINY = {"head": "unet", "arch": "vgg11_bn", "width_mult": 0.125, "head_kwargs": {"decoder_channels": [16, 16, 8, 8, 8]}}


def test_backbone_lr_mult_reaches_the_backbone() -> None:
    m = SegmentationModel(num_classes=3, optim=OptimConfig(name="sgd", lr=0.1, backbone_lr_mult=0.1), **TINY)
    opt = m.configure_optimizers()["optimizer"]
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert all(lr_of[id(p)] == pytest.approx(0.01) for p in m.model.backbone.parameters())
    assert all(lr_of[id(p)] == pytest.approx(0.1) for p in m.model.decoder.parameters())


def test_uint8_input_is_normalised_with_the_backbone_statistics() -> None:
    m = SegmentationModel(num_classes=3, **TINY).eval()
    images = torch.randint(0, 256, (1, 3, 40, 36), dtype=torch.uint8)
    expected = m.model(m.model.normalization(images.float() / 255))
    torch.testing.assert_close(m(images), expected)


@pytest.mark.parametrize("loss", ["ce", "ce+dice", "ce+lovasz"])
def test_losses_ignore_255(loss: str) -> None:
    m = SegmentationModel(num_classes=3, loss=loss, **TINY)
    logits = torch.randn(2, 3, 8, 8)
    masks = torch.randint(0, 3, (2, 8, 8))
    base = m.loss(logits, masks)
    # changing the logits of ignored pixels changes nothing
    masks[:, :3] = 255
    changed = logits.clone()
    changed[:, :, :3] = torch.randn(2, 3, 3, 8) * 10
    torch.testing.assert_close(m.loss(changed, masks), m.loss(logits, masks))
    assert torch.isfinite(base)


def test_slide_and_whole_inference_agree_on_window_sized_images() -> None:
    whole = SegmentationModel(num_classes=3, **TINY).eval()
    slide = SegmentationModel(num_classes=3, inference="slide", window=64, **TINY).eval()
    slide.load_state_dict(whole.state_dict())
    image = torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8)
    torch.testing.assert_close(slide.predict_logits(image), whole.predict_logits(image))
    big = torch.randint(0, 256, (3, 100, 150), dtype=torch.uint8)
    assert slide.predict_logits(big).shape == (1, 3, 100, 150)


def test_inference_scale_resizes_in_and_out() -> None:
    full = SegmentationModel(num_classes=3, **TINY).eval()
    half = SegmentationModel(num_classes=3, inference_scale=0.5, **TINY).eval()
    half.load_state_dict(full.state_dict())
    image = torch.randint(0, 256, (3, 50, 70), dtype=torch.uint8)
    out = half.predict_logits(image)
    assert out.shape == (1, 3, 50, 70)
    small = torch.nn.functional.interpolate(image[None].float(), size=(25, 35), mode="bilinear", antialias=True)
    expected = torch.nn.functional.interpolate(full.model(full.normalize(small / 255)), size=(50, 70), mode="bilinear")
    torch.testing.assert_close(out, expected)
