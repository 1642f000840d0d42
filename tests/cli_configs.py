"""Tiny configs for the task CLIs (``python -m tasks.<task> ... --config``), shared by the CLI tests.

Builders return plain dicts, one config section each, that a test completes or overrides as it
needs; :func:`write_config` writes the whole config as YAML. Also: the CSVLogger run folders a
run leaves (:func:`csv_versions`) and a CLI run in a subprocess (:func:`run_module`).

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

__all__ = ["REPO", "csv_versions", "fasterrcnn_fpn_model", "quick_trainer", "run_module", "shapes_data", "write_config"]

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
