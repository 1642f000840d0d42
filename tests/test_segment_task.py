"""The segmentation LightningModule: normalisation, optimiser groups, losses, inference modes."""

from __future__ import annotations

import pytest
import torch

from tasks.core import OptimConfig
from tasks.segment import SegmentationTask

TINY = {"head": "unet", "arch": "vgg11_bn", "width_mult": 0.125, "decoder_channels": [16, 16, 8, 8, 8]}


def test_backbone_lr_mult_reaches_the_backbone() -> None:
    m = SegmentationTask(num_classes=3, optim=OptimConfig(name="sgd", lr=0.1, backbone_lr_mult=0.1), **TINY)
    opt = m.configure_optimizers()["optimizer"]
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert all(lr_of[id(p)] == pytest.approx(0.01) for p in m.model.backbone.parameters())
    assert all(lr_of[id(p)] == pytest.approx(0.1) for p in m.model.decoder.parameters())


def test_uint8_input_is_normalised_with_the_backbone_statistics() -> None:
    """The task hands [0, 1] images to the model, which normalises them itself (once)."""
    m = SegmentationTask(num_classes=3, **TINY).eval()
    images = torch.randint(0, 256, (1, 3, 40, 36), dtype=torch.uint8)
    x = m.model.backbone.normalization(images.float() / 255)
    expected = m.model.segmentation_head(m.model.decoder([x, *m.model.backbone(x).values()]))
    torch.testing.assert_close(m(images), expected)
    assert m.normalization is m.model.normalization and m.export_model() is m.model


@pytest.mark.parametrize("loss", ["ce", "ce+dice", "ce+lovasz"])
def test_losses_ignore_255(loss: str) -> None:
    m = SegmentationTask(num_classes=3, loss=loss, **TINY)
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
    whole = SegmentationTask(num_classes=3, **TINY).eval()
    slide = SegmentationTask(num_classes=3, inference="slide", window=64, **TINY).eval()
    slide.load_state_dict(whole.state_dict())
    image = torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8)
    torch.testing.assert_close(slide.predict_logits(image), whole.predict_logits(image))
    big = torch.randint(0, 256, (3, 100, 150), dtype=torch.uint8)
    assert slide.predict_logits(big).shape == (1, 3, 100, 150)


def test_inference_scale_resizes_in_and_out() -> None:
    full = SegmentationTask(num_classes=3, **TINY).eval()
    half = SegmentationTask(num_classes=3, inference_scale=0.5, **TINY).eval()
    half.load_state_dict(full.state_dict())
    image = torch.randint(0, 256, (3, 50, 70), dtype=torch.uint8)
    out = half.predict_logits(image)
    assert out.shape == (1, 3, 50, 70)
    small = torch.nn.functional.interpolate(image[None].float(), size=(25, 35), mode="bilinear", antialias=True)
    expected = torch.nn.functional.interpolate(full.model(small / 255), size=(50, 70), mode="bilinear")
    torch.testing.assert_close(out, expected)


def test_empty_training_batch_gives_a_zero_loss_on_every_parameter() -> None:
    m = SegmentationTask(num_classes=3, **TINY)
    empty = {
        "image": torch.empty(0, 3, 1, 1, dtype=torch.uint8),
        "mask": torch.empty(0, 1, 1, dtype=torch.long),
        "id": [],
    }
    loss = m.training_step(empty, 0)
    assert loss is not None and loss.item() == 0.0
    loss.backward()  # every process joins DDP's gradient all-reduce, with zeros
    assert all(p.grad is not None and not p.grad.any() for p in m.parameters() if p.requires_grad)


def test_unreadable_validation_image_is_skipped_alone_in_its_batch(tmp_path) -> None:
    """eval_batch_size 1: a batch with nothing readable; metrics over the other images."""
    import json

    import numpy as np
    import pytorch_lightning as pl
    from PIL import Image

    from tasks.data.segmentation import SegmentationDataModule
    from tasks.data.shapes import ShapesConfig

    shapes = ShapesConfig(num_train=2, num_val=3, min_image_size=40, max_image_size=48, min_object_size=10,
                          max_object_size=20, layouts=("voc",))  # fmt: skip
    dm = SegmentationDataModule(root=str(tmp_path / "shapes"), shapes=shapes, eval_batch_size=1, num_workers=0)
    dm.prepare_data()
    voc = tmp_path / "shapes" / "VOCdevkit" / "VOC2007"
    ids = (voc / "ImageSets" / "Segmentation" / "val.txt").read_text().split()
    (voc / "JPEGImages" / f"{ids[1]}.jpg").write_bytes(b"\xff\xd8 truncated")
    model = SegmentationTask(num_classes=dm.num_classes, class_names=dm.class_names, **TINY)
    trainer = pl.Trainer(accelerator="cpu", logger=False, default_root_dir=tmp_path, enable_progress_bar=False,
                         enable_model_summary=False)  # fmt: skip
    with pytest.warns(UserWarning, match=rf"skipped 1 unreadable image\(s\): .*{ids[1]}\.jpg"):
        trainer.validate(model, datamodule=dm)
    metrics = json.loads((tmp_path / "val_metrics.json").read_text())
    kept = [np.array(Image.open(voc / "SegmentationClass" / f"{i}.png")) for i in (ids[0], ids[2])]
    assert np.array(metrics["confusion_matrix"]).sum() == sum(int((m != 255).sum()) for m in kept)
    assert 0.0 <= metrics["pixel_acc"] <= 1.0 and trainer.callback_metrics["val/pixel_acc"] == pytest.approx(
        metrics["pixel_acc"]
    )
    for name in dm.class_names:  # a class absent from both truth and predictions: null in the JSON, not logged
        if metrics[f"IoU/{name}"] is None:
            assert f"val/IoU/{name}" not in trainer.callback_metrics
        else:
            assert trainer.callback_metrics[f"val/IoU/{name}"] == pytest.approx(metrics[f"IoU/{name}"])
