"""``model.class_weights`` (a list, ``median_frequency``) and ``model.ignore_index`` in the segmentation
task: the loss and the metric ignore exactly that value; the weights against a hand computation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from tasks.data.class_weights import CACHE_NAME
from tasks.data.segmentation import SegmentationDataModule
from tasks.segment import SegmentationTask

TINY = {"family": "unet", "arch": "vgg11_bn", "width_mult": 0.125, "decoder_channels": [16, 16, 8, 8, 8]}

#: three 2x2 masks, 3 classes, 255 ignored:
#: pixels of c: c0 3+1=4, c1 1+4=5, c2 2; labelled pixels of the images holding c: c0 4+3=7, c1 4+4=8, c2 3
#: freq = 4/7, 5/8, 2/3; median 5/8; weights = (5/8)/(4/7) = 1.09375, 1.0, (5/8)/(2/3) = 0.9375
MASKS = {"m1": [[0, 0], [0, 1]], "m2": [[0, 2], [255, 2]], "m3": [[1, 1], [1, 1]]}
EXPECTED = [1.09375, 1.0, 0.9375]


def _tree(root: Path) -> None:
    for name, mask in MASKS.items():
        (root / "images/train").mkdir(parents=True, exist_ok=True)
        (root / "masks/train").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(root / f"images/train/{name}.jpg")
        Image.fromarray(np.asarray(mask, np.uint8)).save(root / f"masks/train/{name}.png")


def _dm(root: Path) -> SegmentationDataModule:
    return SegmentationDataModule(str(root), layout="folders", classes=["a", "b", "c"], crop_size=None,
                                  batch_size=1, num_workers=0)  # fmt: skip


def test_median_frequency_equals_the_hand_computation_and_is_cached(tmp_path: Path, capsys) -> None:
    _tree(tmp_path)
    assert _dm(tmp_path).median_frequency_weights() == pytest.approx(EXPECTED, abs=1e-12)
    out = capsys.readouterr().out
    assert "computed from 3 training masks, cached in" in out and "a 1.094, b 1, c 0.9375" in out
    cache = json.loads((tmp_path / CACHE_NAME).read_text())
    assert cache["format"] == "vggbackbone-class-weights/1"
    (entry,) = cache["entries"].values()
    assert entry["pixels"] == [4, 5, 2] and entry["image_pixels"] == [7, 8, 3]
    assert _dm(tmp_path).median_frequency_weights() == pytest.approx(EXPECTED, abs=1e-12)
    assert "read from" in capsys.readouterr().out
    # a changed mask is computed again: m3 all class 2 -> c1 1/4, c2 6/7, c0 4/7; median 4/7
    Image.fromarray(np.full((2, 2), 2, np.uint8)).save(tmp_path / "masks/train/m3.png")
    assert _dm(tmp_path).median_frequency_weights() == pytest.approx([1.0, (4 / 7) / (1 / 4), (4 / 7) / (6 / 7)])
    assert len(json.loads((tmp_path / CACHE_NAME).read_text())["entries"]) == 2


def test_a_cache_file_the_project_did_not_write_is_left_alone(tmp_path: Path) -> None:
    _tree(tmp_path)
    (tmp_path / CACHE_NAME).write_text('{"mine": 1}')
    with pytest.raises(ValueError, match="not a class-weights cache the project wrote"):
        _dm(tmp_path).median_frequency_weights()
    assert (tmp_path / CACHE_NAME).read_text() == '{"mine": 1}'


@pytest.mark.parametrize("loss", ["ce", "ce+dice", "ce+lovasz"])
def test_ignore_index_11_changes_neither_loss_nor_metric(loss: str) -> None:
    task = SegmentationTask(num_classes=3, ignore_index=11, loss=loss, class_weights=[1.0, 2.0, 0.5], **TINY)
    logits = torch.randn(1, 3, 4, 4)
    mask = torch.randint(0, 3, (1, 4, 4))
    mask[0, 0, :2] = 11
    changed = logits.clone()
    changed[0, :, 0, :2] = torch.tensor([[9.0, -9.0], [-9.0, 9.0], [3.0, 3.0]])
    torch.testing.assert_close(task.loss(changed, mask), task.loss(logits, mask))
    if loss == "ce":  # the weighted cross-entropy of the 14 labelled pixels, by hand
        keep = mask != 11
        logp = F.log_softmax(logits, 1).permute(0, 2, 3, 1)[keep]
        target = mask[keep]
        w = torch.tensor([1.0, 2.0, 0.5])[target]
        manual = -(w * logp[torch.arange(len(target)), target]).sum() / w.sum()
        torch.testing.assert_close(task.loss(logits, mask), manual)
    task.confmat.update(changed.argmax(1), mask)
    conf_changed = task.confmat.compute().clone()
    task.confmat.reset()
    task.confmat.update(logits.argmax(1), mask)
    assert torch.equal(task.confmat.compute(), conf_changed) and int(conf_changed.sum()) == 14


def test_class_weights_are_checked_and_ignore_index_must_be_outside_the_classes() -> None:
    with pytest.raises(ValueError, match="model.class_weights needs 3 finite weights"):
        SegmentationTask(num_classes=3, class_weights=[1.0, 2.0], **TINY)
    with pytest.raises(ValueError, match="ignore_index 2 is a class index"):
        SegmentationTask(num_classes=3, ignore_index=2, **TINY)


def test_dice_term_is_the_weighted_mean_of_smp_per_class_dice() -> None:
    from segmentation_models_pytorch.losses import DiceLoss

    from tasks.segment_loss import WeightedDiceLoss

    logits = torch.randn(2, 3, 5, 5)
    mask = torch.randint(0, 3, (2, 5, 5))
    per_class = [float(DiceLoss("multiclass", classes=[c])(logits, mask)) for c in range(3)]
    weighted = WeightedDiceLoss("multiclass")
    weighted.class_weight = torch.tensor([2.0, 1.0, 0.0])
    assert float(weighted(logits, mask)) == pytest.approx((2 * per_class[0] + per_class[1]) / 3, rel=1e-6)
    weighted.class_weight = None
    assert float(weighted(logits, mask)) == pytest.approx(sum(per_class) / 3, rel=1e-6)
