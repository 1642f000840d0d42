"""An evaluation that produced no metric fails, naming the split and why: ReID ``validate``/``test`` whose
query (or gallery) images are all unreadable, and in every task an evaluation whose metrics are all NaN
(:func:`tasks.reporting.publish_metrics`). Never exit 0 with no metric and no metrics file."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from cli_configs import REPO, quick_trainer, tiny_segment_config, write_config
from PIL import Image

from tasks.data.market import MarketConfig, generate_market
from tasks.data.voc import voc_palette

TINY_MARKET = MarketConfig(num_train_ids=4, num_test_ids=4, num_cameras=2, min_cameras=2, max_cameras=2,
                           max_per_camera=2, num_distractors=1, num_junk=1, height=32, width=16, seed=5)  # fmt: skip


def _reid_config(tmp: Path) -> tuple[Path, Path]:
    """``(config, data root)``: a tiny Market-1501 tree and a quick ReID evaluation on it."""
    root = generate_market(tmp / "market", TINY_MARKET, progress=False)
    cfg = {
        "seed_everything": 0,
        "trainer": quick_trainer(tmp, logger="reid"),
        "model": {"arch": "vgg11_bn", "width_mult": 0.125, "grid_queries": 0},
        "data": {"root": str(root), "image_size": [32, 16], "eval_batch_size": 8, "num_workers": 0},
    }
    return write_config(cfg, tmp / "reid.yaml"), root


def _unreadable(folder: Path) -> int:
    images = sorted(folder.glob("*.jpg"))
    for image in images:
        image.write_bytes(b"not a jpeg")
    return len(images)


def test_reid_validate_with_every_query_unreadable_fails_naming_the_split(tmp_path: Path) -> None:
    """The CLI in a subprocess: exit non-zero, the message names the query split and the skipped count."""
    cfg, root = _reid_config(tmp_path)
    n = _unreadable(root / "query")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, "-m", "tasks.reid", "validate", "--config", str(cfg)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert (
        f"val evaluation of ReIDTask produced no metric: val split: no query image embedded: {n} of {n} query "
        "images unreadable (skipped), e.g. " in proc.stderr
    ), proc.stderr[-3000:]
    assert not list((tmp_path / "runs").rglob("*_metrics.json"))


def test_reid_test_with_every_gallery_image_unreadable_fails(tmp_path: Path) -> None:
    from tasks.reid import main

    cfg, root = _reid_config(tmp_path)
    assert _unreadable(root / "bounding_box_test")
    with pytest.raises(
        RuntimeError,
        match=r"test evaluation of ReIDTask produced no metric: test split: no gallery image embedded: (\d+) of \1 "
        r"gallery images unreadable \(skipped\), e\.g\. .*bounding_box_test.*\(\d+ query, 0 gallery images embedded\)",
    ):
        main(["test", "--config", str(cfg)])
    assert not list((tmp_path / "runs").rglob("*_metrics.json"))


def test_an_evaluation_whose_metrics_are_all_nan_fails(tmp_path: Path) -> None:
    """Segmentation validation where every pixel is "ignore": mIoU, accuracies NaN; only the loss is a number."""
    from tasks.segment import main

    cfg = tiny_segment_config(tmp_path)
    main(["validate", "--config", str(cfg)])  # generates the data; a metric as usual
    (report,) = (tmp_path / "runs").rglob("val_metrics.json")
    report.unlink()
    voc = tmp_path / "shapes" / "VOCdevkit" / "VOC2007"
    for sid in (voc / "ImageSets" / "Segmentation" / "val.txt").read_text().split():
        mask = voc / "SegmentationClass" / f"{sid}.png"
        w, h = Image.open(mask).size
        ignored = Image.fromarray(np.full((h, w), 255, np.uint8), mode="P")
        ignored.putpalette(voc_palette())
        ignored.save(mask)
    nothing = r"val evaluation of SegmentationTask produced no metric: every metric is NaN"
    with pytest.raises(RuntimeError, match=nothing):
        main(["validate", "--config", str(cfg)])
    assert not list((tmp_path / "runs").rglob("val_metrics.json"))
