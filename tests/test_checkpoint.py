"""``tasks/checkpoint.py``: atomic checkpoints, and task checkpoints that rebuild without the pretrained
weights and load with ``weights_only``."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from tasks.checkpoint import WEIGHTS_IN_CHECKPOINT, AtomicCheckpointIO
from tasks.module import TaskModule
from tasks.optim import OptimConfig
from vggbackbone import VGGBackbone

REPO = Path(__file__).resolve().parents[1]


def test_atomic_checkpoint_io_never_leaves_a_partial_checkpoint(tmp_path: Path, monkeypatch) -> None:
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1}, path)
    assert torch.load(path, weights_only=True) == {"step": 1}

    def exploding_save(obj, f, *a, **k):  # a crash half-way through torch.save
        Path(f).write_bytes(b"\x80partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", exploding_save)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def _tiny_task(task: str, weights: Path) -> TaskModule:
    from tasks.detect import DetectionTask
    from tasks.reid import ReIDTask
    from tasks.segment import SegmentationTask

    small = {"arch": "vgg11_bn", "width_mult": 0.125, "weights_backbone": str(weights)}
    if task == "detect":
        return DetectionTask(classes=["a", "b"], fpn=True, **small)
    if task == "segment":
        return SegmentationTask(num_classes=3, family="unet", decoder_channels=[16, 16, 8, 8, 8], **small)
    return ReIDTask(num_classes=4, **small)


@pytest.mark.parametrize("task", ["detect", "segment", "reid"])
def test_checkpoints_rebuild_without_the_pretrained_weights(task: str, tmp_path: Path) -> None:
    """weights_backbone (a file, or ImageNet weights to download) is not needed again to load a checkpoint."""
    weights = tmp_path / "pretrained.pth"
    torch.save(VGGBackbone("vgg11_bn", ["conv5"], width_mult=0.125).state_dict(), weights)
    module = _tiny_task(task, weights)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(tmp_path / "task.ckpt")
    saved = torch.load(tmp_path / "task.ckpt", map_location="cpu", weights_only=False)["hyper_parameters"]
    assert saved["weights_backbone"] == WEIGHTS_IN_CHECKPOINT and saved["arch"] == "vgg11_bn"
    weights.unlink()  # gone, as ImageNet weights are on a machine without network
    loaded = type(module).load_from_checkpoint(tmp_path / "task.ckpt", map_location="cpu", weights_only=False)
    state = module.state_dict()
    assert loaded.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in loaded.state_dict().items())
    # built as the pretrained model it was (a detector's frozen blocks and FrozenBatchNorm2d too)
    assert [type(m) for m in loaded.modules()] == [type(m) for m in module.modules()]
    assert [p.requires_grad for p in loaded.parameters()] == [p.requires_grad for p in module.parameters()]


@pytest.mark.parametrize("task", ["detect", "segment", "reid"])
def test_checkpoints_keep_weights_that_carry_their_own_normalisation(task: str, tmp_path: Path) -> None:
    """Built without weights a model takes ImageNet statistics; weights that expect other input
    (Caffe's 0-255 BGR means) stay named in the checkpoint, or the rebuilt model would be wrong."""
    weights = tmp_path / "caffe.pth"
    VGGBackbone("vgg11_bn", ["conv5"], width_mult=0.125, normalization="caffe").save_weights(weights)
    module = _tiny_task(task, weights)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(tmp_path / "task.ckpt")
    saved = torch.load(tmp_path / "task.ckpt", map_location="cpu", weights_only=False)["hyper_parameters"]
    assert saved["weights_backbone"] == str(weights)
    loaded = type(module).load_from_checkpoint(tmp_path / "task.ckpt", map_location="cpu", weights_only=False)
    norm = loaded.get_submodule(loaded.backbone_path).normalization
    assert norm.name == "caffe" and norm == module.get_submodule(module.backbone_path).normalization


def test_checkpoints_of_tasks_built_in_python_load_with_weights_only(tmp_path: Path) -> None:
    """Built in Python, hyper-parameters hold config dataclasses; weights_only loading must accept them."""
    from tasks.data.market import MarketConfig
    from tasks.data.shapes import ShapesConfig
    from tasks.reid import ReIDTask

    task = ReIDTask(arch="vgg11", width_mult=0.125, num_classes=3, optim=OptimConfig(name="adam", lr=1e-3))
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.strategy.connect(task)
    trainer.save_checkpoint(tmp_path / "task.ckpt")
    loaded = ReIDTask.load_from_checkpoint(tmp_path / "task.ckpt", map_location="cpu", weights_only=True)
    assert loaded.optim == task.optim and isinstance(loaded.optim, OptimConfig)
    for k, v in task.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    data_hparams = {"shapes": ShapesConfig(num_train=3), "synthetic": MarketConfig(num_train_ids=2)}
    torch.save({"datamodule_hyper_parameters": data_hparams}, tmp_path / "data.ckpt")
    assert torch.load(tmp_path / "data.ckpt", weights_only=True)["datamodule_hyper_parameters"] == data_hparams
