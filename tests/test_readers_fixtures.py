"""Readers against files written by hand in the real formats (not by the project's generator),
with the exact values they must parse to."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tasks.data.coco import read_coco, read_coco_categories
from tasks.data.reid import parse_market_name, read_market_split
from tasks.data.segmentation import VOCSegmentation, read_mask
from tasks.data.voc import VOC_CLASSES, VOC_SEGMENTATION_CLASSES, read_voc, voc_palette

# A COCO instances file as the 2017 release writes it: category ids with holes, xywh boxes, an
# iscrowd RLE region, an image without annotations.
COCO_JSON = """{
  "info": {"description": "hand-written"},
  "images": [
    {"id": 42, "file_name": "000000000042.jpg", "width": 64, "height": 48},
    {"id": 7, "file_name": "000000000007.jpg", "width": 32, "height": 32}
  ],
  "annotations": [
    {"id": 1, "image_id": 42, "category_id": 18, "bbox": [10.0, 5.0, 20.0, 15.0], "area": 250.5, "iscrowd": 0,
     "segmentation": [[10, 5, 30, 5, 30, 20, 10, 20]]},
    {"id": 2, "image_id": 42, "category_id": 1, "bbox": [0.0, 0.0, 8.0, 4.0], "area": 0, "iscrowd": 1,
     "segmentation": {"counts": [0, 32, 3040], "size": [48, 64]}},
    {"id": 3, "image_id": 42, "category_id": 18, "bbox": [50.0, 40.0, 30.0, 30.0], "area": 100.0, "iscrowd": 0,
     "segmentation": [[50, 40, 64, 40, 64, 48, 50, 48]]}
  ],
  "categories": [
    {"id": 18, "name": "dog", "supercategory": "animal"},
    {"id": 1, "name": "person", "supercategory": "person"}
  ]
}"""


def test_coco_instances_file(tmp_path: Path) -> None:
    ann = tmp_path / "instances_val2017.json"
    ann.write_text(COCO_JSON)
    assert [c["id"] for c in read_coco_categories(ann)] == [1, 18]
    with pytest.warns(UserWarning, match="clipped 1 box"):
        split = read_coco(ann, tmp_path / "val2017")
    assert split.classes == ["person", "dog"] and split.category_ids == [1, 18]  # labels 1, 2
    assert [r.image_id for r in split.records] == [7, 42]
    empty, rec = split.records
    assert empty.boxes.shape == (0, 4) and empty.path == tmp_path / "val2017" / "000000000007.jpg"
    assert (rec.width, rec.height) == (64, 48)
    # xywh -> xyxy; the third box is clipped to the 64x48 image
    np.testing.assert_array_equal(rec.boxes, np.array([[10, 5, 30, 20], [0, 0, 8, 4], [50, 40, 64, 48]], np.float32))
    np.testing.assert_array_equal(rec.labels, [2, 1, 2])
    np.testing.assert_array_equal(rec.ignore, [False, True, False])
    np.testing.assert_array_equal(rec.area, np.array([250.5, 32.0, 100.0], np.float32))  # area 0: the box's


VOC_XML = """<annotation>
  <folder>VOC2007</folder>
  <filename>000005.jpg</filename>
  <size><width>500</width><height>375</height><depth>3</depth></size>
  <segmented>0</segmented>
  <object>
    <name>chair</name><pose>Rear</pose><truncated>0</truncated><difficult>0</difficult>
    <bndbox><xmin>263</xmin><ymin>211</ymin><xmax>324</xmax><ymax>339</ymax></bndbox>
  </object>
  <object>
    <name>chair</name><pose>Unspecified</pose><truncated>1</truncated><difficult>1</difficult>
    <bndbox><xmin>5</xmin><ymin>244</ymin><xmax>67</xmax><ymax>374</ymax></bndbox>
  </object>
  <object>
    <name>person</name><pose>Left</pose><truncated>0</truncated><difficult>0</difficult>
    <bndbox><xmin>1</xmin><ymin>1</ymin><xmax>500</xmax><ymax>375</ymax></bndbox>
  </object>
