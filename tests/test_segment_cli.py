"""``python -m tasks.segment`` end to end, including 2-process DDP (CPU, gloo) vs 1 process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def _config(tmp: Path) -> Path:
    cfg = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "max_epochs": 1,
            "limit_train_batches": 2,
            "num_sanity_val_steps": 0,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "default_root_dir": str(tmp / "runs"),
            "logger": [
                {
                    "class_path": "pytorch_lightning.loggers.CSVLogger",
                    "init_args": {"save_dir": str(tmp / "runs"), "name": "seg"},
                }
            ],
        },
        "model": {
            # U-Net: its randomly initialised head predicts every class from the first step (FCN's
            # zero-initialised score layers predict background everywhere after 2 steps, which
            # would make the confusion matrices below equal whatever each process evaluated)
            "head": "unet",
            "arch": "vgg11_bn",
            "width_mult": 0.125,
            "decoder_channels": [16, 16, 8, 8, 8],
            "loss": "ce+dice",
            "predict_dir": str(tmp / "predict"),
            "optim": {"name": "adamw", "lr": 0.001, "backbone_lr_mult": 0.5},
        },
        "data": {
            "root": str(tmp / "shapes"),
            "layout": "voc",
            "shapes": {
                "num_train": 8, "num_val": 7, "min_image_size": 40, "max_image_size": 56,
                "min_object_size": 10, "max_object_size": 24,
            },
            "crop_size": 40,
            "batch_size": 2,
            "eval_batch_size": 2,
            "num_workers": 0,
        },
    }  # fmt: skip
    path = tmp / "seg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _run(args: list[str], tmp: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"  # same thread count in every process: bitwise-equal conv results
    proc = subprocess.run(
        [sys.executable, "-m", "tasks.segment", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, f"{args}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-5000:]}"
    return proc


@pytest.mark.slow
def test_ddp_two_processes_equal_one_process_then_predict(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    ddp = ["--trainer.strategy", "ddp", "--trainer.devices", "2"]
    fit = _run(["fit", "--config", str(cfg), *ddp], tmp_path)
    assert "mIoU" in fit.stdout  # the metrics table printed once, by rank 0
    fit_dir = tmp_path / "runs/seg/version_0"
    two = json.loads((fit_dir / "val_metrics.json").read_text())
    ckpt = fit_dir / "checkpoints/last.ckpt"
    assert ckpt.is_file()

    _run(["validate", "--config", str(cfg), "--ckpt_path", str(ckpt), "--trainer.devices", "1"], tmp_path)
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

    _run(["predict", "--config", str(cfg), "--ckpt_path", str(ckpt), "--trainer.devices", "1"], tmp_path)
    ids = (tmp_path / "shapes/VOCdevkit/VOC2007/ImageSets/Segmentation/val.txt").read_text().split()
    for sid in ids:
        mask = Image.open(tmp_path / "predict" / f"{sid}.png")
        image = Image.open(tmp_path / "shapes/VOCdevkit/VOC2007/JPEGImages" / f"{sid}.jpg")
        assert mask.mode == "P" and mask.size == image.size
        assert int(np.array(mask).max()) < 4
        assert Image.open(tmp_path / "predict" / f"{sid}_overlay.png").size == image.size
