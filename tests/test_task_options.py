"""One vocabulary across tasks: builder options reached without copies, unknown options refused by
name, old option and class names still accepted with one warning."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import torch

from tasks.deprecation import RenamedOptionWarning
from tasks.detect import DETECTORS, DetectionTask
from tasks.reid import ReIDTask
from tasks.segment import SegmentationTask

TINY_DET = {"arch": "vgg11", "width_mult": 0.0625, "min_size": 64, "max_size": 96}


def test_detection_options_come_from_the_builder_and_are_stored() -> None:
    import inspect

    from vggbackbone.models import fasterrcnn_vgg

    task = DetectionTask(classes=["a", "b"], fpn=True, anchor_sizes=[16, 32, 64, 128], **TINY_DET)
    builder = inspect.signature(fasterrcnn_vgg).parameters
    offered = inspect.signature(DetectionTask.__init__).parameters
    for name in ("arch", "fpn", "width_mult", "frozen_stages", "anchor_sizes", "roi_pool", "min_size", "max_size"):
        assert name in offered and name in task.hparams
        default = builder[name].default
        if name in DetectionTask.builder_args.per_builder_defaults():  # families disagree: None, the family's own
            assert offered[name].default is None and task.hparams[name] is not None, name
            continue
        assert offered[name].default == (list(default) if isinstance(default, tuple) else default), name
    assert task.hparams["fpn"] is True and task.hparams["roi_pool"] == "align"  # given, and the builder's default
    assert task.backbone_path == "model.backbone.body"
    assert set(DETECTORS) == {"fasterrcnn", "ssd", "retinanet", "fcos"}


def test_unknown_options_are_refused_by_name() -> None:
    with pytest.raises(ValueError, match=r"unknown option\(s\) bogus; accepted: (\w+, )*anchor_sizes, arch,"):
        DetectionTask(classes=["a"], bogus=1, **TINY_DET)
    with pytest.raises(ValueError, match="unknown model 'yolo'; registered: fasterrcnn, ssd, retinanet, fcos"):
        DetectionTask(classes=["a"], family="yolo", **TINY_DET)
    with pytest.raises(ValueError, match="option 'decoder_channels' does not apply to model 'fcn8s'"):
        SegmentationTask(num_classes=3, family="fcn8s", arch="vgg11", width_mult=0.0625, decoder_channels=[8] * 5)
    with pytest.raises(ValueError, match=r"unknown option\(s\) pooling_type"):
        ReIDTask(arch="vgg11", width_mult=0.0625, pooling_type="avg")


def test_cli_refuses_an_unknown_model_key(capsys, monkeypatch) -> None:
    from tasks.detect import main

    monkeypatch.setattr(sys, "argv", ["python -m tasks.detect"])
    with pytest.raises(SystemExit) as done:
        main(["fit", "--config", "configs/detect/demo.yaml", "--model.fpn_typo", "true", "--print_config"])
    assert done.value.code not in (0, None)
    assert "fpn_typo" in capsys.readouterr().err


def test_old_option_names_work_and_warn_once(tmp_path: Path, monkeypatch) -> None:
    import tasks.deprecation
    from tasks.data.detection import DetectionDataModule
    from tasks.data.reid import ReIDDataModule
    from tasks.data.segmentation import SegmentationDataModule

    monkeypatch.setattr(tasks.deprecation, "_warned", set())  # as in a fresh process
    with pytest.warns(RenamedOptionWarning, match="'format' is renamed 'layout'"):
        dm = DetectionDataModule(root=str(tmp_path), format="voc", train_set="trainval", predict_path="x/")
    assert (dm.layout, dm.splits["train"], dm.predict_images) == ("voc", "trainval", "x/")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process
        DetectionDataModule(root=str(tmp_path), format="voc")
    with pytest.raises(ValueError, match="format is the old name of layout; give only layout"):
        DetectionDataModule(root=str(tmp_path), format="voc", layout="voc")
    with pytest.warns(RenamedOptionWarning, match="'flip' is renamed 'hflip'"):
        reid = ReIDDataModule(root=str(tmp_path), format="csv", flip=0.25)
    assert reid.layout == "csv" and reid.hparams["hflip"] == 0.25
    assert SegmentationDataModule(root=str(tmp_path), classes=["bg", "x"], hflip=True).hflip == 0.5  # bool: old type
    with pytest.warns(RenamedOptionWarning, match="'batch_norm_eval' is renamed 'norm_eval'"):
        task = ReIDTask(arch="vgg11_bn", width_mult=0.0625, batch_norm_eval=True)
    assert task.hparams["norm_eval"] is True and "batch_norm_eval" not in task.hparams
    task.train()
    assert not any(m.training for m in task.modules() if isinstance(m, torch.nn.BatchNorm2d))
    with pytest.warns(RenamedOptionWarning, match="head_kwargs is deprecated: write decoder_channels"):
        seg = SegmentationTask(
            num_classes=3, head="unet", arch="vgg11", width_mult=0.0625, head_kwargs={"decoder_channels": [8] * 5}
        )
    assert seg.hparams["decoder_channels"] == [8] * 5 and "head_kwargs" not in seg.hparams


def test_old_class_names_are_the_new_classes(monkeypatch) -> None:
    import tasks.data.detection
    import tasks.data.segmentation
    import tasks.deprecation
    import tasks.detect
    import tasks.segment

    monkeypatch.setattr(tasks.deprecation, "_warned", set())
    with pytest.warns(RenamedOptionWarning, match="SegmentationModel is renamed SegmentationTask"):
        assert tasks.segment.SegmentationModel is SegmentationTask
    with pytest.warns(RenamedOptionWarning, match="DetectionData is renamed DetectionDataModule"):
        assert tasks.detect.DetectionData is tasks.data.detection.DetectionDataModule
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert tasks.data.segmentation.SegmentationData is tasks.data.segmentation.SegmentationDataModule
    from tasks.core import OptimConfig, TaskModule  # the old home of the shared glue
    from tasks.module import TaskModule as NewTaskModule
    from tasks.optim import OptimConfig as NewOptimConfig

    assert (TaskModule, OptimConfig) == (NewTaskModule, NewOptimConfig)


def test_checkpoint_rebuilds_from_the_stored_builder_options(tmp_path: Path) -> None:
    import pytorch_lightning as pl

    task = DetectionTask(classes=["a", "b"], roi_pool="pool", anchor_sizes=[16, 32, 64], **TINY_DET)
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, max_steps=0, accelerator="cpu")
    trainer.strategy.connect(task)
    trainer.save_checkpoint(tmp_path / "t.ckpt")
    loaded = DetectionTask.load_from_checkpoint(tmp_path / "t.ckpt", map_location="cpu", weights_only=True)
    assert loaded.hparams["roi_pool"] == "pool" and loaded.hparams["anchor_sizes"] == [16, 32, 64]
    assert type(loaded.model.roi_heads.box_roi_pool) is type(task.model.roi_heads.box_roi_pool)
    for (k, a), (_, b) in zip(task.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
