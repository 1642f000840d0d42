"""Annotation files that would train or score silently wrong are refused when read, naming the
file (and the id, line or split): files written by hand in the real formats in ``tmp_path``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tasks.data.coco import read_coco, read_coco_categories
from tasks.data.detection import DetectionDataModule
from tasks.data.sbd import read_id_list
from tasks.data.segmentation import VOCSegmentation
from tasks.data.voc import read_voc


def _coco(path: Path, categories: list[dict], annotations: list[dict] | None = None) -> Path:
    """A COCO instances file of two 40x30 images."""
    images = [{"id": i, "file_name": f"{i}.jpg", "width": 40, "height": 30} for i in (1, 2)]
    default = [
        {"id": 10, "image_id": 1, "category_id": categories[0]["id"], "bbox": [2, 3, 10, 8], "area": 80, "iscrowd": 0}
    ]
    data = {"images": images, "annotations": default if annotations is None else annotations, "categories": categories}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


# ---------------------------------------------------------------------------- COCO categories
def test_two_categories_with_one_id_are_refused_at_read_time(tmp_path: Path) -> None:
    ann = _coco(
        tmp_path / "dup_id.json", [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}, {"id": 2, "name": "fox"}]
    )
    for read in (lambda: read_coco(ann, tmp_path), lambda: read_coco_categories(ann)):
        with pytest.raises(ValueError, match=r"dup_id.json: category id\(s\) \[2\] listed more than once") as e:
            read()
        assert "'dog'" in str(e.value) and "'fox'" in str(e.value)


def test_two_categories_with_one_name_are_refused(tmp_path: Path) -> None:
    ann = _coco(tmp_path / "dup_name.json", [{"id": 1, "name": "cat"}, {"id": 5, "name": "cat"}])
    for read in (lambda: read_coco(ann, tmp_path), lambda: read_coco_categories(ann)):
        with pytest.raises(ValueError, match=r"dup_name.json: category name\(s\) \['cat'\] listed more than once"):
            read()


def test_a_boolean_category_id_is_refused_naming_the_annotation(tmp_path: Path) -> None:
    cats = [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]
    ann = _coco(
        tmp_path / "bool.json",
        cats,
        [{"id": 77, "image_id": 1, "category_id": True, "bbox": [2, 3, 10, 8], "area": 80, "iscrowd": 0}],
    )
    with pytest.raises(ValueError, match=r"bool.json: annotation 77: 'category_id' must be an integer, got True"):
        read_coco(ann, tmp_path)


# ---------------------------------------------------------------------------- detection splits without boxes
def _coco_tree(root: Path, annotations: dict[str, list[dict]]) -> None:
    cats = [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]
    for split, anns in annotations.items():
        _coco(root / "annotations" / f"instances_{split}.json", cats, anns)
        (root / "images" / split).mkdir(parents=True)
        for i in (1, 2):
            Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(root / "images" / split / f"{i}.jpg")


def test_a_split_with_an_empty_annotations_list_is_refused_but_predict_needs_none(tmp_path: Path) -> None:
    good = [{"id": 1, "image_id": 1, "category_id": 2, "bbox": [2, 3, 10, 8], "area": 80, "iscrowd": 0}]
    _coco_tree(tmp_path, {"train": good, "val": []})
    dm = DetectionDataModule(root=str(tmp_path), num_workers=0)
    assert len(dm.split("train").records) == 2
    val = tmp_path / "annotations" / "instances_val.json"
    with pytest.raises(ValueError, match=rf"{val}: the val split has no annotations \(2 image\(s\), no box\)"):
        dm.split("val")
    with pytest.raises(ValueError, match="COCO AP would be -1"):
        dm.setup("validate")
    dm.setup("predict")  # the validation images, with their ids: no annotation needed
    assert len(dm.predict_set) == 2


def test_a_training_split_whose_boxes_were_all_dropped_is_refused(tmp_path: Path) -> None:
    degenerate = [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [5, 5, 0, 8], "area": 0, "iscrowd": 0},  # no width
        {"id": 2, "image_id": 2, "category_id": 2, "bbox": [60, 40, 10, 10], "area": 100, "iscrowd": 0},  # outside
    ]
    _coco_tree(tmp_path, {"train": degenerate})
    dm = DetectionDataModule(root=str(tmp_path), num_workers=0)
    train = tmp_path / "annotations" / "instances_train.json"
    with (
        pytest.warns(UserWarning, match="dropped 2 degenerate"),
        pytest.raises(
            ValueError, match=rf"{train}: the train split has no usable box: all 2 were dropped as degenerate"
        ),
    ):
        dm.split("train")


# ---------------------------------------------------------------------------- VOC
VOC_XML = """<annotation>
  <filename>{id}.jpg</filename>
  <size><width>100</width><height>80</height><depth>3</depth></size>
  <object><name>cat</name><difficult>{d1}</difficult>
    <bndbox><xmin>10</xmin><ymin>10</ymin><xmax>50</xmax><ymax>40</ymax></bndbox></object>
  <object><name>dog</name><difficult>{d2}</difficult>
    <bndbox><xmin>20</xmin><ymin>30</ymin><xmax>90</xmax><ymax>70</ymax></bndbox></object>