</annotation>
"""


def test_voc_detection_xml_and_image_set(tmp_path: Path) -> None:
    year = tmp_path / "VOCdevkit" / "VOC2007"
    (year / "Annotations").mkdir(parents=True)
    (year / "ImageSets" / "Main").mkdir(parents=True)
    (year / "Annotations" / "000005.xml").write_text(VOC_XML)
    (year / "ImageSets" / "Main" / "test.txt").write_text("000005\n")
    split = read_voc(tmp_path, "test")
    assert split.layout == "voc" and split.classes == list(VOC_CLASSES) and len(VOC_CLASSES) == 20
    (rec,) = split.records
    assert (
        rec.image_id == 5 and rec.path == year / "JPEGImages" / "000005.jpg" and (rec.width, rec.height) == (500, 375)
    )
    # 1-based inclusive pixels -> 0-based continuous: [xmin - 1, ymin - 1, xmax, ymax]
    np.testing.assert_array_equal(
        rec.boxes, np.array([[262, 210, 324, 339], [4, 243, 67, 374], [0, 0, 500, 375]], np.float32)
    )
    chair, person = VOC_CLASSES.index("chair") + 1, VOC_CLASSES.index("person") + 1
    assert (chair, person) == (9, 15)
    np.testing.assert_array_equal(rec.labels, [chair, chair, person])
    np.testing.assert_array_equal(rec.ignore, [False, True, False])  # difficult


def test_voc_palette_is_the_devkits() -> None:
    palette = voc_palette()
    colour = {k: tuple(palette[3 * k : 3 * k + 3]) for k in (0, 1, 2, 15, 255)}
    # VOCdevkit's labelcolormap: background black, aeroplane dark red, bicycle green, person, void
    assert colour == {0: (0, 0, 0), 1: (128, 0, 0), 2: (0, 128, 0), 15: (192, 128, 128), 255: (224, 224, 192)}
    assert ("background", *VOC_CLASSES) == VOC_SEGMENTATION_CLASSES


def test_voc_segmentation_class_png(tmp_path: Path) -> None:
    root = tmp_path / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True)
    (root / "ImageSets/Segmentation/val.txt").write_text("2007_000032\n")
    labels = np.array([[0, 0, 1, 1], [0, 255, 1, 1], [15, 15, 255, 0]], np.uint8)  # bg, aeroplane, void, person
    png = Image.fromarray(labels, mode="P")
    png.putpalette(voc_palette())
    png.save(root / "SegmentationClass/2007_000032.png")
    Image.fromarray(np.full((3, 4, 3), 90, np.uint8)).save(root / "JPEGImages/2007_000032.jpg", quality=95)
    assert torch.equal(read_mask(root / "SegmentationClass/2007_000032.png", 21), torch.from_numpy(labels).long())
    sample = VOCSegmentation(tmp_path / "VOC2012", "val", num_classes=21)[0]
    assert sample["id"] == "2007_000032" and sample["image"].shape == (3, 3, 4)
    assert torch.equal(sample["mask"].as_subclass(torch.Tensor), torch.from_numpy(labels).long())


def test_market1501_names(tmp_path: Path) -> None:
    assert parse_market_name("0002_c1s1_000451_03.jpg") == (2, 0)
    assert parse_market_name("1501_c6s4_001902_01.jpg") == (1501, 5)
    assert parse_market_name("-1_c3s2_064178_00.jpg") == (-1, 2)  # junk
    assert parse_market_name("0000_c5s3_047690_04.jpg") == (0, 4)  # distractor
    assert parse_market_name("Thumbs.db") is None
    folder = tmp_path / "bounding_box_test"
    folder.mkdir()
    for name in (
        "0002_c1s1_000451_03.jpg",
        "-1_c3s2_064178_00.jpg",
        "0000_c5s3_047690_04.jpg",
        "0007_c2s3_070952_01.jpg",
    ):
        Image.new("RGB", (8, 16)).save(folder / name)
    (folder / "Thumbs.db").write_bytes(b"\0")
    gallery = read_market_split(folder, keep_distractors=True)
    assert [(Path(s.path).name, s.pid, s.camid) for s in gallery] == [
        ("0000_c5s3_047690_04.jpg", 0, 4),
        ("0002_c1s1_000451_03.jpg", 2, 0),
        ("0007_c2s3_070952_01.jpg", 7, 1),
    ]  # junk dropped, sorted by name
    train = read_market_split(folder, keep_distractors=False)
    assert [s.pid for s in train] == [2, 7]


def test_coco_categories_errors_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "x.json"
    bad.write_text(json.dumps({"images": [], "categories": []}))
    with pytest.raises(ValueError, match="x.json: no categories listed"):
        read_coco_categories(bad)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        read_coco_categories(tmp_path / "nope.json")
