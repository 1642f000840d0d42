"""Tiny configs for the task CLIs (``python -m tasks.<task> ... --config``), shared by the CLI tests.

Builders return plain dicts, one config section each, that a test completes or overrides as it
needs; :func:`write_config` writes the whole config as YAML. Whole configs that several test
modules run: :func:`detect_config`, :func:`segment_config`, :func:`tiny_segment_config`,
:data:`REID_CONFIG`. Also: the CSVLogger run folders a run leaves (:func:`csv_versions`) and a
CLI run in a subprocess (:func:`run_module`).

Import as ``from cli_configs import ...`` (pytest puts ``tests/`` on ``sys.path``, as for
``backbone_utils``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "DETECT_SHAPES",
    "REID_CONFIG",
    "REPO",
    "SEG_SHAPES",
    "csv_versions",
    "detect_config",
    "fasterrcnn_fpn_model",
    "quick_trainer",
    "run_module",
    "segment_config",
    "shapes_data",
    "tiny_segment_config",
    "write_config",
]

REPO = Path(__file__).resolve().parents[1]


def quick_trainer(
    tmp: Path | None = None, *, logger: str = "csv", accelerator: str | None = "cpu", **overrides: Any
) -> dict[str, Any]:
    """``trainer:`` for one quiet CPU epoch: no sanity validation, progress bar or model summary.

    With ``tmp``, runs go to ``tmp/runs`` and a ``CSVLogger`` writes ``tmp/runs/<logger>/version_<n>``;
    without, Lightning's defaults (relative to the working directory). ``accelerator=None`` leaves
    it to the command line. ``overrides`` win.
    """
    trainer: dict[str, Any] = {
        "max_epochs": 1,
        "num_sanity_val_steps": 0,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    if accelerator is not None:
        trainer["accelerator"] = accelerator
    if tmp is not None:
        runs = str(tmp / "runs")
        trainer["default_root_dir"] = runs
        csv = {"class_path": "pytorch_lightning.loggers.CSVLogger", "init_args": {"save_dir": runs, "name": logger}}
        trainer["logger"] = [csv]
    return trainer | overrides


def shapes_data(root: Path, shapes: Mapping[str, Any], **overrides: Any) -> dict[str, Any]:
    """``data:`` on a generated shapes dataset at ``root`` (``shapes``: its ``ShapesConfig`` fields).

    Batches of 2 for training and evaluation, no worker processes; ``overrides`` win.
    """
    data = {"root": str(root), "shapes": dict(shapes), "batch_size": 2, "eval_batch_size": 2, "num_workers": 0}
    return data | overrides


def fasterrcnn_fpn_model(width_mult: float, warmup_steps: int) -> dict[str, Any]:
    """``model:`` of ``tasks.detect``: a Faster R-CNN FPN on ``vgg11_bn`` for 64-96 px images.

    Few RPN proposals and RoI samples (a CPU step takes well under a second), SGD with a
    cosine schedule after ``warmup_steps``.
    """
    return {
        "arch": "vgg11_bn",
        "width_mult": width_mult,
        "fpn": True,
        "min_size": 64,
        "max_size": 96,
        "anchor_sizes": [16, 32, 64, 128],
        "detector": {"rpn_pre_nms_top_n_train": 200, "rpn_post_nms_top_n_train": 100, "box_batch_size_per_image": 32},
        "optim": {"name": "sgd", "lr": 0.01, "scheduler": "cosine", "warmup_steps": warmup_steps},
    }


def write_config(cfg: Mapping[str, Any], path: Path) -> Path:
    """``cfg`` as YAML at ``path`` (parent folders made); returns ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(dict(cfg)))
    return path


def csv_versions(tmp: Path, logger: str = "csv") -> list[Path]:
    """The ``CSVLogger`` run folders of :func:`quick_trainer`'s ``tmp``, oldest first."""
    return sorted((tmp / "runs" / logger).glob("version_*"), key=lambda p: int(p.name.split("_")[1]))


def run_module(module: str, args: Sequence[str], *, timeout: float = 600) -> subprocess.CompletedProcess:
    """``python -m <module> <args>`` from the repository root, asserting it exits 0 (its output tails if not).

    The repository goes first on ``PYTHONPATH`` (the code under test, also in worker processes);
    ``OMP_NUM_THREADS=1`` gives every process the same thread count, hence bitwise-equal sums.
    """
    pythonpath = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, PYTHONPATH=pythonpath, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", module, *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{list(args)}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-5000:]}"
    return proc


#: The shapes dataset of :func:`detect_config`: 8 training and 5 validation images of 64 px.
DETECT_SHAPES = {
    "num_train": 8,
    "num_val": 5,
    "min_image_size": 64,
    "max_image_size": 64,
    "max_objects": 2,
    "min_object_size": 16,
    "max_object_size": 32,
    "seed": 1,
}


