"""SBD reader (``tasks/data/sbd.py``) and ``layout: sbd`` of the segmentation data module, on hand-made files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

from tasks.data.masks import BadMaskError
from tasks.data.sbd import SBDSegmentation, read_sbd_label
from tasks.data.segmentation import SegmentationDataModule
from tests.recipe_trees import SEG11VALID, make_sbd_tree


def _mat(path: Path, seg: np.ndarray) -> None:
    scipy.io.savemat(path, {"GTcls": {"Segmentation": seg, "CategoriesPresent": np.unique(seg)[None]}})


def test_read_sbd_label_matches_the_written_array(tmp_path: Path) -> None:
    seg = np.zeros((5, 7), np.uint8)
    seg[1:4, 2:6] = 15
    seg[0, 0] = 20
    _mat(tmp_path / "a.mat", seg)
    mask = read_sbd_label(tmp_path / "a.mat", 21, (5, 7))
    assert mask.dtype == torch.int64
    assert torch.equal(mask, torch.from_numpy(seg.astype(np.int64)))


def test_read_sbd_label_errors_name_the_file(tmp_path: Path) -> None:
    scipy.io.savemat(tmp_path / "other.mat", {"GTinst": {"Segmentation": np.zeros((2, 2), np.uint8)}})
    with pytest.raises(BadMaskError, match="other.mat.*GTcls"):
        read_sbd_label(tmp_path / "other.mat", 21)
    _mat(tmp_path / "big.mat", np.full((2, 2), 30, np.uint8))
    with pytest.raises(BadMaskError, match=r"big.mat.*\[30\]"):
        read_sbd_label(tmp_path / "big.mat", 21)
    _mat(tmp_path / "size.mat", np.zeros((2, 2), np.uint8))
    with pytest.raises(BadMaskError, match="size.mat.*2x2"):
        read_sbd_label(tmp_path / "size.mat", 21, (3, 3))
    with pytest.raises(BadMaskError, match="missing.mat: SBD label file not found"):
        read_sbd_label(tmp_path / "missing.mat", 21)


def test_sbd_layout_reads_sbd_train_and_voc_ids_from_a_list(tmp_path: Path) -> None:
    ids = make_sbd_tree(tmp_path, size=(24, 32))
    dm = SegmentationDataModule(
        root=str(tmp_path), layout="sbd", voc_year="VOC2012", train_split="train", val_split=str(SEG11VALID),
        crop_size=None, hflip=0.0, batch_size=1, num_workers=0,
    )  # fmt: skip
    dm.setup("fit")
    assert dm.num_classes == 21
    assert isinstance(dm.train_set, SBDSegmentation) and dm.train_set.ids == ids["train"]
    sample = dm.train_set[0]
    mat = scipy.io.loadmat(tmp_path / "benchmark_RELEASE/dataset/cls" / f"{ids['train'][0]}.mat")
    assert sample["image"].shape == (3, 24, 32)  # whole image: neither scaled nor cropped
    assert torch.equal(
        sample["mask"].as_subclass(torch.Tensor), torch.from_numpy(mat["GTcls"][0]["Segmentation"][0].astype(np.int64))
    )
    # the evaluation split: all 736 ids of the list, read from VOC2012 (the tree has the first two)
    assert len(dm.val_set) == 736 and dm.val_set.ids[:2] == ids["seg11valid"]
    first = dm.val_set[0]
    png = np.array(Image.open(tmp_path / "VOCdevkit/VOC2012/SegmentationClass" / f"{ids['seg11valid'][0]}.png"))
    assert torch.equal(first["mask"].as_subclass(torch.Tensor), torch.from_numpy(png.astype(np.int64)))
    with pytest.raises(FileNotFoundError, match="'nope' is neither an SBD list"):
        dm.dataset("nope")


def test_whole_images_need_batch_1() -> None:
    with pytest.raises(ValueError, match="crop_size null.*batch_size 1, got 2"):
        SegmentationDataModule(layout="sbd", crop_size=None, batch_size=2)
