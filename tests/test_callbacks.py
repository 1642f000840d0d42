"""``tasks/callbacks.py``: ``InferenceOptimization`` swaps in the optimised model during ``predict`` only."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tasks.callbacks import InferenceOptimization
from tasks.module import TaskModule

REPO = Path(__file__).resolve().parents[1]


class _PredictToy(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        with torch.no_grad():  # non-trivial statistics so folding has something to fold
            self.model[1].running_mean.uniform_(-1, 1)
            self.model[1].running_var.uniform_(0.5, 2)

    inference_model = TaskModule.inference_model

    def predict_step(self, batch, _):
        return type(self.inference_model).__name__, self.inference_model(batch[0])


@pytest.mark.parametrize("enabled", [True, False])
def test_inference_optimization_only_during_predict(enabled: bool) -> None:
    task = _PredictToy()
    x = torch.rand(4, 3, 10, 12)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[InferenceOptimization(enabled=enabled, precision="fp32")])  # fmt: skip
    ((name, y),) = trainer.predict(task, DataLoader(TensorDataset(x), batch_size=4))
    assert name == ("InferenceModule" if enabled else "Sequential")
    torch.testing.assert_close(y, task.model.eval()(x), rtol=1e-4, atol=1e-5)
    assert "_fast_model" not in task.__dict__ and task.inference_model is task.model
    assert all(k.startswith("model.") for k in task.state_dict())  # never registered as a submodule
