"""Detection ``predict`` into a folder of an earlier run: the earlier output (as its manifest lists it) goes first,
``_COMPLETE`` comes last."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import pytorch_lightning as pl
from cli_configs import detect_config


class _Killed(pl.Callback):
    """Stops predict after its first batch, as a kill would."""

    def on_predict_batch_end(self, trainer, *args) -> None:
        raise RuntimeError("killed")


def _cli(cfg: Path):
    from tasks.cli import cli_main
    from tasks.detect import DetectionDataModule, DetectionTask, DetectionWriter

    links = [
        ("data.classes", "model.classes", "instantiate"),
        ("data.category_ids", "model.category_ids", "instantiate"),
    ]
    return cli_main(
        DetectionTask, DetectionDataModule, task="detect", monitor=("val/AP", "max"), links=links,
        callbacks={"writer": DetectionWriter}, run=False,
        args=["--config", str(cfg), "--writer.score_threshold", "0.0"],
    )  # fmt: skip


def test_a_killed_predict_leaves_no_earlier_results_and_no_complete_marker(tmp_path: Path) -> None:
    out = tmp_path / "pred"
    cli = _cli(detect_config(tmp_path))
    cli.trainer.predict(cli.model, datamodule=cli.datamodule)  # an earlier run's output, in its manifest
    assert len(list((out / "images").glob("*.jpg"))) == 5 and (out / "_COMPLETE").is_file()
    cli = _cli(detect_config(tmp_path))
    cli.trainer.callbacks.append(_Killed())
    with pytest.raises(RuntimeError, match="killed"):
        cli.trainer.predict(cli.model, datamodule=cli.datamodule)
    new = sorted(p.name for p in (out / "images").glob("*.jpg"))
    assert 0 < len(new) < 5  # the pictures of the batch done before the kill; the earlier ones removed
    # no results, no _COMPLETE: the manifest (incomplete) and the journal recording the new pictures
    assert sorted(p.name for p in out.rglob("*")) == sorted(["images", *new, "_MANIFEST.json", "_MANIFEST.json.a0.r0"])
    assert json.loads((out / "_MANIFEST.json").read_text())["complete"] is False

    cli = _cli(detect_config(tmp_path))
    cli.trainer.predict(cli.model, datamodule=cli.datamodule)
    complete = json.loads((out / "_COMPLETE").read_text())
    assert complete["images"] == 5 == len(json.loads((out / "images.json").read_text()))
    assert complete["detections"] == len(json.loads((out / "detections.json").read_text()))
