"""COCO and VOC readers on small generated trees, transforms, bad input, the data module."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from tasks.data.detection import (
    DetectionDataset,
    ImageFolderDataset,
    collate_detection,
    detection_transforms,
    read_coco,
    read_voc,
)
from tasks.data.shapes import CLASSES, ShapesConfig, generate_shapes
from tasks.images import SkipCounter, SkippedSample

TINY = ShapesConfig(num_train=6, num_val=4, min_image_size=64, max_image_size=80, max_objects=3,
                    min_object_size=12, max_object_size=30, seed=3)  # fmt: skip


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory) -> Path:
    return generate_shapes(tmp_path_factory.mktemp("data") / "shapes", TINY, progress=False)


@pytest.fixture
def shapes_copy(shapes_root, tmp_path) -> Path:
    """A private copy for tests that damage the data."""
    return Path(shutil.copytree(shapes_root, tmp_path / "shapes"))


def test_coco_reader_matches_the_json(shapes_root) -> None:
    ann = shapes_root / "annotations" / "instances_train.json"
    split = read_coco(ann, shapes_root / "images" / "train")
    data = json.loads(ann.read_text())
    assert split.classes == list(CLASSES) and split.category_ids == [1, 2, 3]
    assert [r.image_id for r in split.records] == sorted(i["id"] for i in data["images"])
    for rec in split.records:
        anns = [a for a in data["annotations"] if a["image_id"] == rec.image_id]
        xywh = [a["bbox"] for a in anns]
        expected = np.array([[x, y, x + w, y + h] for x, y, w, h in xywh], np.float32).reshape(-1, 4)
        np.testing.assert_array_equal(rec.boxes, expected)
        assert rec.labels.tolist() == [a["category_id"] for a in anns]
        assert rec.area.tolist() == [a["area"] for a in anns]  # mask areas kept for APs/m/l
        assert rec.path.is_file()


def test_voc_reader_gives_the_same_boxes_as_coco(shapes_root) -> None:
    """The generator writes both layouts from the same drawing: 1-based VOC boxes must map back exactly."""
    coco = read_coco(shapes_root / "annotations" / "instances_val.json", shapes_root / "images" / "val")
    voc = read_voc(shapes_root, "val", CLASSES)
    assert [r.image_id for r in voc.records] == [r.image_id for r in coco.records]
    n_difficult = 0
    for rv, rc in zip(voc.records, coco.records):
        np.testing.assert_array_equal(rv.boxes, rc.boxes)
        np.testing.assert_array_equal(rv.labels, rc.labels)
        side = np.maximum(rv.boxes[:, 2] - rv.boxes[:, 0], rv.boxes[:, 3] - rv.boxes[:, 1])
        np.testing.assert_array_equal(rv.ignore, side < 20)  # the generator marks small objects difficult
        n_difficult += int(rv.ignore.sum())
        assert rv.path.name == rc.path.name
    assert n_difficult > 0
    both = read_voc(shapes_root, "VOC2007/train+val", CLASSES)
    assert len(both.records) == TINY.num_train + TINY.num_val


def test_coco_category_ids_with_holes_and_crowds(tmp_path) -> None:
    data = {
        "images": [{"id": 7, "file_name": "a.jpg", "width": 50, "height": 40}],
        "categories": [{"id": 9, "name": "dog"}, {"id": 3, "name": "cat"}],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 9, "bbox": [1, 2, 10, 10], "iscrowd": 0, "area": 100},
            {"id": 2, "image_id": 7, "category_id": 3, "bbox": [20, 5, 10, 20], "iscrowd": 1, "area": 200},
        ],
    }
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(data))
    split = read_coco(ann, tmp_path)
    assert split.classes == ["cat", "dog"] and split.category_ids == [3, 9]
    rec = split.records[0]
    assert rec.labels.tolist() == [2, 1] and rec.ignore.tolist() == [False, True]
    gt = split.coco_gt()
    assert [a["category_id"] for a in gt["annotations"]] == [9, 3]
    assert [a["iscrowd"] for a in gt["annotations"]] == [0, 1]


def test_degenerate_and_out_of_image_boxes_are_dropped_with_a_count(tmp_path) -> None:
    data = {
        "images": [{"id": 1, "file_name": "a.jpg", "width": 50, "height": 40}],
        "categories": [{"id": 1, "name": "thing"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [5, 5, 10, 10]},  # fine
            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [5, 5, 0, 10]},  # zero width
            {"id": 3, "image_id": 1, "category_id": 1, "bbox": [60, 5, 10, 10]},  # right of the image
            {"id": 4, "image_id": 1, "category_id": 1, "bbox": [45, 30, 20, 20]},  # crosses the border
        ],
    }
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(data))
    with pytest.warns(UserWarning) as record:
        split = read_coco(ann, tmp_path)
    messages = [str(w.message) for w in record]
    assert any("dropped 2 degenerate or out-of-image box(es)" in m and "ann 2" in m and "ann 3" in m for m in messages)
    assert any("clipped 1 box(es)" in m for m in messages)
    np.testing.assert_array_equal(split.records[0].boxes, [[5, 5, 15, 15], [45, 30, 50, 40]])


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "annotation file is empty"),
        ("{not json", "not valid JSON"),
        (json.dumps({"images": [], "annotations": [], "categories": [{"id": 1, "name": "a"}]}), "no images"),
        (json.dumps({"images": [{"id": 1, "file_name": "a.jpg", "width": 9, "height": 9}], "categories": []}),
         "no categories"),
        (
            json.dumps({"images": [{"id": 1, "file_name": "a.jpg", "width": 9, "height": 9}],
                        "categories": [{"id": 1, "name": "a"}],
                        "annotations": [{"id": 5, "image_id": 1, "category_id": 2, "bbox": [0, 0, 2, 2]}]}),
            "category_id not in",
        ),
    ],
)  # fmt: skip
def test_bad_coco_files_name_the_file(tmp_path, content, message) -> None:
    ann = tmp_path / "instances_bad.json"
    ann.write_text(content)
    with pytest.raises(ValueError, match=message) as err:
        read_coco(ann, tmp_path)
    assert str(ann) in str(err.value)
    with pytest.raises(FileNotFoundError, match="annotation file not found"):
        read_coco(tmp_path / "missing.json", tmp_path)


def test_bad_voc_files_name_the_file(shapes_copy) -> None:
    voc = shapes_copy / "VOCdevkit" / "VOC2007"
    first = (voc / "ImageSets" / "Main" / "val.txt").read_text().split()[0]
    xml = voc / "Annotations" / f"{first}.xml"
    text = xml.read_text()
    for name in CLASSES:
        text = text.replace(f"<name>{name}</name>", "<name>hexagon</name>")
    xml.write_text(text)
    with pytest.raises(ValueError, match="'hexagon' is not one of") as err:
        read_voc(shapes_copy, "val", CLASSES)
    assert str(xml) in str(err.value)
    xml.write_text("<annotation><size>")
    with pytest.raises(ValueError, match="not valid XML"):
        read_voc(shapes_copy, "val", CLASSES)
    xml.unlink()
    with pytest.raises(FileNotFoundError, match=f"{first}.xml: annotation file not found"):
        read_voc(shapes_copy, "val", CLASSES)
    with pytest.raises(FileNotFoundError, match="test.txt: VOC image set list not found"):
        read_voc(shapes_copy, "test", CLASSES)


def test_missing_and_corrupt_images_are_skipped_with_a_counted_warning(shapes_copy) -> None:
    split = read_coco(shapes_copy / "annotations" / "instances_train.json", shapes_copy / "images" / "train")
    split.records[0].path.unlink()
    split.records[1].path.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    ds = DetectionDataset(split, train=True)
    items = [ds[i] for i in range(4)]
    assert isinstance(items[0], SkippedSample) and "not found" in items[0].reason
    assert isinstance(items[1], SkippedSample) and "cannot decode" in items[1].reason
    batch = collate_detection(items)  # dropped and listed; the task counts and reports them
    counter = SkipCounter()
    counter.add(batch.skipped)
    with pytest.warns(UserWarning, match=r"training: skipped 2 unreadable image\(s\)") as record:
        assert counter.report("training") == [SkippedSample(str(r.path), why) for r, why in zip(split.records, [
            "image file not found", items[1].reason])]  # fmt: skip
    assert str(split.records[0].path) in str(record[0].message) and counter.items == []
    assert len(batch) == 2 and [p for p, _ in batch.skipped] == [str(r.path) for r in split.records[:2]]
    from lightning_fabric.utilities.apply_func import move_data_to_device

    moved = move_data_to_device(batch, torch.device("cpu"))  # what Lightning does with every batch
    assert moved.skipped == batch.skipped and len(moved.images) == 2


def test_image_whose_size_disagrees_with_its_annotation_is_skipped(shapes_copy) -> None:
    split = read_coco(shapes_copy / "annotations" / "instances_val.json", shapes_copy / "images" / "val")
    split.records[0].width += 1
    item = DetectionDataset(split, train=False)[0]
    assert isinstance(item, SkippedSample) and "annotation says" in item.reason


def test_training_sample_and_flip_keep_boxes_on_the_object(shapes_root) -> None:
    split = read_coco(shapes_root / "annotations" / "instances_train.json", shapes_root / "images" / "train")
    plain = DetectionDataset(split, train=True, transforms=detection_transforms(True, hflip=0.0, photometric=0.0))
    flipped = DetectionDataset(split, train=True, transforms=detection_transforms(True, hflip=1.0, photometric=0.0))
    (img, tgt), (fimg, ftgt) = plain[0], flipped[0]
    assert img.dtype == torch.float32 and float(img.min()) >= 0 and float(img.max()) <= 1
    torch.testing.assert_close(fimg, img.flip(-1))
    w = img.shape[-1]
    boxes = tgt["boxes"].as_subclass(torch.Tensor)
    expected = torch.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], 1)
    torch.testing.assert_close(ftgt["boxes"].as_subclass(torch.Tensor), expected)
    assert torch.equal(tgt["labels"], torch.from_numpy(split.records[0].labels))
    assert tgt["image_id"] == split.records[0].image_id


def test_difficult_objects_are_left_out_of_training_unless_asked(shapes_root) -> None:
    split = read_voc(shapes_root, "train+val", CLASSES)
    idx = next(i for i, r in enumerate(split.records) if r.ignore.any())
    rec = split.records[idx]
    no_aug = detection_transforms(True, 0.0, 0.0)
    _, tgt = DetectionDataset(split, train=True, transforms=no_aug)[idx]
    _, all_tgt = DetectionDataset(split, train=True, transforms=no_aug, keep_ignored=True)[idx]
    assert len(tgt["labels"]) == int((~rec.ignore).sum()) and len(all_tgt["labels"]) == len(rec.labels)


def test_predict_folder_dataset(tmp_path, shapes_root) -> None:
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        shutil.copy(next((shapes_root / "images" / "val").glob("*.jpg")), tmp_path / sub / "same.jpg")
    (tmp_path / "b" / "empty_list.txt").write_text("\n")
    ds = ImageFolderDataset(tmp_path)
    assert len(ds) == 2 and ds.names == ["a__same", "b__same"]  # tasks.images.output_names
    img, meta = ds[1]
    assert img.shape[0] == 3 and meta["image_id"] == 1 and meta["path"].endswith("b/same.jpg")
    with pytest.raises(ValueError, match="no images found"):
        ImageFolderDataset(tmp_path / "b" / "empty_list.txt")  # a list file naming nothing
    with pytest.raises(FileNotFoundError, match="no such image"):
        ImageFolderDataset(tmp_path / "nope")


def test_data_module_generates_the_shapes_and_links_classes(tmp_path) -> None:
    from tasks.data.detection import DetectionDataModule

    dm = DetectionDataModule(root=str(tmp_path / "shapes"), shapes=TINY, batch_size=2, num_workers=0)
    assert dm.classes == list(CLASSES) and dm.category_ids == [1, 2, 3]  # known before any data exists
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.train_set) == TINY.num_train and len(dm.val_set) == TINY.num_val
    batch = next(iter(dm.train_dataloader()))
    assert len(batch.images) == 2 and all(t["boxes"].shape[-1] == 4 for t in batch.targets)
    voc = DetectionDataModule(root=str(tmp_path / "shapes"), layout="voc", shapes=TINY, num_workers=0)
    voc.prepare_data()  # same config: not regenerated
    voc.setup("validate")
    assert voc.val_set.split.layout == "voc" and len(voc.val_set) == TINY.num_val
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        coco = DetectionDataModule(
            root=str(tmp_path / "shapes"), num_workers=0
        )  # plain COCO tree, classes from the file
        assert coco.classes == list(CLASSES)


def test_data_module_reads_coco_categories_from_the_file(tmp_path) -> None:
    from tasks.data.detection import DetectionDataModule

    dm = DetectionDataModule(root=str(tmp_path), train_split="train2017", val_split="val2017", num_workers=0)
    with pytest.raises(FileNotFoundError, match="instances_val2017.json"):
        _ = dm.classes
    (tmp_path / "annotations").mkdir()
    cats = [{"id": 9, "name": "dog"}, {"id": 3, "name": "cat"}]
    (tmp_path / "annotations" / "instances_val2017.json").write_text(json.dumps({"images": [], "categories": cats}))
    assert dm.classes == ["cat", "dog"] and dm.category_ids == [3, 9]  # labels 1, 2 -> ids 3, 9