def detect_config(tmp: Path, **trainer: object) -> Path:
    """``tmp/detect.yaml``: 2 training steps of :func:`fasterrcnn_fpn_model` (1/8 width) on
    :data:`DETECT_SHAPES` under ``tmp/shapes``, predictions to ``tmp/pred``; ``trainer`` wins."""
    cfg = {
        "seed_everything": 0,
        "trainer": quick_trainer(tmp, devices=1, limit_train_batches=2, log_every_n_steps=1) | trainer,
        "model": fasterrcnn_fpn_model(width_mult=0.125, warmup_steps=2),
        "data": shapes_data(tmp / "shapes", DETECT_SHAPES, eval_batch_size=1),
        "writer": {"output_dir": str(tmp / "pred")},
    }
    return write_config(cfg, tmp / "detect.yaml")


#: The shapes dataset of :func:`segment_config`: 8 training and 7 validation images of 40-56 px.
SEG_SHAPES = {"num_train": 8, "num_val": 7, "min_image_size": 40, "max_image_size": 56, "min_object_size": 10,
              "max_object_size": 24}  # fmt: skip


def segment_config(tmp: Path) -> Path:
    """``tmp/seg.yaml``: 2 training steps of a 1/8-width U-Net (``ce+dice``, AdamW) on
    :data:`SEG_SHAPES` under ``tmp/shapes`` (VOC layout, 40 px crops)."""
    cfg = {
        "seed_everything": 0,
        "trainer": quick_trainer(tmp, logger="seg", limit_train_batches=2),
        "model": {
            # U-Net: its randomly initialised head predicts every class from the first step (FCN's
            # zero-initialised score layers predict background everywhere after 2 steps, which
            # would make the 1- and 2-process confusion matrices of test_segment_cli.py equal whatever
            # each process evaluated)
            "head": "unet",
            "arch": "vgg11_bn",
            "width_mult": 0.125,
            "decoder_channels": [16, 16, 8, 8, 8],
            "loss": "ce+dice",
            "predict_dir": str(tmp / "predict"),
            "optim": {"name": "adamw", "lr": 0.001, "backbone_lr_mult": 0.5},
        },
        "data": shapes_data(tmp / "shapes", SEG_SHAPES, layout="voc", crop_size=40),
    }
    return write_config(cfg, tmp / "seg.yaml")


def tiny_segment_config(tmp: Path, **optim: object) -> Path:
    """``tmp/seg.yaml``: 3 training steps of a 1/16-width U-Net (SGD; ``optim`` wins) on 6 training
    and 2 validation shapes images of 40-48 px under ``tmp/shapes`` (VOC layout, 32 px crops)."""
    shapes = {"num_train": 6, "num_val": 2, "min_image_size": 40, "max_image_size": 48, "min_object_size": 10,
              "max_object_size": 20}  # fmt: skip
    cfg = {
        "seed_everything": 0,
        "trainer": quick_trainer(tmp, logger="seg", limit_train_batches=3),
        "model": {
            "head": "unet", "arch": "vgg11_bn", "width_mult": 0.0625, "decoder_channels": [8, 8, 8, 8, 8],
            "predict_dir": str(tmp / "predict"),
            "optim": {"name": "sgd", "lr": 0.01, "warmup_steps": 0, **optim},
        },
        "data": shapes_data(tmp / "shapes", shapes, layout="voc", crop_size=32),
    }  # fmt: skip
    return write_config(cfg, tmp / "seg.yaml")


#: ``tasks.reid`` on a generated Market-1501 tree: ``REID_CONFIG.format(root=..., logs=...)``
#: (the tree is generated at ``root`` if missing; CSV logs under ``logs``).
REID_CONFIG = """
seed_everything: 0
trainer:
  accelerator: cpu
  max_epochs: 1
  logger:
    class_path: pytorch_lightning.loggers.CSVLogger
    init_args: {{save_dir: {logs}, name: ""}}
  num_sanity_val_steps: 0
  enable_progress_bar: false
  enable_model_summary: false
model:
  arch: vgg11_bn
  width_mult: 0.125
  grid_queries: 3
  grid_topk: 4
  max_rank: 10
  optim: {{name: adam, lr: 0.003, warmup_steps: 0}}
data:
  root: {root}
  synthetic: {{num_train_ids: 6, num_test_ids: 5, num_cameras: 3, min_cameras: 2, max_cameras: 3,
              max_per_camera: 3, num_distractors: 3, num_junk: 2, height: 32, width: 16, seed: 4}}
  image_size: [32, 16]
  p: 3
  k: 2
  eval_batch_size: 5
  num_workers: 0
"""
