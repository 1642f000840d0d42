"""Runs that cannot produce anything stop with a clear error: every image of a split unreadable, or a
checkpoint folder that cannot be written (found before the first training step)."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
from cli_configs import DETECT_SHAPES, detect_config

from tasks.data.shapes import ShapesConfig, generate_shapes


def _shapes(tmp: Path) -> Path:
    return generate_shapes(tmp / "shapes", ShapesConfig(**DETECT_SHAPES), progress=False)


@pytest.mark.parametrize("split", ["val", "train"])
def test_every_image_of_a_split_unreadable_stops_fit_without_a_checkpoint(tmp_path: Path, split: str) -> None:
    from tasks.detect import main

    for image in (_shapes(tmp_path) / "images" / split).glob("*.jpg"):
        image.write_bytes(b"not a jpeg")
    message = "the val split" if split == "val" else "the training split"
    with pytest.raises(RuntimeError, match=rf"every image of {message} was unreadable \(\d+ skipped on this proc"):
        main(["fit", "--config", str(detect_config(tmp_path))])
    assert not list((tmp_path / "runs").rglob("*.ckpt"))
    assert not list((tmp_path / "runs").rglob("val_metrics.json"))


class _Steps(pl.Callback):
    def __init__(self) -> None:
        self.steps = 0

    def on_train_batch_start(self, *args) -> None:
        self.steps += 1


def test_an_unwritable_checkpoint_folder_is_found_before_training(tmp_path: Path) -> None:
    from tasks.cli import cli_main
    from tasks.detect import DetectionDataModule, DetectionTask, DetectionWriter

    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the checkpoint folder's parent should be")  # root ignores permissions
    links = [("data.classes", "model.classes", "instantiate")]
    args = ["--config", str(detect_config(tmp_path)), "--checkpoint.dirpath", str(blocker / "ckpts")]
    cli = cli_main(DetectionTask, DetectionDataModule, task="detect", monitor=("val/AP", "max"), links=links,
                   callbacks={"writer": DetectionWriter}, args=args, run=False)  # fmt: skip
    steps = _Steps()
    cli.trainer.callbacks.append(steps)
    with pytest.raises(PermissionError, match=rf"checkpoint folder {blocker / 'ckpts'} cannot be written"):
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert steps.steps == 0
