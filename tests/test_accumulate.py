"""Gradient accumulation (``trainer.accumulate_grad_batches``): the schedule counts optimiser steps, not batches.

With accumulation 2 over twice the batches, the learning rate after each optimiser step is the one
of the same step without accumulation (warm-up, then cosine over the whole run); the run takes
batches/2 optimiser steps, and the EMA is updated once per optimiser step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from tasks.classify import ClassificationTask
from tasks.detect import DetectionTask
from tasks.ema import ModelEMA
from tasks.module import TaskModule
from tasks.optim import OptimConfig, lr_factor
from tasks.reid import ReIDTask
from tasks.segment import SegmentationTask

OPTIM = OptimConfig(name="sgd", lr=0.1, scheduler="cosine", warmup_steps=2, warmup_factor=0.1, min_lr_ratio=0.01)


def _collate(items: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, Any]:
    images, labels = zip(*items)
    return {"image": torch.stack(images), "label": torch.stack(labels)}


class _StepLR(pl.Callback):
    """The learning rate after each optimiser step (``global_step``) and the batches seen."""

    def __init__(self) -> None:
        self.lrs: dict[int, float] = {}
        self.batches = 0

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self.batches += 1
        self.lrs[trainer.global_step] = trainer.optimizers[0].param_groups[0]["lr"]


def _run(tmp: Path, batches: int, accumulate: int) -> tuple[_StepLR, pl.Trainer]:
    torch.manual_seed(0)
    task = ClassificationTask(
        num_classes=2, arch="vgg11", width_mult=0.0625, fc_channels=8, optim=OPTIM, ema={"decay": 0.9}
    )
    data = TensorDataset(torch.rand(batches, 3, 32, 32), torch.arange(batches) % 2)
    probe = _StepLR()
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=1,
        accumulate_grad_batches=accumulate,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=tmp,
        callbacks=[probe],
    )
    trainer.fit(task, DataLoader(data, batch_size=1, collate_fn=_collate))
    return probe, trainer


def test_accumulation_keeps_the_per_step_schedule_and_counts_optimiser_steps(tmp_path: Path) -> None:
    plain, t1 = _run(tmp_path / "a", 6, 1)
    accumulated, t2 = _run(tmp_path / "b", 12, 2)
    assert accumulated.batches == 12 and t2.global_step == 6 == t1.global_step  # batches / 2 optimiser steps
    assert t2.estimated_stepping_batches == t1.estimated_stepping_batches == 6  # the schedule's length
    accumulated.lrs.pop(0)  # the first batch of two: no optimiser step yet, the initial lr
    assert accumulated.lrs == plain.lrs  # the lr after each optimiser step, warm-up and cosine alike
    expected = {s: 0.1 * lr_factor(s, 6, OPTIM) for s in range(1, 7)}  # the closed form, over 6 optimiser steps
    assert plain.lrs == pytest.approx(expected, rel=1e-12)
    averaged = next(c for c in t2.callbacks if isinstance(c, ModelEMA))._average_model
    assert averaged is not None and int(averaged.n_averaged) == 6  # one EMA update per optimiser step


def test_every_task_takes_the_shared_schedule() -> None:
    """Every task's optimiser and schedule is TaskModule's (estimated_stepping_batches: optimiser steps)."""
    for task in (ClassificationTask, DetectionTask, SegmentationTask, ReIDTask):
        assert task.configure_optimizers is TaskModule.configure_optimizers, task.__name__
