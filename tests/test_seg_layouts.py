"""Segmentation layouts ``folders``, ``pairs``, ``cityscapes``, ``ade20k`` on hand-written trees, and
``data.label_map`` / ``data.ignore_index`` as every layout reads masks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors

from tasks.data.folders import FolderLayout, folders_split
from tasks.data.masks import BadMaskError, MaskLabels, read_mask
from tasks.data.pairs import read_pairs
from tasks.data.segmentation import SegmentationDataModule, train_transforms
from tests.recipe_trees import make_sbd_tree

RGB = np.zeros((2, 3, 3), np.uint8)


def _png(path: Path, arr: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(arr, np.uint8)).save(path)
    return path


def _dm(root: Path, layout: str, **kw: object) -> SegmentationDataModule:
    return SegmentationDataModule(str(root), layout=layout, crop_size=None, batch_size=1, num_workers=0, **kw)


def test_folders_pairs_by_stem_with_suffixes_and_leaves_other_files_out(tmp_path: Path, capsys) -> None:
    _png(tmp_path / "img/train/a/x_leftImg8bit.png", RGB)
    _png(tmp_path / "img/train/b/y_leftImg8bit.png", RGB)
    _png(tmp_path / "ann/train/a/x_gtFine_labelIds.png", [[0, 1, 2], [1, 1, 255]])
    _png(tmp_path / "ann/train/b/y_gtFine_labelIds.png", [[2, 2, 2], [0, 0, 0]])
    _png(tmp_path / "ann/train/a/x_gtFine_color.png", RGB)  # another file of the release: left out, counted
    dm = _dm(tmp_path, "folders", classes=["bg", "a", "b"], image_dir="img/{split}", mask_dir="ann/{split}",
             image_suffix="_leftImg8bit.png", mask_suffix="_gtFine_labelIds.png")  # fmt: skip
    ds = dm.dataset("train")
    assert [(p[0].relative_to(tmp_path).as_posix(), p[2]) for p in ds.pairs] == [
        ("img/train/a/x_leftImg8bit.png", "x"),
        ("img/train/b/y_leftImg8bit.png", "y"),
    ]
    assert ds[0]["mask"].tolist() == [[0, 1, 2], [1, 1, 255]] and ds[1]["mask"].tolist() == [[2, 2, 2], [0, 0, 0]]
    assert "1 other file(s) left out" in capsys.readouterr().out


def test_folders_unmatched_files_are_an_error_counting_and_naming_them(tmp_path: Path) -> None:
    for name in ("p", "q", "r"):
        _png(tmp_path / f"images/train/{name}.jpg", RGB)
    _png(tmp_path / "masks/train/p.png", [[0, 0, 0], [0, 0, 0]])
    _png(tmp_path / "masks/train/s.png", [[0, 0, 0], [0, 0, 0]])
    with pytest.raises(ValueError, match=r"2 image\(s\) without a mask \(.*q\.jpg, .*r\.jpg\) and 1 mask\(s\) "
                       r"without an image \(.*s\.png\)"):  # fmt: skip
        folders_split(tmp_path, "train", FolderLayout(), 2)


def test_pairs_reroots_foreign_absolute_paths_and_names_the_line_of_a_missing_one(tmp_path: Path) -> None:
    _png(tmp_path / "data/train/a.png", RGB)
    _png(tmp_path / "data/trainannot/a.png", [[1, 0, 1], [0, 1, 0]])
    _png(tmp_path / "data/train/b.png", RGB)
    _png(tmp_path / "data/trainannot/b.png", [[0, 0, 0], [1, 1, 1]])
    lst = tmp_path / "data/lists/train.txt"
    lst.parent.mkdir()
    lst.write_text(
        "/home/someone/SegNet/CamVid/train/a.png /home/someone/SegNet/CamVid/trainannot/a.png\n"
        "\n"
        "train/b.png trainannot/b.png\n"
    )
    dm = _dm(tmp_path / "data", "pairs", classes=["bg", "fg"], pairs_file="lists/{split}.txt",
             path_prefix={"/home/someone/SegNet/CamVid": "."})  # fmt: skip
    ds = dm.dataset("train")
    root = tmp_path / "data"
    assert ds.pairs == [
        (root / "train/a.png", root / "trainannot/a.png", "a"),
        (root / "train/b.png", root / "trainannot/b.png", "b"),
    ]
    assert ds[0]["mask"].tolist() == [[1, 0, 1], [0, 1, 0]]
    # relative to the list's folder instead
    (tmp_path / "data/lists/val.txt").write_text("../train/a.png ../trainannot/a.png\n")
    assert read_pairs(tmp_path / "data/lists/val.txt", tmp_path / "data/lists")[0][:2] == ds.pairs[0][:2]

    lst.write_text(lst.read_text() + "train/c.png trainannot/c.png\n")
    with pytest.raises(FileNotFoundError, match=r"train\.txt:4: image train/c\.png, read as .*train/c\.png not found"):
        dm.dataset("train")
    with pytest.raises(FileNotFoundError, match=r"train\.txt:1: image /home/someone/.* not found \(an absolute path "
                       "of another machine\\? re-root it with data.path_prefix\\)"):  # fmt: skip
        read_pairs(lst, root)


def test_cityscapes_label_ids_map_to_the_19_train_ids(tmp_path: Path) -> None:
    city = "aachen/aachen_000000_000019"
    _png(tmp_path / f"leftImg8bit/train/{city}_leftImg8bit.png", RGB)
    _png(tmp_path / f"gtFine/train/{city}_gtFine_labelIds.png", [[7, 26, 0], [8, 33, 9]])
    _png(tmp_path / f"gtFine/train/{city}_gtFine_instanceIds.png", [[0, 0, 0], [0, 0, 0]])
    dm = _dm(tmp_path, "cityscapes")
    assert dm.num_classes == 19 and dm.classes[0] == "road" and dm.classes[13] == "car" and dm.classes[18] == "bicycle"
    sample = dm.dataset("train")[0]
    assert sample["id"] == "aachen_000000_000019"
    assert sample["mask"].tolist() == [[0, 13, 255], [1, 18, 255]]  # road, car, unlabeled; sidewalk, bicycle, parking


def test_ade20k_zero_is_ignored_and_k_becomes_k_minus_1(tmp_path: Path) -> None:
    ade = tmp_path / "ADEChallengeData2016"
    _png(ade / "images/training/ADE_train_00000001.jpg", RGB)
    _png(ade / "annotations/training/ADE_train_00000001.png", [[0, 1, 150], [12, 0, 2]])
    dm = _dm(tmp_path, "ade20k", train_split="training")
    assert dm.num_classes == 150 and dm.classes[0] == "wall" and dm.classes[149] == "flag"
    assert dm.dataset("training")[0]["mask"].tolist() == [[255, 0, 149], [11, 255, 1]]
    with pytest.raises(FileNotFoundError, match=r"images/train: data.image_dir of split 'train' is not a folder "
                       r"\(.*images holds training: a split name\?\)"):  # fmt: skip
        dm.dataset("train")


def test_label_map_unlisted_values_ignored_or_refused(tmp_path: Path) -> None:
    path = _png(tmp_path / "m.png", [[10, 20, 99], [30, 255, 10]])
    mapping = {10: 0, 20: 1, 30: 2}
    ignored = read_mask(path, MaskLabels(3, label_map=mapping, unlisted="ignore"))
    assert ignored.tolist() == [[0, 1, 255], [2, 255, 0]]
    with pytest.raises(BadMaskError, match=r"m\.png: mask values \[99\] are not in data\.label_map"):
        read_mask(path, MaskLabels(3, label_map=mapping, unlisted="error"))
    # a data module applies it to the VOC layout too, and refuses it for COCO by name
    with pytest.raises(ValueError, match="data.label_map does not apply to layout coco"):
        _dm(tmp_path, "coco", classes=["bg", "x"], label_map={1: 1})


def test_ignore_index_other_than_255(tmp_path: Path) -> None:
    path = _png(tmp_path / "m.png", [[0, 11, 2], [1, 11, 0]])
    assert read_mask(path, MaskLabels(3, ignore_index=11)).tolist() == [[0, 11, 2], [1, 11, 0]]
    with pytest.raises(BadMaskError, match=r"labels \[11\] outside 0\.\.2 \(3 classes; 255 = ignore"):
        read_mask(path, 3)
    with pytest.raises(ValueError, match="data.ignore_index 1 is a class index"):
        MaskLabels(3, ignore_index=1)
    # the crop padding of training augmentation is the ignore value
    sample = {"image": tv_tensors.Image(torch.zeros(3, 2, 2, dtype=torch.uint8)),
              "mask": tv_tensors.Mask(torch.zeros(2, 2, dtype=torch.int64))}  # fmt: skip
    out = train_transforms(4, 2, (1.0, 1.0), 0.0, ignore_index=11)(sample)  # 2x2 padded to 4x4
    assert sorted(torch.unique(out["mask"]).tolist()) == [0, 11]


def test_label_map_and_ignore_index_reach_the_voc_and_sbd_readers(tmp_path: Path) -> None:
    voc = tmp_path / "VOCdevkit/VOC2012"
    _png(voc / "JPEGImages/x.jpg", RGB)
    _png(voc / "SegmentationClass/x.png", [[0, 5, 5], [255, 0, 7]])
    (voc / "ImageSets/Segmentation").mkdir(parents=True)
    (voc / "ImageSets/Segmentation/train.txt").write_text("x\n")
    dm = _dm(tmp_path, "voc", voc_year="VOC2012", classes=["bg", "five"], ignore_index=9,
             label_map={0: 0, 5: 1, 255: 9}, unlisted="ignore")  # fmt: skip
    assert dm.dataset("train")[0]["mask"].tolist() == [[0, 1, 1], [9, 0, 9]]
    assert dm.ignore_index == 9

    make_sbd_tree(tmp_path / "sbd", num_train=2, num_valid=1)  # SBD labels: 1 (aeroplane), 4 (boat) on 0
    dm = _dm(tmp_path / "sbd", "sbd", voc_year="VOC2012", classes=["bg", "plane", "boat"],
             label_map={0: 0, 1: 1, 4: 2})  # fmt: skip
    train = dm.dataset("train")
    assert [sorted(torch.unique(train[i]["mask"]).tolist()) for i in range(2)] == [[0, 1], [0, 2]]
