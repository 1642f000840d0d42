"""``python -m tasks.segment`` end to end, including 2-process DDP (CPU, gloo) vs 1 process."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
from cli_configs import run_module, segment_config
from PIL import Image


@pytest.mark.slow
def test_ddp_two_processes_equal_one_process_then_predict(tmp_path: Path) -> None:
    cfg = segment_config(tmp_path)
    ddp = ["--trainer.strategy", "ddp", "--trainer.devices", "2"]
    fit = run_module("tasks.segment", ["fit", "--config", str(cfg), *ddp])
    assert "mIoU" in fit.stdout  # the metrics table printed once, by rank 0
    fit_dir = tmp_path / "runs/seg/version_0"
    two = json.loads((fit_dir / "val_metrics.json").read_text())
    ckpt = fit_dir / "checkpoints/last.ckpt"
    assert ckpt.is_file()

    run_module("tasks.segment", ["validate", "--config", str(cfg), "--ckpt_path", str(ckpt), "--trainer.devices", "1"])
    one = json.loads((tmp_path / "runs/seg/version_1/val_metrics.json").read_text())
    conf = np.array(one["confusion_matrix"])
    # every validation pixel counted exactly once in both runs (7 images: 4 + 3 over 2 ranks)
    masks = [
        np.array(Image.open(p))
        for p in sorted((tmp_path / "shapes/VOCdevkit/VOC2007/SegmentationClass").glob("*.png"))[-7:]
    ]
    assert conf.sum() == sum(int((m != 255).sum()) for m in masks)
    assert (conf.sum(0) > 0).sum() >= 3  # the model predicts several classes: the matrices say which pixels
    assert two["confusion_matrix"] == one["confusion_matrix"]
    assert two["mIoU"] == one["mIoU"] and two["pixel_acc"] == one["pixel_acc"]

    run_module("tasks.segment", ["predict", "--config", str(cfg), "--ckpt_path", str(ckpt), "--trainer.devices", "1"])
    ids = (tmp_path / "shapes/VOCdevkit/VOC2007/ImageSets/Segmentation/val.txt").read_text().split()
    for sid in ids:
        mask = Image.open(tmp_path / "predict" / f"{sid}.png")
        image = Image.open(tmp_path / "shapes/VOCdevkit/VOC2007/JPEGImages" / f"{sid}.jpg")
        assert mask.mode == "P" and mask.size == image.size
        assert int(np.array(mask).max()) < 4
        assert Image.open(tmp_path / "predict" / f"{sid}_overlay.png").size == image.size


class _Killed(pl.Callback):
    """Stops predict after its first batch, as a kill would."""

    def on_predict_batch_end(self, trainer, *args) -> None:
        raise RuntimeError("killed")


def _cli(cfg: Path):
    from tasks.cli import cli_main
    from tasks.segment import LINKS, SegmentationDataModule, SegmentationTask

    return cli_main(
        SegmentationTask, SegmentationDataModule, task="segment", monitor=("val/mIoU", "max"), links=LINKS,
        args=["--config", str(cfg)], run=False,
    )  # fmt: skip


def test_predict_writes_complete_last_and_a_rerun_first_removes_the_earlier_one(tmp_path: Path) -> None:
    cfg = segment_config(tmp_path)
    out = tmp_path / "predict"
    cli = _cli(cfg)
    cli.trainer.predict(cli.model, datamodule=cli.datamodule)  # an earlier run, its marker in its manifest
    assert (out / "_COMPLETE").is_file()
    cli = _cli(cfg)
    cli.trainer.callbacks.append(_Killed())
    with pytest.raises(RuntimeError, match="killed"):
        cli.trainer.predict(cli.model, datamodule=cli.datamodule)
    first = sorted(p.name for p in out.iterdir())
    assert first and "_COMPLETE" not in first  # the masks of the batch done before the kill, no marker

    cli = _cli(cfg)
    cli.trainer.predict(cli.model, datamodule=cli.datamodule)
    ids = (tmp_path / "shapes/VOCdevkit/VOC2007/ImageSets/Segmentation/val.txt").read_text().split()
    assert json.loads((out / "_COMPLETE").read_text()) == {"images": len(ids), "skipped": 0}
    written = [out / f"{sid}{suffix}.png" for sid in ids for suffix in ("", "_overlay")]
    assert sorted(p.name for p in out.iterdir()) == sorted([*(p.name for p in written), "_COMPLETE", "_MANIFEST.json"])
    assert (out / "_COMPLETE").stat().st_mtime_ns >= max(p.stat().st_mtime_ns for p in written)  # written last
