"""The synthetic shapes dataset: valid COCO and VOC layouts, deterministic, atomic."""

from __future__ import annotations

import json
from pathlib import Path
from xml.etree import ElementTree as ET

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from tasks.data.__main__ import main as data_main
from tasks.data.shapes import CLASSES, ShapesConfig, ensure_shapes, generate_shapes

CFG = ShapesConfig(num_train=6, num_val=4, min_image_size=64, max_image_size=80, seed=3)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_shapes(tmp_path_factory.mktemp("data") / "shapes", CFG, progress=False)


def test_coco_layout_boxes_masks_and_semantic_masks_agree(shapes: Path) -> None:
    coco = COCO(str(shapes / "annotations" / "instances_val.json"))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(CLASSES)
    assert len(coco.imgs) == CFG.num_val
    for img_id, info in coco.imgs.items():
        img = Image.open(shapes / "images" / "val" / info["file_name"])
        assert img.size == (info["width"], info["height"])
        semantic = np.array(Image.open(shapes / "masks" / "val" / info["file_name"].replace(".jpg", ".png")))
        rebuilt = np.zeros_like(semantic)
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=img_id)):
            m = mask_utils.decode(ann["segmentation"]).astype(bool)
            ys, xs = np.nonzero(m)
            assert ann["bbox"] == [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()]
            assert ann["area"] == m.sum() and ann["iscrowd"] == 0
            assert not (rebuilt[m] != 0).any()  # instance masks are the visible, disjoint pixels
            rebuilt[m] = ann["category_id"]
        np.testing.assert_array_equal(rebuilt, semantic)


def test_voc_layout_matches_coco(shapes: Path) -> None:
    voc = shapes / "VOCdevkit" / "VOC2007"
    ids = (voc / "ImageSets" / "Main" / "val.txt").read_text().split()
    coco = json.loads((shapes / "annotations" / "instances_val.json").read_text())
    assert ids == [Path(i["file_name"]).stem for i in coco["images"]]
    assert (voc / "ImageSets" / "Segmentation" / "trainval.txt").read_text().split() == (
        (voc / "ImageSets" / "Main" / "train.txt").read_text().split() + ids
    )
    first = coco["images"][0]
    root = ET.parse(voc / "Annotations" / f"{ids[0]}.xml").getroot()
    objs = root.findall("object")
    anns = [a for a in coco["annotations"] if a["image_id"] == first["id"]]
    assert len(objs) == len(anns)
    for obj, ann in zip(objs, anns):
        x, y, w, h = ann["bbox"]
        bb = [int(obj.find("bndbox").find(t).text) for t in ("xmin", "ymin", "xmax", "ymax")]
        assert bb == [x + 1, y + 1, x + w, y + h]  # VOC: 1-based inclusive
        assert obj.find("name").text == CLASSES[ann["category_id"] - 1]
    seg = np.array(Image.open(voc / "SegmentationClass" / f"{ids[0]}.png"))
    assert set(np.unique(seg)) <= {0, 1, 2, 3, 255} and (seg == 255).any()


def test_generation_is_deterministic_and_ensure_reuses(tmp_path: Path, shapes: Path) -> None:
    again = generate_shapes(tmp_path / "again", CFG, progress=False)
    for rel in ("annotations/instances_train.json", "masks/train/000001.png", "images/val/000007.jpg"):
        assert (again / rel).read_bytes() == (shapes / rel).read_bytes()
    marker = again / "images" / "train" / "000001.jpg"
    mtime = marker.stat().st_mtime_ns
    ensure_shapes(again, CFG, progress=False)  # same config: nothing rewritten
    assert marker.stat().st_mtime_ns == mtime
    other = ShapesConfig(num_train=2, num_val=1, min_image_size=64, max_image_size=64, seed=4, layouts=("coco",))
    ensure_shapes(again, other, progress=False)  # different config: regenerated in place
    assert len(list((again / "images" / "train").iterdir())) == 2
    assert not (again / "VOCdevkit").exists()


def test_interrupted_generation_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tasks.data.shapes as shapes_mod

    calls = {"n": 0}
    real = shapes_mod._make_image

    def failing(rng, cfg):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(rng, cfg)

    monkeypatch.setattr(shapes_mod, "_make_image", failing)
    with pytest.raises(KeyboardInterrupt):
        generate_shapes(tmp_path / "shapes", CFG, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data_main(["shapes", "--out", str(tmp_path / "s"), "--num-train", "2", "--num-val", "1", "--layouts", "coco"])
    assert "wrote shapes dataset" in capsys.readouterr().out
    spec = json.loads((tmp_path / "s" / "shapes.json").read_text())
    assert spec["num_train"] == 2 and spec["layouts"] == ["coco"]
