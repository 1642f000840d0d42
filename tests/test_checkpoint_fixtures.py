"""Checkpoints written by an older commit (``tests/fixtures/checkpoints/``) still load and compute the same.

Each fixture is the ``last.ckpt`` of a real one-step ``fit`` (``tests/fixtures/make_checkpoints.py``,
see the README there); beside it, the output its model gave on a fixed input when it was written.
Loading goes through :func:`tasks.checkpoint.load_task` (the task's own ``__init__`` from the
stored hyper-parameters, then the state dict), as ``export`` and the library users do; the CLI's
``--ckpt_path`` route (the hyper-parameters through the argument parser) is run once per task.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import pytest
import torch
from cli_configs import REPO, quick_trainer, run_module, write_config

FIXTURES = REPO / "tests" / "fixtures" / "checkpoints"
NAMES = sorted(p.name.removesuffix(".ckpt") for p in FIXTURES.glob("*.ckpt"))

#: the task class of each fixture, written here (a fixture file never names code that gets imported)
TASKS = {
    "detect": "tasks.detect.DetectionTask",
    "segment": "tasks.segment.SegmentationTask",
    "reid": "tasks.reid.ReIDTask",
    "classify": "tasks.classify.ClassificationTask",
}


def _task_class(name: str) -> type:
    module, cls = TASKS[name.split("_")[0]].rsplit(".", 1)
    return getattr(importlib.import_module(module), cls)


def _assert_same(got: Any, expected: Any, where: str) -> None:
    if isinstance(expected, dict):
        assert sorted(got) == sorted(expected), where
        for k in expected:
            _assert_same(got[k], expected[k], f"{where}[{k!r}]")
    elif isinstance(expected, (list, tuple)):
        assert len(got) == len(expected), where
        for i, (g, e) in enumerate(zip(got, expected)):
            _assert_same(g, e, f"{where}[{i}]")
    else:
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5, msg=lambda m: f"{where}: {m}")


def test_every_task_and_family_has_a_fixture() -> None:
    assert set(NAMES) >= {
        "detect_fasterrcnn", "detect_fasterrcnn_fpn", "detect_ssd", "detect_retinanet", "detect_fcos",
        "segment_fcn8s", "segment_unet", "reid", "classify",
    }  # fmt: skip


@pytest.mark.parametrize("name", NAMES)
def test_fixture_loads_and_gives_its_recorded_output(name: str) -> None:
    from tasks.checkpoint import load_task

    expected = torch.load(FIXTURES / f"{name}.expected.pt", map_location="cpu", weights_only=True)
    assert expected["task"] == TASKS[name.split("_")[0]]
    task = load_task(_task_class(name), FIXTURES / f"{name}.ckpt").eval()
    with torch.no_grad():
        got = task(expected["input"])
    _assert_same(got, expected["output"], name)


def _predict_config(name: str, tmp: Path) -> tuple[str, list[str]]:
    """The task module and the ``predict`` arguments for fixture ``name`` on a few images of ``tmp``."""
    import numpy as np
    from PIL import Image

    images = tmp / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(images / f"{i}.png")
    task = name.split("_")[0]
    cfg: dict[str, Any] = {"trainer": quick_trainer(tmp)}
    out = tmp / "out"
    if task == "detect":
        cfg["data"] = {"predict_images": str(images), "classes": ["circle", "square", "triangle"], "num_workers": 0}
        cfg["writer"] = {"output_dir": str(out)}
    elif task == "segment":
        cfg["data"] = {"predict_images": str(images), "classes": ["background", "circle", "square", "triangle"],
                       "num_workers": 0}  # fmt: skip
        cfg["model"] = {"predict_dir": str(out)}
    elif task == "classify":
        cfg["data"] = {
            "predict_images": str(images),
            "classes": ["ant", "bee", "cat"],
            "num_workers": 0,
            "image_size": 32,
        }
        cfg["model"] = {"predict_file": str(out / "predictions.csv")}
        cfg["test_after_fit"] = {"enabled": False}
    config = write_config(cfg, tmp / "predict.yaml")
    return f"tasks.{task}", ["predict", "--config", str(config), "--ckpt_path", str(FIXTURES / f"{name}.ckpt")]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["detect_fasterrcnn_fpn", "segment_unet", "classify"])
def test_fixture_predicts_through_the_cli(name: str, tmp_path: Path) -> None:
    module, args = _predict_config(name, tmp_path)
    run_module(module, args)
    assert (tmp_path / "out").is_dir() and any((tmp_path / "out").iterdir())