</annotation>
"""


def _voc(root: Path, flags: dict[str, tuple[str, str]], listing: str) -> Path:
    year = root / "VOCdevkit" / "VOC2007"
    (year / "Annotations").mkdir(parents=True, exist_ok=True)
    (year / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
    for sid, (d1, d2) in flags.items():
        (year / "Annotations" / f"{sid}.xml").write_text(VOC_XML.format(id=sid, d1=d1, d2=d2))
    (year / "ImageSets" / "Main" / "trainval.txt").write_text(listing)
    return year


def test_voc_difficult_reads_true_and_false_and_refuses_anything_else(tmp_path: Path) -> None:
    _voc(tmp_path, {"000001": ("true", "false"), "000002": ("1", "0"), "000003": (" True ", "FALSE")},
         "000001\n000002\n000003\n")  # fmt: skip
    split = read_voc(tmp_path, "trainval", ["cat", "dog"])
    assert [r.ignore.tolist() for r in split.records] == [[True, False]] * 3

    year = _voc(tmp_path / "bad", {"000004": ("yes", "0")}, "000004\n")
    with pytest.raises(ValueError, match=r"000004.xml: image 000004: object 0 \(cat\) <difficult> must be 1/0"):
        read_voc(tmp_path / "bad", "trainval", ["cat", "dog"])
    assert (year / "Annotations" / "000004.xml").is_file()


def test_a_line_repeated_in_a_voc_image_set_list_is_refused(tmp_path: Path) -> None:
    year = _voc(tmp_path, {"000001": ("0", "0"), "000002": ("0", "0")}, "000001\n000002\n\n000001\n")
    listing = year / "ImageSets" / "Main" / "trainval.txt"
    with pytest.raises(ValueError, match=rf"{listing}: 1 image id\(s\) listed twice: '000001' on lines 1 and 4"):
        read_voc(tmp_path, "trainval", ["cat", "dog"])
    (year / "ImageSets" / "Main" / "once.txt").write_text("000001\n000002\n")  # the same list twice in one spec
    with pytest.raises(ValueError, match=r"listed by more than one of the joined sets"):
        read_voc(tmp_path, "once+once", ["cat", "dog"])
    # segmentation lists (VOC's ImageSets/Segmentation, SBD-style id lists) are read the same way
    seg = year / "ImageSets" / "Segmentation"
    seg.mkdir(parents=True)
    (year / "JPEGImages").mkdir()
    (seg / "val.txt").write_text("000002\n000002\n")
    with pytest.raises(ValueError, match=r"val.txt: 1 image id\(s\) listed twice: '000002' on lines 1 and 2"):
        VOCSegmentation(year, "val")
    with pytest.raises(ValueError, match=r"listed twice"):
        read_id_list(seg / "val.txt")
