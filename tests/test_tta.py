"""Test-time augmentation (``model.tta``, :mod:`tasks.tta`): each task's views averaged as computed by hand,
detection's flipped boxes mapped back exactly and merged by per-class NMS; off by default."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import Tensor, nn

from tasks.classify import ClassificationTask
from tasks.detect import DetectionTask
from tasks.reid import ReIDTask
from tasks.segment import SegmentationTask
from tasks.tta import TTAConfig, classify_logits, detect_outputs, reid_embeddings, segment_logits, tta_config

TINY = {"arch": "vgg11", "width_mult": 0.0625}


def _segmenter(tta: TTAConfig | None) -> SegmentationTask:
    torch.manual_seed(0)
    return SegmentationTask(num_classes=3, family="fcn32s", tta=tta, **TINY).eval()


def test_off_by_default_everywhere() -> None:
    for task in (_segmenter(None), ClassificationTask(num_classes=3, fc_channels=8, **TINY)):
        assert task.tta is None and task.hparams["tta"] is None
    x = torch.rand(1, 3, 40, 48)
    seg = _segmenter(None)
    with torch.no_grad():
        assert torch.equal(seg.predict_logits(x[0]), seg.model(x))  # the plain forward, untouched


def test_segmentation_flip_and_scales_average_the_softmax_at_full_resolution() -> None:
    x = torch.rand(1, 3, 40, 48)
    seg = _segmenter(TTAConfig(hflip=True, scales=[0.5, 1.0]))
    m = seg.model
    with torch.no_grad():
        got = seg.predict_logits(x[0])
        views = []
        for s in (0.5, 1.0):
            xs = F.interpolate(x, scale_factor=s, mode="bilinear", antialias=True) if s != 1.0 else x
            for flip in (False, True):
                out = m(xs.flip(-1)) if flip else m(xs)
                out = out.flip(-1) if flip else out
                if out.shape[-2:] != x.shape[-2:]:
                    out = F.interpolate(out, size=x.shape[-2:], mode="bilinear")
                views.append(out.softmax(1))
    assert got.shape == (1, 3, 40, 48)
    torch.testing.assert_close(got, (sum(views) / 4).log(), rtol=1e-5, atol=1e-6)
    # flip only, by the module's function, on a model that is not flip-equivariant
    model = nn.Conv2d(3, 3, (1, 5), padding=(0, 2))
    flipped = segment_logits(lambda im, s: model(im), x, TTAConfig(hflip=True))
    expected = ((model(x).softmax(1) + model(x.flip(-1)).flip(-1).softmax(1)) / 2).log()
    torch.testing.assert_close(flipped, expected)
    assert not torch.allclose(flipped, model(x).log_softmax(1), atol=1e-4)


def test_segmentation_skips_images_too_small_at_the_smallest_scale() -> None:
    seg = _segmenter(TTAConfig(scales=[0.5, 1.0]))
    least = seg.model.backbone.min_input_size
    assert seg.too_small(torch.zeros(3, least, least)) is not None  # 0.5 x least is too small
    assert _segmenter(None).too_small(torch.zeros(3, least, least)) is None


def test_classification_flip_and_ten_crop_average_the_logits() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 5))
    x = torch.rand(2, 3, 12, 10)
    with torch.no_grad():
        torch.testing.assert_close(classify_logits(model, x, TTAConfig()), (model(x) + model(x.flip(-1))) / 2)
        c = 8
        # torchvision's order: top-left, top-right, bottom-left, bottom-right, centre; then the same of the flip
        crops = [x[..., :c, :c], x[..., :c, -c:], x[..., -c:, :c], x[..., -c:, -c:], x[..., 2:10, 1:9]]
        flipped = x.flip(-1)
        crops += [flipped[..., :c, :c], flipped[..., :c, -c:], flipped[..., -c:, :c], flipped[..., -c:, -c:]]
        crops += [flipped[..., 2:10, 1:9]]
        expected = torch.stack([model(v) for v in crops]).mean(0)
        torch.testing.assert_close(classify_logits(model, x, TTAConfig(ten_crop=8)), expected)
        five = torch.stack([model(v) for v in crops[:5]]).mean(0)
        torch.testing.assert_close(classify_logits(model, x, TTAConfig(hflip=False, ten_crop=8)), five)
    with pytest.raises(ValueError, match="ten_crop 16 is larger"):
        classify_logits(model, x, TTAConfig(ten_crop=16))


def test_classification_task_evaluates_with_the_views() -> None:
    torch.manual_seed(0)
    task = ClassificationTask(num_classes=3, fc_channels=8, tta={"hflip": True}, **TINY).eval()
    batch = {"image": torch.rand(2, 3, 32, 32), "label": torch.tensor([0, 2])}
    task.eval_epoch_start("val")
    with torch.no_grad():
        task.eval_step(batch)
        logits = (task.model(batch["image"]) + task.model(batch["image"].flip(-1))) / 2
    expected = F.cross_entropy(logits, batch["label"], reduction="sum")
    torch.testing.assert_close(task._eval_loss[0], expected)


def test_reid_flip_averages_the_embeddings_and_normalises_again() -> None:
    torch.manual_seed(0)
    task = ReIDTask(num_classes=4, tta={"hflip": True}, **TINY).eval()
    x = torch.rand(2, 3, 64, 32)
    with torch.no_grad():
        a, b = task.model(x), task.model(x.flip(-1))
        got = reid_embeddings(task.model, x, task.tta, normalize=True)
        out = task.predict_step({"image": x, "index": torch.arange(2), "skipped": []}, 0)["embedding"]
    torch.testing.assert_close(got, F.normalize((a + b) / 2, dim=1))
    torch.testing.assert_close(out, got)
    assert not torch.allclose(got, a, atol=1e-4)
    torch.testing.assert_close(
        reid_embeddings(lambda t: t.mean((2, 3)), x, TTAConfig(), normalize=False), x.mean((2, 3))
    )


class _FixedDetector(nn.Module):
    """Returns fixed detections for an image and others for its mirror image (told apart by a marker pixel)."""

    nms_thresh = 0.5
    detections_per_img = 10

    def forward(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        out = []
        for im in images:
            if im[0, 0, 0] == 1:  # the image as given
                boxes, scores, labels = [[10.0, 20.0, 30.0, 40.0]], [0.9], [1]
            else:  # its flip (width 100): the same object, one more of class 2, and one of class 1 overlapping
                boxes = [[70.0, 20.0, 90.0, 40.0], [0.0, 0.0, 10.0, 10.0], [70.5, 20.0, 90.0, 40.0]]
                scores, labels = [0.8, 0.5, 0.7], [1, 2, 2]
            out.append({"boxes": torch.tensor(boxes), "scores": torch.tensor(scores), "labels": torch.tensor(labels)})
        return out


def test_detection_flip_unflips_boxes_exactly_and_merges_them_by_class() -> None:
    image = torch.zeros(3, 50, 100)
    image[0, 0, 0] = 1
    model = _FixedDetector()
    assert detect_outputs(model, [image], None)[0]["scores"].tolist() == pytest.approx(
        [0.9]
    )  # off: the model's own output
    got = detect_outputs(model, [image], TTAConfig())[0]
    # the flipped pass's class-1 box is the same box (suppressed, lower score); its class-2 boxes survive
    assert got["boxes"].tolist() == [[10.0, 20.0, 30.0, 40.0], [10.0, 20.0, 29.5, 40.0], [90.0, 0.0, 100.0, 10.0]]
    assert got["scores"].tolist() == pytest.approx([0.9, 0.7, 0.5]) and got["labels"].tolist() == [1, 2, 2]
    # a stricter IoU than the model's keeps the duplicate too
    loose = detect_outputs(model, [image], TTAConfig(nms_iou=1.0))[0]
    assert len(loose["scores"]) == 4


def test_detection_task_evaluates_and_predicts_with_the_merged_passes() -> None:
    from tasks.data.detection import DetectionBatch
    from tasks.tta import model_nms

    task = DetectionTask(classes=["a", "b"], tta={"hflip": True}, min_size=64, max_size=96, **TINY)
    assert model_nms(task.model) == (task.model.roi_heads.nms_thresh, task.model.roi_heads.detections_per_img)
    task.model = _FixedDetector()  # known detections for the image and for its flip
    image = torch.zeros(3, 50, 100)
    image[0, 0, 0] = 1
    batch = DetectionBatch([image], [{"image_id": 7, "path": "a.png", "out_name": "a"}])
    task.eval_epoch_start("val")
    task.eval_step(batch)
    predicted = task.predict_step(batch, 0)[0]
    expected = [[10.0, 20.0, 30.0, 40.0], [10.0, 20.0, 29.5, 40.0], [90.0, 0.0, 100.0, 10.0]]
    assert task._predictions[7]["boxes"].tolist() == expected == predicted["boxes"].tolist()


def test_an_option_of_another_task_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="scales not used by detect"):
        tta_config({"scales": [1.0, 1.5]}, "detect")
    with pytest.raises(ValueError, match="ten_crop not used by segment"):
        SegmentationTask(num_classes=3, family="fcn32s", tta={"ten_crop": 8}, **TINY)
    with pytest.raises(ValueError, match="scales must be positive"):
        TTAConfig(scales=[0.0])


def test_cli_validate_an_ema_checkpoint_with_tta(tmp_path: Path) -> None:
    """``fit`` with ``model.ema`` from YAML, then ``validate --ckpt_path ... --model.tta ...`` on its checkpoint."""
    from test_classify_cli import _config, _tree

    from tasks.classify import main

    _tree(tmp_path / "tree")
    cfg = yaml.safe_load(_config(tmp_path).read_text())
    cfg["model"].pop("predict_file")
    cfg["model"]["ema"] = {"decay": 0.5, "warmup": False}
    cfg["test_after_fit"] = {"enabled": False}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fixture's unreadable image
        main(["fit", "--config", str(path)])
        last = str(tmp_path / "runs" / "version_0" / "checkpoints" / "last.ckpt")
        main(["validate", "--config", str(path), "--ckpt_path", last])
        main(["validate", "--config", str(path), "--ckpt_path", last, "--model.tta", "{hflip: true}"])
    runs = [tmp_path / "runs" / f"version_{v}" for v in (1, 2)]
    plain, flipped = (json.loads((r / "val_metrics.json").read_text()) for r in runs)
    hparams = [yaml.unsafe_load((r / "hparams.yaml").read_text()) for r in runs]
    assert hparams[0]["ema"].decay == 0.5 and hparams[0]["tta"] is None  # the checkpoint's options
    assert hparams[1]["tta"].hflip is True and hparams[1]["ema"].decay == 0.5
    assert plain["num_images"] == flipped["num_images"] == 9
    assert plain["loss"] != flipped["loss"]  # the flipped views were averaged in
