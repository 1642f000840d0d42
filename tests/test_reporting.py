"""``tasks/reporting.py``: ``publish_metrics`` logs the numbers and writes strict JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytorch_lightning as pl

from tasks.module import TaskModule
from tasks.reporting import EvalReport, publish_metrics

REPO = Path(__file__).resolve().parents[1]


def test_publish_metrics_logs_writes_and_leaves_nan_out_of_the_loggers(tmp_path: Path, tiny_task: TaskModule) -> None:
    task = tiny_task
    trainer = pl.Trainer(accelerator="cpu", logger=False, default_root_dir=tmp_path, enable_progress_bar=False)
    task.trainer = trainer
    seen: list[Path] = []

    def compute(log_dir: Path) -> EvalReport:
        seen.append(log_dir)
        return EvalReport({"score": 0.5, "IoU/absent": float("nan")}, extra={"curve": [1.0, float("nan")]})

    assert publish_metrics(task, "val", compute)["score"] == 0.5
    assert seen == [tmp_path] and task.log_calls == {"val/score": 0.5}  # NaN: not logged as a number
    out = json.loads((tmp_path / "val_metrics.json").read_text())  # strict JSON: NaN is null
    assert out == {"stage": "val", "epoch": 0, "global_step": 0, "score": 0.5, "IoU/absent": None, "curve": [1.0, None]}
    task.metrics_file = None
    publish_metrics(task, "test", compute)
    assert not (tmp_path / "test_metrics.json").exists()
