"""``model.family``: SSD, RetinaNet and FCOS through ``python -m tasks.detect`` (fit, validate on COCO
and VOC, predict through the inference optimisation, export), their own defaults, SSD's augmentation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch
from cli_configs import csv_versions, quick_trainer, shapes_data, write_config
from torchvision import tv_tensors
from torchvision.transforms import v2

from tasks.data.detection import SSD_FILL_MEAN, detection_transforms
from tasks.detect import DetectionTask, main

SHAPES = {
    "num_train": 4,
    "num_val": 3,
    "min_image_size": 64,
    "max_image_size": 96,
    "max_objects": 2,
    "min_object_size": 16,
    "max_object_size": 40,
    "seed": 3,
}
TINY = {"arch": "vgg11_bn", "width_mult": 0.0625}
FAMILIES = {
    # SSD resizes to 300 x 300 inside; the data resizes training images to the same size
    "ssd": ({"size": 300, "detector": {"score_thresh": 0.0}}, {"augment": "ssd", "fixed_size": 300}),
    "retinanet": (
        {"min_size": 96, "max_size": 128, "anchor_sizes": [8, 16, 32, 64, 128], "detector": {"score_thresh": 0.0}},
        {},
    ),
    # FCOS's head has GroupNorm(32, 32) at this width: P7 must be larger than 1 x 1, so >= 129 px
    "fcos": ({"min_size": 160, "max_size": 192, "detector": {"score_thresh": 0.0}}, {}),
}


def _config(tmp: Path, family: str) -> Path:
    model, data = FAMILIES[family]
    cfg = {
        "seed_everything": 0,
        "trainer": quick_trainer(tmp, devices=1, limit_train_batches=2, log_every_n_steps=1),
        "model": {
            "family": family,
            **TINY,
            **model,
            "optim": {"name": "adamw", "lr": 0.001, "scheduler": "cosine"},
        },
        "data": shapes_data(tmp / "shapes", SHAPES, **data),
        "writer": {"output_dir": str(tmp / "pred")},
    }
    return write_config(cfg, tmp / "detect.yaml")


@pytest.fixture(autouse=True)
def _no_pytest_argv(monkeypatch) -> None:
    monkeypatch.setattr("sys.argv", ["python -m tasks.detect"])  # the CLI is given its args


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_fits_validates_on_coco_and_voc_and_predicts(tmp_path, family) -> None:
    cfg = _config(tmp_path, family)
    main(["fit", "--config", str(cfg)])
    run = csv_versions(tmp_path)[-1]
    steps = [r for r in (run / "metrics.csv").read_text().splitlines()[1:] if r]
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 2 and ckpt["hyper_parameters"]["family"] == family and steps
    coco = json.loads((run / "val_metrics.json").read_text())
    assert coco["images"] == SHAPES["num_val"] and 0.0 <= coco["AP50"] <= 1.0

    # the same checkpoint on the VOC layout of the same data: the VOC07 numbers too
    main(
        [
            "validate",
            "--config",
            str(cfg),
            "--ckpt_path",
            str(run / "checkpoints" / "last.ckpt"),
            "--data.layout",
            "voc",
        ]
    )
    voc = json.loads((csv_versions(tmp_path)[-1] / "val_metrics.json").read_text())
    assert 0.0 <= voc["VOC07_mAP"] <= 1.0 and voc["images"] == SHAPES["num_val"]

    # predict runs through InferenceOptimization (BatchNorm folded, channels_last) and writes results
    main(["predict", "--config", str(cfg), "--ckpt_path", str(run / "checkpoints" / "last.ckpt")])
    out = tmp_path / "pred"
    results = json.loads((out / "detections.json").read_text())
    assert results and all(r["category_id"] in (1, 2, 3) and len(r["bbox"]) == 4 for r in results)
    assert len(list((out / "images").glob("*.jpg"))) == SHAPES["num_val"] and (out / "grid.jpg").is_file()


def test_ssd_export_through_the_cli(tmp_path) -> None:
    cfg = _config(tmp_path, "ssd")
    main(["fit", "--config", str(cfg), "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "0"])
    ckpt = csv_versions(tmp_path)[-1] / "checkpoints" / "last.ckpt"
    out = main(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "ssd.onnx"), "--height", "72", "--width", "96"])
    task = DetectionTask.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True).eval()
    image = torch.rand(3, 80, 64)
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    boxes, _, scores = session.run(None, {"image": image.numpy()})
    with torch.no_grad():
        want = task([image])[0]
    assert len(boxes) == len(want["boxes"]) > 0
    np.testing.assert_allclose(np.sort(scores), np.sort(want["scores"].numpy()), rtol=1e-4, atol=1e-5)


def test_each_family_has_its_own_defaults() -> None:
    from vggbackbone.models import fasterrcnn_vgg, fcos_vgg, retinanet_vgg

    for family, builder in (("fasterrcnn", fasterrcnn_vgg), ("retinanet", retinanet_vgg), ("fcos", fcos_vgg)):
        task = DetectionTask(classes=["a", "b"], family=family, **TINY)
        import inspect

        own = inspect.signature(builder).parameters
        for key in ("min_size", "max_size", "anchor_sizes"):
            default = own[key].default
            assert task.hparams[key] == (list(default) if isinstance(default, tuple) else default), (family, key)
        assert task.model.transform.min_size == (own["min_size"].default,)
    ssd = DetectionTask(classes=["a", "b"], family="ssd", **TINY)
    assert ssd.hparams["size"] == 300 and tuple(ssd.model.transform.fixed_size) == (300, 300)
    assert ssd.backbone_path == "model.backbone.body"
    with pytest.raises(ValueError, match="option 'min_size' does not apply to model 'ssd'"):
        DetectionTask(classes=["a"], family="ssd", min_size=300, **TINY)
    with pytest.raises(ValueError, match="option 'size' does not apply to model 'retinanet'"):
        DetectionTask(classes=["a"], family="retinanet", size=512, **TINY)


def test_fixed_size_must_match_the_ssd_size(tmp_path) -> None:
    cfg = _config(tmp_path, "ssd")
    with pytest.raises(ValueError, match=r"data.fixed_size is 512 but the ssd model resizes to \(300, 300\)"):
        main(["fit", "--config", str(cfg), "--data.fixed_size", "512"])
    cfg = _config(tmp_path, "retinanet")
    with pytest.raises(ValueError, match="data.fixed_size is 300 but the retinanet model resizes to min_size"):
        main(["fit", "--config", str(cfg), "--data.fixed_size", "300"])


def test_ssd_augmentation_is_torchvisions_ssd_preset() -> None:
    # torchvision's references/detection/presets.py, data_augmentation="ssd", then our fixed-size resize
    reference = v2.Compose(
        [
            v2.RandomPhotometricDistort(p=0.5),
            v2.RandomZoomOut(fill={tv_tensors.Image: SSD_FILL_MEAN, "others": 0}),
            v2.RandomIoUCrop(),
            v2.RandomHorizontalFlip(p=0.5),
            v2.Resize((96, 96)),
            v2.ToDtype(torch.float32, scale=True),
            v2.SanitizeBoundingBoxes(),
        ]
    )
    ours = detection_transforms(True, hflip=0.5, photometric=0.5, augment="ssd", fixed_size=96)
    gen = torch.Generator().manual_seed(0)
    image = tv_tensors.Image(torch.randint(0, 256, (3, 60, 80), dtype=torch.uint8, generator=gen))
    target = {
        "boxes": tv_tensors.BoundingBoxes(
            [[4.0, 6.0, 40.0, 50.0], [30, 10, 78, 30]], format="XYXY", canvas_size=(60, 80)
        ),
        "labels": torch.tensor([1, 2]),
    }
    changed = 0
    for seed in range(8):
        torch.manual_seed(seed)
        a_img, a_t = ours(image, target)
        torch.manual_seed(seed)
        b_img, b_t = reference(image, target)
        assert a_img.shape == (3, 96, 96) and a_img.dtype == torch.float32
        torch.testing.assert_close(a_img, b_img, rtol=0, atol=0)
        torch.testing.assert_close(a_t["boxes"], b_t["boxes"], rtol=0, atol=0)
        assert torch.equal(a_t["labels"], b_t["labels"])
        assert ((a_t["boxes"] >= 0) & (a_t["boxes"] <= 96)).all()
        changed += not torch.equal(
            a_t["boxes"], target["boxes"].as_subclass(torch.Tensor) * torch.tensor([96 / 80, 96 / 60] * 2)
        )
    assert changed  # crops, zoom-outs and flips happened
    with pytest.raises(ValueError, match="augment must be 'frcnn' or 'ssd'"):
        detection_transforms(True, augment="yolo")


@pytest.mark.parametrize("family", ["fcos"])  # an untrained RetinaNet scores all 300 alike: all at its cut
def test_fcos_and_retinanet_export_checked_as_sets(tmp_path, family) -> None:
    from vggbackbone.export import ExportVerificationError
    from vggbackbone.models import fcos_vgg, retinanet_vgg
    from vggbackbone.models.export import DetectorForExport, export_task_onnx, verify_detector_onnx

    builder = {"fcos": fcos_vgg, "retinanet": retinanet_vgg}[family]
    torch.manual_seed(0)
    # score_thresh 0: an untrained head scores everything alike, the near-ties that reorder FCOS's boxes
    model = builder("vgg11", num_classes=4, width_mult=0.125, min_size=160, max_size=192, score_thresh=0.0).eval()
    image = torch.rand(3, 160, 192)
    path = export_task_onnx(model, tmp_path / f"{family}.onnx", image)  # verified on 2 sizes inside
    other = torch.rand(3, 200, 168)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    boxes, _, scores = session.run(None, {"image": other.numpy()})
    with torch.no_grad():
        want = model([other])[0]
    assert len(boxes) == len(want["boxes"]) == model.detections_per_img
    np.testing.assert_allclose(np.sort(scores), np.sort(want["scores"].numpy()), rtol=1e-4, atol=1e-5)
    twin = np.abs(boxes[:, None] - want["boxes"].numpy()[None]).max(-1).min(1) < 1e-2
    # every box has a twin, but where the detections_per_img cut falls among tied scores (RetinaNet)
    assert (twin | (scores <= scores.min() + 1e-4)).all() and twin.mean() > 0.9
    # another model's detections do not match: the set check can fail
    torch.manual_seed(1)
    wrong = builder("vgg11", num_classes=4, width_mult=0.125, min_size=160, max_size=192, score_thresh=0.0).eval()
    with pytest.raises(ExportVerificationError, match="has no onnxruntime match|detections in onnxruntime"):
        verify_detector_onnx(path, DetectorForExport(wrong), [image])


def _constant_detector_onnx(path, boxes, labels, scores) -> None:
    """An ONNX graph taking ``image`` (3, H, W) and returning fixed detections (for the verifier)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes, outputs = [], []
    for name, value in (("boxes", boxes), ("labels", labels), ("scores", scores)):
        nodes.append(helper.make_node("Constant", [], [name], value=numpy_helper.from_array(value, name)))
        kind = TensorProto.INT64 if value.dtype == np.int64 else TensorProto.FLOAT
        outputs.append(helper.make_tensor_value_info(name, kind, list(value.shape)))
    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, [3, "H", "W"])
    graph = helper.make_graph(nodes, "constant_detector", [image], outputs)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def test_detector_check_lets_only_ties_at_the_cut_go_unmatched(tmp_path) -> None:
    """Detections tied with the lowest kept score may differ between runtimes; any other may not."""
    from vggbackbone.export import ExportVerificationError
    from vggbackbone.models.export import verify_detector_onnx

    boxes = np.array([[0, 0, 10, 10], [20, 20, 40, 40], [50, 50, 60, 70]], np.float32)
    labels = np.array([1, 2, 1], np.int64)

    class Fixed(torch.nn.Module):
        def __init__(self, b, lab, s) -> None:
            super().__init__()
            self.out = (torch.from_numpy(b), torch.from_numpy(lab), torch.from_numpy(s))

        def forward(self, image):
            return self.out

    path = tmp_path / "fixed.onnx"
    image = torch.rand(3, 32, 32)
    # the last kept detection ties with another box at the cut (0.3): each runtime kept a different one
    _constant_detector_onnx(path, boxes, labels, np.array([0.9, 0.8, 0.3], np.float32))
    other = boxes.copy()
    other[2] = [70, 5, 90, 25]
    verify_detector_onnx(path, Fixed(other, labels, np.array([0.9, 0.8, 0.3000001], np.float32)), [image])
    # the same swap above the cut is a real difference
    swapped = boxes.copy()
    swapped[1] = [70, 5, 90, 25]
    with pytest.raises(ExportVerificationError, match=r"PyTorch detection 1 .* no onnxruntime match"):
        verify_detector_onnx(path, Fixed(swapped, labels, np.array([0.9, 0.8, 0.3], np.float32)), [image])
