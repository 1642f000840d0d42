"""Nothing from non-finite numbers: NaN/inf losses stop training, and no checkpoint, metric or output is
written from non-finite weights or outputs (every task, through :class:`tasks.module.TaskModule`)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from cli_configs import tiny_segment_config
from torch import nn

from tasks.cli import cli_main


def _segment_cli(cfg: Path, *args: str):
    from tasks.segment import SegmentationDataModule, SegmentationTask

    return cli_main(
        SegmentationTask, SegmentationDataModule, task="segment", monitor=("val/mIoU", "max"),
        links=[("data.num_classes", "model.num_classes", "instantiate")],
        args=["--config", str(cfg), *args], run=False,
    )  # fmt: skip


def test_nan_loss_stops_segmentation_naming_the_step_and_writes_no_checkpoint(tmp_path: Path) -> None:
    from tasks.segment import main

    cfg = tiny_segment_config(tmp_path, lr=1e30)
    with pytest.raises(FloatingPointError, match=r"non-finite training loss .* at step \d+ \(epoch 0\): train/loss="):
        main(["fit", "--config", str(cfg)])
    assert not list((tmp_path / "runs").rglob("*.ckpt"))
    assert not list((tmp_path / "runs").rglob("*_metrics.json"))


def test_a_checkpoint_of_nonfinite_weights_is_refused_naming_the_tensors(tmp_path: Path) -> None:
    cli = _segment_cli(tiny_segment_config(tmp_path))
    module = cli.model
    name, param = next(iter(module.named_parameters()))
    with torch.no_grad():
        param.view(-1)[0] = float("nan")
    state = {"state_dict": module.state_dict()}
    with pytest.raises(FloatingPointError, match=rf"1 of \d+ tensors hold NaN/inf \({re.escape(name)}\)"):
        module.on_save_checkpoint(state)


def test_no_metrics_and_no_prediction_from_nonfinite_weights(tmp_path: Path) -> None:
    cli = _segment_cli(tiny_segment_config(tmp_path))
    with torch.no_grad():
        next(cli.model.model.parameters()).fill_(float("inf"))
    with pytest.raises(FloatingPointError, match=r"val evaluation of SegmentationTask: its weights: 1 of"):
        cli.trainer.validate(cli.model, datamodule=cli.datamodule)
    assert not list((tmp_path / "runs").rglob("*_metrics.json"))
    with pytest.raises(FloatingPointError, match=r"SegmentationTask weights: 1 of"):
        cli.trainer.predict(cli.model, datamodule=cli.datamodule)
    assert not (tmp_path / "predict").exists() or not any((tmp_path / "predict").iterdir())


class _LogMean(nn.Module):
    """An embedding that is -inf for an all-black image (log of its mean)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log(x.mean(dim=(2, 3)))


def test_extract_refuses_nonfinite_embeddings_naming_the_image(tmp_path: Path) -> None:
    from PIL import Image

    from tasks.reid_extract import extract_embeddings

    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (16, 32), (120, 30, 200)).save(images / "a.png")
    Image.new("RGB", (16, 32), (0, 0, 0)).save(images / "b_black.png")
    out = tmp_path / "emb.npz"
    kw = {"image_size": (32, 16), "num_workers": 0, "optimize": False, "trainer": {"accelerator": "cpu"}}
    with pytest.raises(FloatingPointError, match=r"non-finite embedding of b_black\.png"):
        extract_embeddings(_LogMean(), images, out, batch_size=1, **kw)
    assert not out.exists()
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 16, 4))
    with torch.no_grad():
        net[1].bias[1] = float("nan")
    with pytest.raises(FloatingPointError, match=r"weights: 1 of 2 tensors hold NaN/inf \(model\.1\.bias\)"):
        extract_embeddings(net, images, out, **kw)
    assert not out.exists()


def test_detection_writer_refuses_nonfinite_boxes_naming_the_image(tmp_path: Path) -> None:
    import numpy as np

    from tasks.data.detection import DetectionBatch
    from tasks.detect_writer import DetectionWriter

    writer = DetectionWriter(output_dir=str(tmp_path / "pred"))
    pred = {"image_id": 7, "path": "photos/cat.jpg", "boxes": np.array([[0, 0, np.nan, 4]], np.float32),
            "scores": np.array([0.9], np.float32), "labels": np.array([1])}  # fmt: skip
    batch = DetectionBatch([torch.rand(3, 8, 8)], [{"image_id": torch.tensor(7)}], [])
    with pytest.raises(FloatingPointError, match=r"non-finite boxes or scores for photos/cat\.jpg"):
        writer.write_on_batch_end(None, None, [pred], None, batch, 0, 0)
    assert not (tmp_path / "pred").exists()
