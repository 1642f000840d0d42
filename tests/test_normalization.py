"""Input normalisation travels with the weights into every task model.

Every builder takes ``normalization`` and every task model takes ``[0, 1]`` RGB images,
normalises them itself and says how (``model.normalization``). A model trained from Caffe
(BGR, 0-255) weights gives the same outputs after a checkpoint, ``load_from_checkpoint`` and
an ONNX export as the model that was trained.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from backbone_utils import randomize_, tap_slices
from torch import nn
from torch.testing import assert_close
from torchvision.models import vgg as tv_vgg

from vggbackbone import CAFFE, IMAGENET, InputNormalization, VGGBackbone
from vggbackbone.models import (
    fasterrcnn_vgg,
    fcn_vgg,
    fcos_vgg,
    reid_vgg,
    retinanet_vgg,
    ssd_vgg,
    unet_vgg,
    vgg_classifier,
)
from vggbackbone.weights import resolve_normalization

W = 0.0625
DET = {"width_mult": W, "min_size": 64, "max_size": 64}
BUILDERS = {
    "fasterrcnn_vgg": lambda **kw: fasterrcnn_vgg("vgg11", 3, **DET, **kw),
    "fasterrcnn_vgg_fpn": lambda **kw: fasterrcnn_vgg("vgg11", 3, fpn=True, **DET, **kw),
    "retinanet_vgg": lambda **kw: retinanet_vgg("vgg11", 3, **DET, **kw),
    "fcos_vgg": lambda **kw: fcos_vgg("vgg11", 3, **DET, **kw),
    "ssd_vgg": lambda **kw: ssd_vgg("vgg11", num_classes=3, width_mult=W, **kw),
    "fcn_vgg": lambda **kw: fcn_vgg("vgg11", 3, width_mult=W, **kw),
    "unet_vgg": lambda **kw: unet_vgg("vgg11", 3, width_mult=W, decoder_channels=[8] * 5, **kw),
    "reid_vgg": lambda **kw: reid_vgg("vgg11", width_mult=W, **kw),
    "vgg_classifier": lambda **kw: vgg_classifier("vgg11", 3, width_mult=W, fc_channels=16, **kw),
}
#: py-faster-rcnn's PIXEL_MEANS (BGR, 0-255), the statistics of its Caffe VGG16 weights
FRCNN_BGR_MEAN = [102.9801, 115.9465, 122.7717]
CUSTOM = InputNormalization((0.5, 0.4, 0.3), (0.2, 0.25, 0.3), "custom")


@pytest.mark.parametrize("name", list(BUILDERS))
def test_every_task_model_takes_normalization_and_says_what_it_applies(name: str) -> None:
    build = BUILDERS[name]
    assert build().normalization == IMAGENET  # default without weights: ImageNet's
    assert build(normalization="caffe").normalization == CAFFE
    model = build(normalization={"mean": list(CUSTOM.mean), "std": list(CUSTOM.std)})
    assert model.normalization == CUSTOM
    transform = getattr(model, "transform", None)
    if transform is not None:  # torchvision detectors normalise in GeneralizedRCNNTransform
        assert transform.image_mean == list(CUSTOM.mean) and transform.image_std == list(CUSTOM.std)


@pytest.mark.parametrize("name", ["fcn_vgg", "unet_vgg"])
def test_segmentation_models_normalise_their_0_1_input_once(name: str) -> None:
    model = BUILDERS[name](normalization=CUSTOM).eval()
    x = torch.rand(2, 3, 40, 48)
    with torch.no_grad():
        inside = model(x)
        model.input_norm = nn.Identity()  # the same net fed pre-normalised images
        outside = model(CUSTOM(x))
    assert_close(inside, outside, rtol=0, atol=0)


def test_caffe_statistics_in_caffe_notation() -> None:
    """py-faster-rcnn writes BGR 0-255 means; the dict form takes them as written."""
    norm = resolve_normalization({"mean": FRCNN_BGR_MEAN, "std": [1, 1, 1], "space": "bgr255"})
    assert norm.name == "caffe"  # named caffe: conv1_1 of non-native weights is flipped to RGB
    assert norm.mean == pytest.approx([m / 255 for m in reversed(FRCNN_BGR_MEAN)])
    assert norm.std == pytest.approx([1 / 255] * 3)
    rgb255 = resolve_normalization(
        {"mean": [123.675, 116.28, 103.53], "std": [58.395, 57.12, 57.375], "space": "rgb255"}
    )
    assert rgb255.mean == pytest.approx(IMAGENET.mean) and rgb255.std == pytest.approx(IMAGENET.std, rel=1e-3)
    assert resolve_normalization(norm.to_dict()) == norm  # what checkpoints and weights files store


# ----------------------------------------------------------------------------- Caffe weights
def caffe_weights(tmp_path: Path) -> tuple[Path, nn.Sequential]:
    """A torchvision-layout vgg11 file at width ``W`` standing for Caffe's BGR 0-255 weights
    (as PyTorch reimplementations distribute them), and the network it holds."""
    bb = VGGBackbone("vgg11", ["pool5"], width_mult=W)
    widths = [m.out_channels for m in bb.modules() if isinstance(m, nn.Conv2d)]
    cfg: list[int | str] = []
    for layer in tv_vgg.cfgs["A"]:
        cfg.append("M" if layer == "M" else widths.pop(0))
    net = randomize_(tv_vgg.make_layers(cfg), seed=3).eval()
    path = tmp_path / "vgg11_caffe.pth"
    torch.save({f"features.{k}": v for k, v in net.state_dict().items()}, path)
    return path, net


def caffe_input(rgb: torch.Tensor, bgr_mean: list[float]) -> torch.Tensor:
    """What the Caffe network was trained on: BGR, 0-255, minus the BGR mean."""
    return rgb.flip(-3) * 255 - torch.tensor(bgr_mean).view(3, 1, 1)


@pytest.mark.parametrize("fpn", [False, True])
def test_detector_on_caffe_weights_sees_what_caffe_saw(tmp_path, fpn: bool) -> None:
    """GeneralizedRCNNTransform's mean/std on [0, 1] RGB plus conv1_1 flipped at load reproduce
    Caffe's BGR 0-255 mean-subtracted input exactly (up to float rounding)."""
    path, net = caffe_weights(tmp_path)
    norm = {"mean": FRCNN_BGR_MEAN, "std": [1, 1, 1], "space": "bgr255"}
    model = fasterrcnn_vgg("vgg11", 3, path, fpn=fpn, normalization=norm, **DET).eval()
    rgb = torch.rand(3, 64, 64)
    with torch.no_grad():
        images, _ = model.transform([rgb])
        body = model.backbone.body if fpn else model.backbone
        got = body(images.tensors)
        expected = net[: tap_slices(net)["conv5"]](caffe_input(rgb, FRCNN_BGR_MEAN)[None])
    assert_close(next(reversed(got.values())), expected, rtol=1e-4, atol=1e-3)
    # without the Caffe normalisation the same file gives other features (the test can fail)
    plain = fasterrcnn_vgg("vgg11", 3, path, fpn=fpn, **DET).eval()
    with torch.no_grad():
        other = (plain.backbone.body if fpn else plain.backbone)(plain.transform([rgb])[0].tensors)
    assert not torch.allclose(next(reversed(other.values())), expected, rtol=1e-2, atol=1e-1)


