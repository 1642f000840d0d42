"""Segmentation data: VOC and COCO readers, bad masks, joint transforms, sliding windows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import tv_tensors

from tasks.data.segmentation import (
    BadMaskError,
    COCOSegmentation,
    ImageList,
    SegmentationDataModule,
    VOCSegmentation,
    collate_eval,
    read_mask,
    train_transforms,
)
from tasks.data.shapes import ShapesConfig, ensure_shapes, voc_palette
from tasks.images import SkippedSample
from tasks.segment import sliding_window_logits, write_prediction

CLASSES = ["background", "circle", "square", "triangle"]
TINY_SHAPES = ShapesConfig(
    num_train=6, num_val=3, min_image_size=40, max_image_size=56, min_object_size=10, max_object_size=24
)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return ensure_shapes(tmp_path_factory.mktemp("seg") / "shapes", TINY_SHAPES, progress=False)


def _save_png(path: Path, arr: np.ndarray, mode: str = "P") -> Path:
    im = Image.fromarray(arr.astype(np.uint8), mode="L")
    if mode == "P":
        im = im.convert("P")
        im.putpalette(voc_palette())
        im = Image.fromarray(arr.astype(np.uint8), mode="P")
        im.putpalette(voc_palette())
    elif mode == "RGB":
        im = im.convert("RGB")
    im.save(path)
    return path


def test_voc_reader_gives_images_and_index_masks(shapes: Path) -> None:
    ds = VOCSegmentation(shapes, "train", num_classes=4, year="VOC2007")
    assert len(ds) == 6
    s = ds[0]
    assert s["image"].dtype == torch.uint8 and s["image"].shape[0] == 3
    assert s["mask"].shape == s["image"].shape[1:]
    labels = set(torch.unique(s["mask"]).tolist())
    assert labels <= {0, 1, 2, 3, 255} and 255 in labels and len(labels - {0, 255}) >= 1


def test_coco_masks_via_pycocotools_equal_the_semantic_pngs(shapes: Path) -> None:
    ds = COCOSegmentation(shapes / "annotations/instances_val.json", shapes / "images/val", CLASSES)
    for i in range(len(ds)):
        s = ds[i]
        png = np.array(Image.open(shapes / "masks/val" / Path(s["path"]).with_suffix(".png").name))
        assert torch.equal(s["mask"], torch.from_numpy(png.astype(np.int64)))


def test_coco_crowd_is_ignored_and_unknown_categories_are_background(shapes: Path, tmp_path: Path) -> None:
    import json

    data = json.loads((shapes / "annotations/instances_val.json").read_text())
    first = data["annotations"][0]
    first["iscrowd"] = 1
    (tmp_path / "ann.json").write_text(json.dumps(data))
    ds = COCOSegmentation(tmp_path / "ann.json", shapes / "images/val", ["background", "circle"])
    image_index = ds.ids.index(first["image_id"])
    mask = ds[image_index]["mask"]
    assert (mask == 255).any()
    assert set(torch.unique(mask).tolist()) <= {0, 1, 255}


def test_bad_masks_give_errors_naming_the_file(tmp_path: Path) -> None:
    good = np.zeros((6, 8))
    good[2:4, 2:5] = 2
    good[0, 0] = 255
    assert torch.equal(read_mask(_save_png(tmp_path / "ok.png", good), 3, (6, 8)), torch.from_numpy(good).long())
    bad = good.copy()
    bad[5, 7] = 7
    with pytest.raises(BadMaskError, match=r"bad\.png: mask has labels \[7\] outside 0\.\.2"):
        read_mask(_save_png(tmp_path / "bad.png", bad), 3)
    with pytest.raises(BadMaskError, match=r"ok\.png: mask is 6x8 \(HxW\) but its image is 8x6"):
        read_mask(tmp_path / "ok.png", 3, (8, 6))
    with pytest.raises(BadMaskError, match=r"rgb\.png: .*got mode RGB"):
        read_mask(_save_png(tmp_path / "rgb.png", good, "RGB"), 3)
    with pytest.raises(BadMaskError, match="missing.png: mask file not found"):
        read_mask(tmp_path / "missing.png", 3)
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(BadMaskError, match="corrupt.png: cannot read mask"):
        read_mask(tmp_path / "corrupt.png", 3)


def test_voc_mask_of_wrong_size_and_corrupt_image(shapes: Path, tmp_path: Path) -> None:
    import shutil

    root = tmp_path / "VOC2007"
    shutil.copytree(shapes / "VOCdevkit/VOC2007", root)
    ids = (root / "ImageSets/Segmentation/val.txt").read_text().split()
    _save_png(root / "SegmentationClass" / f"{ids[0]}.png", np.zeros((5, 5)))
    (root / "JPEGImages" / f"{ids[1]}.jpg").write_bytes(b"not a jpeg")
    ds = VOCSegmentation(root, "val", num_classes=4)
    with pytest.raises(BadMaskError, match=f"{ids[0]}.png: mask is 5x5"):
        ds[0]
    skipped = ds[1]
    assert isinstance(skipped, SkippedSample) and skipped.path.endswith(f"{ids[1]}.jpg")
    batch = collate_eval([skipped, ds[2]])
    assert batch["id"] == [ids[2]] and len(batch["mask"]) == 1
    assert batch["skipped"] == [(skipped.path, skipped.reason)]  # counted and reported by the task


def test_joint_transforms_keep_image_and_mask_aligned() -> None:
    torch.manual_seed(0)
    mask = torch.zeros(60, 80, dtype=torch.long)
    mask[10:40, 20:50] = 1
    mask[45:55, 5:70] = 2
    image = (mask * 100).to(torch.uint8).expand(3, -1, -1).clone()  # the image spells out its mask
    tf = train_transforms(crop_size=96, scale_size=96, scale_range=(0.5, 1.5))
    for _ in range(10):
        out = tf({"image": tv_tensors.Image(image), "mask": tv_tensors.Mask(mask)})
        img, m = out["image"], out["mask"]
        assert img.shape == (3, 96, 96) and m.shape == (96, 96)
        assert set(torch.unique(m).tolist()) <= {0, 1, 2, 255}  # nearest for masks: no new labels
        valid = m != 255
        # away from label edges (blurred by bilinear resizing) the image still spells the mask
        mf = m.float()[None, None]
        flat = (F.max_pool2d(mf, 5, 1, 2) == -F.max_pool2d(-mf, 5, 1, 2))[0, 0] & valid
        assert flat.sum() > 300
        assert torch.equal((img[0][flat].float() / 100).round().long(), m[flat])
        assert (img[:, ~valid] == 0).all()  # padding: 0 in the image where the mask says ignore


def test_sliding_window_equals_whole_image_for_a_pointwise_model() -> None:
    model = torch.nn.Conv2d(3, 4, 1)
    x = torch.randn(1, 3, 37, 50)
    with torch.no_grad():
        for window, overlap in [(16, 1 / 3), (20, 0.5), (64, 0.25)]:
            torch.testing.assert_close(sliding_window_logits(model, x, window, overlap, batch_size=3), model(x))


def test_write_prediction_palette_png_and_overlay(tmp_path: Path) -> None:
    image = torch.full((3, 10, 12), 200, dtype=torch.uint8)
    pred = torch.zeros(10, 12, dtype=torch.uint8)
    pred[2:5, 3:9] = 2
    path = write_prediction(tmp_path, "x", image, pred, num_classes=3, alpha=0.5)
    png = Image.open(path)
    assert png.mode == "P" and np.array_equal(np.array(png), pred.numpy())
    overlay = np.array(Image.open(tmp_path / "x_overlay.png"))
    assert overlay.shape == (10, 12, 3)
    assert (overlay[0, 0] == 200).all()  # background untouched
    color = np.array(voc_palette()[6:9])  # class 2's VOC colour, blended half way
    assert np.abs(overlay[3, 4].astype(int) - (0.5 * 200 + 0.5 * color)).max() <= 1
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temp files


def test_data_module_generates_shapes_and_defaults_classes(tmp_path: Path) -> None:
    dm = SegmentationDataModule(
        root=str(tmp_path / "shapes"), layout="coco", shapes=TINY_SHAPES, crop_size=32, batch_size=2, num_workers=0
    )
    assert dm.class_names == CLASSES and dm.num_classes == 4
    dm.prepare_data()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 3, 32, 32) and batch["image"].dtype == torch.uint8
    assert batch["mask"].shape == (2, 32, 32) and batch["mask"].dtype == torch.long
    val = next(iter(dm.val_dataloader()))
    assert all(img.shape[1:] == m.shape for img, m in zip(val["image"], val["mask"]))


def test_predict_image_list_ids_stay_distinct_across_subfolders(shapes: Path, tmp_path: Path) -> None:
    import shutil

    src = next((shapes / "VOCdevkit/VOC2007/JPEGImages").glob("*.jpg"))
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        shutil.copy(src, tmp_path / sub / "same.jpg")
    shutil.copy(src, tmp_path / "other.jpg")
    folder = ImageList(tmp_path)
    assert folder.ids == ["a__same", "b__same", "other"]  # same-named files never overwrite each other's outputs
    (tmp_path / "list.txt").write_text("# predict these\nb/same.jpg\n\nother.jpg\n")
    listed = ImageList(tmp_path / "list.txt")  # relative to the list's folder, not the working directory
    assert listed.ids == ["same", "other"] and listed.paths == [tmp_path / "b/same.jpg", tmp_path / "other.jpg"]
    sample = listed[0]
    assert sample["id"] == "same" and "mask" not in sample and sample["image"].shape[0] == 3
