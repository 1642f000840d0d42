"""ClassificationTask in Python: checkpoints rebuild without the pretrained weights file; options
are vgg_classifier's, unknown ones refused by name."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from tasks.checkpoint import WEIGHTS_IN_CHECKPOINT
from tasks.classify import ClassificationTask
from vggbackbone import VGGBackbone


def test_checkpoint_rebuilds_without_the_weights_file(tmp_path: Path) -> None:
    weights = tmp_path / "pretrained.pth"
    torch.save(VGGBackbone("vgg11_bn", ["conv5"], width_mult=0.125).state_dict(), weights)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fc6-fc8 are not in a backbone file: fresh, warned
        task = ClassificationTask(num_classes=4, arch="vgg11_bn", width_mult=0.125, weights=str(weights))
    file = torch.load(weights, weights_only=True)
    own = task.model.backbone.state_dict()
    assert all(torch.equal(own[k], v) for k, v in file.items() if k in own) and len(set(file) & set(own)) > 10
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.strategy.connect(task)
    trainer.save_checkpoint(tmp_path / "task.ckpt")
    saved = torch.load(tmp_path / "task.ckpt", map_location="cpu", weights_only=True)["hyper_parameters"]
    assert saved["weights"] == WEIGHTS_IN_CHECKPOINT and saved["arch"] == "vgg11_bn" and saved["in_channels"] == 3
    weights.unlink()
    loaded = ClassificationTask.load_from_checkpoint(tmp_path / "task.ckpt", map_location="cpu", weights_only=True)
    state = task.state_dict()
    assert loaded.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in loaded.state_dict().items())


def test_unknown_option_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="unknown option.*widht_mult"):
        ClassificationTask(num_classes=3, arch="vgg11", widht_mult=0.125)
    with pytest.raises(ValueError, match="class names"):
        ClassificationTask(num_classes=3, class_names=["a", "b"], arch="vgg11", width_mult=0.0625)
