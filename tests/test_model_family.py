"""``model.family`` in every task (the registry's entry), segmentation's ``head`` as its old name,
and the pretrained rule stored in a detection checkpoint and restored from it."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from tasks.checkpoint import WEIGHTS_IN_CHECKPOINT
from tasks.deprecation import RenamedOptionWarning
from vggbackbone import VGGBackbone

REPO = Path(__file__).resolve().parents[1]
TINY_DET = {"arch": "vgg11_bn", "width_mult": 0.125, "min_size": 64, "max_size": 96}


def _save(module: pl.LightningModule, path: Path) -> dict:
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(path)
    return torch.load(path, map_location="cpu", weights_only=False)


def _structure(task) -> tuple[int, list[type], list[bool]]:
    body = task.model.backbone
    body = body if isinstance(body, VGGBackbone) else body.body
    norms = [type(m) for m in body.modules() if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d))]
    return body.frozen_stages, norms, [p.requires_grad for p in task.parameters()]


@pytest.mark.filterwarnings("ignore:.*has no classifier fc6/fc7")  # weights cut at conv5: small
@pytest.mark.parametrize("family", ["fasterrcnn", "ssd"])
def test_the_pretrained_rule_is_stored_in_the_checkpoint_and_restored(family: str, tmp_path: Path) -> None:
    from tasks.detect import DetectionTask

    weights = tmp_path / "pretrained.pth"
    VGGBackbone("vgg11_bn", ["conv5"], width_mult=0.125).save_weights(weights)
    options = TINY_DET if family == "fasterrcnn" else {"arch": "vgg11_bn", "width_mult": 0.125, "size": 300}
    task = DetectionTask(classes=["a", "b"], family=family, weights_backbone=str(weights), **options)
    frozen, norms, grads = _structure(task)
    assert frozen == (2 if family == "fasterrcnn" else 1) and set(norms) == {FrozenBatchNorm2d}
    saved = _save(task, tmp_path / "task.ckpt")["hyper_parameters"]
    assert saved["weights_backbone"] == WEIGHTS_IN_CHECKPOINT and saved["pretrained"] is True
    weights.unlink()  # a rebuild loads no weights: the flag alone gives the structure
    loaded = DetectionTask.load_from_checkpoint(tmp_path / "task.ckpt", map_location="cpu", weights_only=False)
    assert _structure(loaded) == (frozen, norms, grads)

    # a checkpoint written before the flag existed (no "pretrained" key): in_checkpoint means pretrained
    old = torch.load(tmp_path / "task.ckpt", map_location="cpu", weights_only=False)
    del old["hyper_parameters"]["pretrained"]
    torch.save(old, tmp_path / "old.ckpt")
    rebuilt = DetectionTask.load_from_checkpoint(tmp_path / "old.ckpt", map_location="cpu", weights_only=False)
    assert _structure(rebuilt) == (frozen, norms, grads) and rebuilt.hparams["pretrained"] is True


@pytest.mark.filterwarnings("ignore:.*has no classifier fc6/fc7")
def test_pretrained_false_trains_everything_and_stays_so(tmp_path: Path) -> None:
    from tasks.detect import DetectionTask

    weights = tmp_path / "pretrained.pth"
    VGGBackbone("vgg11_bn", ["conv5"], width_mult=0.125).save_weights(weights)
    task = DetectionTask(classes=["a"], weights_backbone=str(weights), pretrained=False, **TINY_DET)
    frozen, norms, grads = _structure(task)
    assert frozen == 0 and set(norms) == {nn.BatchNorm2d} and all(grads)
    assert _save(task, tmp_path / "t.ckpt")["hyper_parameters"]["pretrained"] is False
    loaded = DetectionTask.load_from_checkpoint(tmp_path / "t.ckpt", map_location="cpu", weights_only=False)
    assert _structure(loaded) == (frozen, norms, grads)
    scratch = DetectionTask(classes=["a"], **TINY_DET)
    assert scratch.hparams["pretrained"] is False and _structure(scratch)[0] == 0


def test_family_picks_the_registry_entry_in_every_task() -> None:
    from tasks.classify import ClassificationTask
    from tasks.detect import DETECTORS
    from tasks.reid import ReIDTask
    from tasks.segment import SEGMENTATION_HEADS, SegmentationTask
    from vggbackbone.models import fcn_vgg, list_models, model_entry, unet_vgg

    assert list(DETECTORS) == list_models("detect") and list(SEGMENTATION_HEADS) == list_models("segment")
    assert DETECTORS["ssd"].builder is model_entry("ssd").builder
    assert DETECTORS["fasterrcnn"].backbone_path({"fpn": True}) == "model.backbone.body"
    assert SEGMENTATION_HEADS["unet"] is unet_vgg and SEGMENTATION_HEADS["fcn8s"].func is fcn_vgg
    tiny = {"arch": "vgg11", "width_mult": 0.0625}
    reid = ReIDTask(**tiny)
    assert reid.hparams["family"] == "reid_vgg"
    with pytest.raises(ValueError, match="unknown model 'bnneck'; registered: reid_vgg"):
        ReIDTask(family="bnneck", **tiny)
    classify = ClassificationTask(num_classes=3, fc_channels=16, head="conv", **tiny)
    assert classify.hparams["family"] == "vgg" and classify.model.head == "conv"  # head: the classifier's FC form
    with pytest.raises(ValueError, match="unknown model 'resnet'; registered: vgg"):
        ClassificationTask(num_classes=3, family="resnet", **tiny)
    seg = SegmentationTask(num_classes=3, family="unet", decoder_channels=[8] * 5, **tiny)
    assert seg.hparams["family"] == "unet" and type(seg.model).__name__ == "UNetVGG"


def test_segmentations_head_is_the_old_name_of_family(monkeypatch) -> None:
    import tasks.deprecation
    from tasks.segment import SegmentationTask

    monkeypatch.setattr(tasks.deprecation, "_warned", set())  # as in a fresh process
    tiny = {"num_classes": 3, "arch": "vgg11", "width_mult": 0.0625, "decoder_channels": [8] * 5}
    with pytest.warns(RenamedOptionWarning, match="'head' is renamed 'family'"):
        old = SegmentationTask(head="unet", **tiny)
    assert old.hparams["family"] == "unet" and type(old.model).__name__ == "UNetVGG"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process
        SegmentationTask(head="unet", **tiny)
        # an old checkpoint's head beside the same family from a new config: no conflict
        SegmentationTask(head="unet", family="unet", **tiny)
    with pytest.raises(ValueError, match="head is the old name of family; give only family"):
        SegmentationTask(head="unet", family="fcn32s", **tiny)


def test_cli_family_and_the_shipped_yamls(capsys, monkeypatch) -> None:
    import sys

    from tasks.segment import main

    monkeypatch.setattr(sys, "argv", ["python -m tasks.segment"])
    for name in ("demo", "voc_fcn8s"):
        text = (REPO / "configs" / "segment" / f"{name}.yaml").read_text()
        assert "\n  family: " in text and "\n  head: " not in text
    with pytest.raises(SystemExit) as done:
        main(["fit", "--config", str(REPO / "configs/segment/demo.yaml"), "--model.family", "fcn16s", "--print_config"])
    assert done.value.code in (0, None)
    assert "family: fcn16s" in capsys.readouterr().out
    with pytest.raises(SystemExit) as old:  # the old key still parses
        main(["fit", "--config", str(REPO / "configs/segment/demo.yaml"), "--model.head", "unet", "--print_config"])
    assert old.value.code in (0, None)
    assert "head: unet" in capsys.readouterr().out
