"""Checkpoints written by an older commit (``tests/fixtures/checkpoints/``) still load and compute the same.

Each fixture is the ``last.ckpt`` of a real one-step ``fit`` (``tests/fixtures/make_checkpoints.py``,
see the README there); beside it, the output its model gave on a fixed input when it was written.
Loading goes through :func:`tasks.checkpoint.load_task` (the task's own ``__init__`` from the
stored hyper-parameters, then the state dict), as ``export`` and the library users do; the CLI's
``--ckpt_path`` route (the hyper-parameters through the argument parser) is run once per task.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from cli_configs import CHECKPOINT_FIXTURES as FIXTURES
from cli_configs import TASK_CLASSES, predict_config, run_module, task_class

NAMES = sorted(p.name.removesuffix(".ckpt") for p in FIXTURES.glob("*.ckpt"))


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
    assert expected["task"] == TASK_CLASSES[name.split("_")[0]]
    task = load_task(task_class(name), FIXTURES / f"{name}.ckpt").eval()
    with torch.no_grad():
        got = task(expected["input"])
    _assert_same(got, expected["output"], name)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["detect_fasterrcnn_fpn", "segment_unet", "classify"])
def test_fixture_predicts_through_the_cli(name: str, tmp_path: Path) -> None:
    module, args = predict_config(name, tmp_path)
    run_module(module, args)
    assert (tmp_path / "out").is_dir() and any((tmp_path / "out").iterdir())
