"""A task's options are captured from its ``__init__`` signature (:mod:`tasks.hparams`): a new option is
checkpointed, with its default, without being listed anywhere, and a checkpoint rebuilds it."""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import nn

from tasks.checkpoint import load_task
from tasks.classify import ClassificationTask
from tasks.module import TaskModule
from tasks.optim import OptimConfig


class Toy(TaskModule):
    """A task that never mentions its options again after its signature."""

    def __init__(self, width: int = 4, note: str = "plain", extra: list[int] | None = None, *, depth: int = 1) -> None:
        super().__init__()
        self.optim = OptimConfig()
        self.model = nn.Sequential(*[nn.Linear(width, width) for _ in range(depth)])


class TintedClassifier(ClassificationTask):
    """A real task grown by one option (and one positional one), forwarding the rest."""

    def __init__(self, tint: float = 0.5, **kwargs) -> None:
        super().__init__(**kwargs)
        self.tint = tint


def _save(task: pl.LightningModule, path: Path) -> Path:
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, max_steps=0, accelerator="cpu")
    trainer.strategy.connect(task)
    trainer.save_checkpoint(path)
    return path


def test_every_init_option_is_a_hyper_parameter_defaults_included(tmp_path: Path) -> None:
    task = Toy(8, depth=2)
    assert dict(task.hparams) == {"width": 8, "note": "plain", "extra": None, "depth": 2}
    loaded = load_task(Toy, _save(task, tmp_path / "toy.ckpt"))
    assert dict(loaded.hparams) == dict(task.hparams) and len(loaded.model) == 2


def test_a_new_option_of_a_task_is_checkpointed_and_rebuilt(tmp_path: Path) -> None:
    task = TintedClassifier(tint=0.25, num_classes=3, arch=[[1, 8], [1, 8]], fc_channels=8, top_k=2)
    hp = task.hparams
    assert hp["tint"] == 0.25 and hp["num_classes"] == 3 and hp["top_k"] == 2
    assert hp["label_smoothing"] == 0.0 and hp["dropout"] == 0.5  # defaults (the task's, the builder's) stored too
    assert "predict_file" not in hp and "model_kwargs" not in hp
    loaded = load_task(TintedClassifier, _save(task, tmp_path / "tinted.ckpt"))
    assert loaded.tint == 0.25 and dict(loaded.hparams) == dict(hp)
    for (k, a), (_, b) in zip(task.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k


def test_modules_are_not_hyper_parameters() -> None:
    class Wraps(TaskModule):
        def __init__(self, net: nn.Module, scale: float = 2.0) -> None:
            super().__init__()
            self.model = net

    task = Wraps(nn.Linear(2, 2))
    assert dict(task.hparams) == {"scale": 2.0}  # the weights are in the state dict
