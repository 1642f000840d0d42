"""One ``fit`` step through the CLI for each new data layout: segmentation ``folders`` (with
``median_frequency`` weights and ``ignore_index`` 11) and ``pairs`` (re-rooted, with a label map),
classification ``csv``
(``cityscapes`` and ``ade20k`` run as the shipped recipes in ``tests/test_recipes.py``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_configs import csv_versions, quick_trainer, write_config
from PIL import Image

from tasks.data.class_weights import CACHE_NAME
from tasks.segment import main as segment_main

SEG_MODEL = {"family": "unet", "arch": "vgg11_bn", "width_mult": 0.0625, "decoder_channels": [8, 8, 8, 8, 8],
             "optim": {"name": "adamw", "lr": 0.001}}  # fmt: skip


def _seg_tree(root: Path, void: int, fg: int = 1) -> None:
    rng = np.random.default_rng(0)
    for split, names in (("train", ("a", "b")), ("val", ("c",))):
        for name in names:
            (root / "img" / split).mkdir(parents=True, exist_ok=True)
            (root / "ann" / split).mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / f"img/{split}/{name}.png")
            mask = np.zeros((32, 32), np.uint8)
            mask[8:24, 8:24] = fg
            mask[:2] = void
            Image.fromarray(mask).save(root / f"ann/{split}/{name}_mask.png")


def _fit(task: str, cfg: dict, tmp: Path) -> dict:
    import importlib

    importlib.import_module(f"tasks.{task}").main(["fit", "--config", str(write_config(cfg, tmp / "cfg.yaml"))])
    return json.loads((csv_versions(tmp)[-1] / "val_metrics.json").read_text())


def test_fit_folders_with_median_frequency_and_ignore_index_11(tmp_path: Path) -> None:
    _seg_tree(tmp_path / "data", void=11)
    data = {"root": str(tmp_path / "data"), "layout": "folders", "classes": ["bg", "box"], "ignore_index": 11,
            "image_dir": "img/{split}", "mask_dir": "ann/{split}", "image_suffix": ".png",
            "mask_suffix": "_mask.png", "crop_size": 32, "batch_size": 2, "num_workers": 0}  # fmt: skip
    model = {**SEG_MODEL, "class_weights": "median_frequency"}
    cfg = {"trainer": quick_trainer(tmp_path, limit_train_batches=1), "model": model, "data": data}
    metrics = _fit("segment", cfg, tmp_path)
    assert np.asarray(metrics["confusion_matrix"]).sum() == 32 * 30  # the two rows of 11 not counted
    assert set(metrics["class_acc"]) == {"bg", "box"} and "IoU/box" in metrics
    assert json.loads((tmp_path / "data" / CACHE_NAME).read_text())["format"] == "vggbackbone-class-weights/1"
    hparams = (csv_versions(tmp_path)[-1] / "hparams.yaml").read_text()
    assert "ignore_index: 11" in hparams and "class_weights: median_frequency" in hparams
    # per image 960 labelled pixels, 704 bg and 256 box: freq 704/960, 256/960, median 480/960
    (ckpt,) = (tmp_path / "runs").rglob("last.ckpt")
    stored = torch.load(ckpt, map_location="cpu", weights_only=True)["median_frequency_weights"]
    assert stored == pytest.approx([480 / 704, 480 / 256])
    # test needs no training masks: the checkpoint's weights give the same weighted loss
    shutil.rmtree(tmp_path / "data/ann/train")
    segment_main(["test", "--config", str(tmp_path / "cfg.yaml"), "--ckpt_path", str(ckpt)])
    test = json.loads((csv_versions(tmp_path)[-1] / "test_metrics.json").read_text())
    assert test["loss"] == pytest.approx(metrics["loss"], rel=1e-6)


def test_fit_pairs_with_a_label_map(tmp_path: Path) -> None:
    _seg_tree(tmp_path / "data", void=255, fg=100)
    for split in ("train", "val"):
        lines = [f"/mnt/old/img/{split}/{p.name[:-9]}.png /mnt/old/ann/{split}/{p.name}\n"
                 for p in sorted((tmp_path / "data/ann" / split).iterdir())]  # fmt: skip
        (tmp_path / f"data/{split}.txt").write_text("".join(lines))
    data = {"root": str(tmp_path / "data"), "layout": "pairs", "classes": ["bg", "box"],
            "path_prefix": {"/mnt/old": "."}, "label_map": {0: 0, 100: 1}, "crop_size": 32, "batch_size": 2,
            "num_workers": 0}  # fmt: skip
    cfg = {"trainer": quick_trainer(tmp_path, limit_train_batches=1), "model": SEG_MODEL, "data": data}
    metrics = _fit("segment", cfg, tmp_path)
    conf = np.asarray(metrics["confusion_matrix"])
    assert conf.sum() == 32 * 30 and conf[1].sum() == 16 * 16  # the raw 100 box is class 1


def test_fit_classification_csv(tmp_path: Path) -> None:
    root = tmp_path / "data"
    (root / "img").mkdir(parents=True)
    rows = {"train": [], "val": []}
    for k in range(6):
        Image.fromarray(np.full((12, 12), 40 * k, np.uint8)).save(root / f"img/{k}.png")
        rows["train" if k < 4 else "val"].append(f"img/{k}.png,{'dark' if k % 2 else 'light'}\n")
    for split, lines in rows.items():
        (root / f"{split}.csv").write_text("path,label\n" + "".join(lines))
    data = {"root": str(root), "layout": "csv", "test_split": "val", "in_channels": 1, "image_size": 8,
            "resize_size": 8, "batch_size": 2, "num_workers": 0}  # fmt: skip
    model = {"arch": [[1, 8], [1, 8]], "fc_channels": 16, "dropout": 0.0, "optim": {"name": "adamw", "lr": 0.001}}
    cfg = {"trainer": quick_trainer(tmp_path, limit_train_batches=1), "model": model, "data": data}
    metrics = _fit("classify", cfg, tmp_path)
    assert 0.0 <= metrics["acc1"] <= 1.0
    assert "- dark\n- light" in (csv_versions(tmp_path)[-1] / "hparams.yaml").read_text()