def _onnx_run(path: Path, x: torch.Tensor) -> list:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})


def test_segmentation_trained_from_caffe_weights_survives_checkpoint_and_onnx(tmp_path) -> None:
    import pytorch_lightning as pl

    from tasks.checkpoint import WEIGHTS_IN_CHECKPOINT
    from tasks.optim import OptimConfig
    from tasks.segment import SegmentationTask
    from vggbackbone.models.export import export_task_onnx

    path, _ = caffe_weights(tmp_path)
    task = SegmentationTask(
        num_classes=3, family="unet", arch="vgg11", width_mult=W, decoder_channels=[8] * 5,
        weights_backbone=str(path), normalization="caffe", optim=OptimConfig(name="sgd", lr=0.01),
    )  # fmt: skip
    assert task.normalization == CAFFE
    g = torch.Generator().manual_seed(0)
    batches = [
        {
            "image": torch.randint(0, 256, (2, 3, 48, 48), dtype=torch.uint8, generator=g),
            "mask": torch.randint(0, 3, (2, 48, 48), generator=g),
            "id": ["a", "b"],
        }
        for _ in range(2)
    ]
    before = task.model.backbone.features.conv1.conv1_1.weight.detach().clone()
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
    )  # fmt: skip
    trainer.fit(task, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    assert not torch.equal(before, task.model.backbone.features.conv1.conv1_1.weight)  # it trained
    task.eval()
    image = torch.randint(0, 256, (3, 48, 56), dtype=torch.uint8, generator=g)
    expected = task.predict_logits(image)

    ckpt = tmp_path / "seg.ckpt"
    trainer.save_checkpoint(ckpt)
    loaded = SegmentationTask.load_from_checkpoint(ckpt, map_location="cpu").eval()
    assert loaded.normalization == CAFFE
    assert_close(loaded.predict_logits(image), expected, rtol=0, atol=0)
    # the stored normalisation is enough: the weights file is not needed to rebuild it
    assert torch.load(ckpt, weights_only=False)["hyper_parameters"]["weights_backbone"] == WEIGHTS_IN_CHECKPOINT
    path.unlink()
    rebuilt = SegmentationTask.load_from_checkpoint(ckpt, map_location="cpu").eval()
    assert rebuilt.normalization == CAFFE
    assert_close(rebuilt.predict_logits(image), expected, rtol=0, atol=0)
    wrong = SegmentationTask.load_from_checkpoint(ckpt, weights_backbone=None, normalization="imagenet").eval()
    assert not torch.allclose(wrong.predict_logits(image), expected)

    onnx = export_task_onnx(rebuilt.export_model(), tmp_path / "seg.onnx", torch.rand(1, 3, 48, 56))
    (logits,) = _onnx_run(onnx, image[None].float() / 255)
    assert_close(torch.from_numpy(logits), expected, rtol=1e-4, atol=1e-4)


def test_detection_trained_from_caffe_weights_through_the_cli(tmp_path) -> None:
    from tasks.detect import DetectionTask, main
    from vggbackbone.models.export import export_task_onnx

    path, _ = caffe_weights(tmp_path)
    cfg = {
        "trainer": {
            "accelerator": "cpu", "max_steps": 2, "logger": False, "enable_progress_bar": False,
            "enable_model_summary": False, "num_sanity_val_steps": 0, "limit_val_batches": 0,
            "default_root_dir": str(tmp_path / "runs"),
        },
        "model": {
            "arch": "vgg11", "fpn": True, "anchor_sizes": [16, 32, 64, 128], "weights_backbone": str(path),
            "normalization": {"mean": FRCNN_BGR_MEAN, "std": [1, 1, 1], "space": "bgr255"},
            "detector": {"box_score_thresh": 0.0, "rpn_post_nms_top_n_test": 50}, **DET,
        },
        "data": {
            "root": str(tmp_path / "shapes"),
            "shapes": {"num_train": 4, "num_val": 1, "min_image_size": 64, "max_image_size": 64, "seed": 1},
            "batch_size": 2, "num_workers": 0,
        },
    }  # fmt: skip
    (tmp_path / "detect.yaml").write_text(yaml.safe_dump(cfg))
    cli = main(["fit", "--config", str(tmp_path / "detect.yaml")])
    trained = cli.model.eval()
    assert trained.model.normalization.name == "caffe"
    assert trained.model.transform.image_mean == pytest.approx([m / 255 for m in reversed(FRCNN_BGR_MEAN)])
    image = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = trained([image])[0]
    assert len(expected["boxes"]) > 0

    ckpt = tmp_path / "det.ckpt"
    cli.trainer.save_checkpoint(ckpt)
    path.unlink()  # the checkpoint holds the weights and the normalisation
    loaded = DetectionTask.load_from_checkpoint(ckpt, map_location="cpu").eval()
    assert loaded.model.normalization == trained.model.normalization
    with torch.no_grad():
        got = loaded([image])[0]
    for key in ("boxes", "labels", "scores"):
        assert_close(got[key], expected[key], rtol=0, atol=0)

    onnx = export_task_onnx(loaded.export_model(), tmp_path / "det.onnx", image)
    boxes, labels, scores = _onnx_run(onnx, image)
    assert_close(torch.from_numpy(scores), expected["scores"], rtol=1e-4, atol=1e-4)
    assert_close(torch.from_numpy(boxes), expected["boxes"], rtol=1e-4, atol=1e-3)
    assert torch.equal(torch.from_numpy(labels), expected["labels"])
