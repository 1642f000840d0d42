"""Hostile input files: every one is generated here, none is allocated at full size.

16-bit images, decompression-bomb headers, EXIF-rotated JPEGs, duplicate COCO ids, non-numeric
VOC fields, images smaller than the network (ReID identities below -1: test_reid_data.py).
``docs/bad-input.md`` is the table of what happens to each.
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from tasks.data.coco import read_coco
from tasks.data.detection import DetectionDataset
from tasks.data.masks import BadMaskError, read_mask
from tasks.data.reid import ReIDDataset, ReIDSample
from tasks.data.segmentation import COCOSegmentation, VOCSegmentation
from tasks.data.voc import read_voc
from tasks.images import MAX_IMAGE_PIXELS, BadImageError, ImageListDataset, SkippedSample, read_image


# ---------------------------------------------------------------------------- file makers
def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png16(arr: np.ndarray) -> bytes:
    """A 16-bit PNG of ``arr`` (H, W) gray or (H, W, 3) RGB, written by hand: Pillow cannot write 48-bit RGB."""
    arr = np.ascontiguousarray(arr.astype(">u2"))
    h, w = arr.shape[:2]
    color_type = 2 if arr.ndim == 3 else 0
    raw = b"".join(b"\x00" + arr[y].tobytes() for y in range(h))
    ihdr = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(raw)) + _chunk(b"IEND", b"")


def bomb_png(path: Path, width: int, height: int, mode: str = "RGB") -> Path:
    """A tiny valid PNG whose IHDR then declares ``width x height`` (CRC fixed): nothing big exists."""
    buf = io.BytesIO()
    Image.new(mode, (4, 4)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))
    return path


def exif_rotated_jpeg(path: Path, stored_wh: tuple[int, int] = (48, 32), orientation: int = 6) -> np.ndarray:
    """A JPEG stored ``stored_wh`` (W, H) with EXIF orientation ``orientation``; returns the displayed pixels."""
    w, h = stored_wh
    arr = np.zeros((h, w, 3), np.uint8)
    arr[: h // 2, : w // 4] = (255, 0, 0)  # a red block top-left of the stored pixels
    arr[h // 2 :, w // 2 :] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(arr).save(path, format="JPEG", quality=95, exif=exif.tobytes())
    with Image.open(path) as im:
        assert (im.size, im.getexif()[0x0112]) == ((w, h), orientation)
        return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))


def _coco(path: Path, images: list[dict], anns: list[dict] | None = None) -> Path:
    cats = [{"id": 1, "name": "square"}]
    path.write_text(json.dumps({"images": images, "annotations": anns or [], "categories": cats}))
    return path


def _img(i: int, name: str = "", w: int = 8, h: int = 8) -> dict:
    return {"id": i, "file_name": name or f"{i}.png", "width": w, "height": h}


# ---------------------------------------------------------------------------- duplicate COCO ids
def test_duplicate_coco_image_ids_are_refused_by_detection_and_segmentation(tmp_path: Path) -> None:
    ann = _coco(tmp_path / "dup.json", [_img(5, "a.png"), _img(5, "b.png"), _img(6)],
                [{"id": 1, "image_id": 5, "category_id": 1, "bbox": [0, 0, 4, 4]}])  # fmt: skip
    with pytest.raises(ValueError, match=r"dup\.json: duplicate image ids \[5\] \(\['a\.png', 'b\.png'\]\)"):
        read_coco(ann, tmp_path)
    with pytest.raises(ValueError, match=r"dup\.json: duplicate image ids \[5\]"):
        COCOSegmentation(ann, tmp_path, ["background", "square"])


def test_duplicate_coco_annotation_ids_are_refused(tmp_path: Path) -> None:
    anns = [{"id": 3, "image_id": i, "category_id": 1, "bbox": [0, 0, 4, 4]} for i in (1, 2)]
    ann = _coco(tmp_path / "dup.json", [_img(1), _img(2)], anns)
    with pytest.raises(ValueError, match=r"dup\.json: duplicate annotation ids \[3\]"):
        read_coco(ann, tmp_path)
    with pytest.raises(ValueError, match=r"dup\.json: duplicate annotation ids \[3\]"):
        COCOSegmentation(ann, tmp_path, ["background", "square"])


# ---------------------------------------------------------------------------- 16-bit images
def _wide(shape: tuple[int, ...]) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 65536, shape).astype(np.uint16)


def test_16bit_grayscale_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    wide = _wide((6, 7))
    path = tmp_path / "gray16.png"
    Image.fromarray(wide).save(path)
    assert Image.open(path).mode == "I;16"
    expected = torch.from_numpy((wide >> 8).astype(np.uint8))  # torchvision's to_dtype(uint16 -> uint8, scale=True)
    image = read_image(path)
    assert image.dtype == torch.uint8 and image.shape == (3, 6, 7)
    assert all(torch.equal(c, expected) for c in image)  # was 255 almost everywhere
    assert torch.equal(read_image(path, mode="L")[0], expected)


@pytest.mark.parametrize("kind", ["I;16B tiff", "I pgm", "RGB 48-bit png"])
def test_other_16bit_layouts_keep_their_brightness(tmp_path: Path, kind: str) -> None:
    if kind == "RGB 48-bit png":
        wide = _wide((5, 4, 3))
        (path := tmp_path / "rgb48.png").write_bytes(png16(wide))
        expected = (wide >> 8).astype(np.uint8)
    else:
        wide = _wide((5, 4))
        if kind == "I;16B tiff":
            Image.fromarray(wide.astype(">u2")).save(path := tmp_path / "big.tif")
        else:  # 16-bit PGM, read by Pillow as 32-bit "I"
            (path := tmp_path / "gray.pgm").write_bytes(b"P5\n4 5\n65535\n" + wide.astype(">u2").tobytes())
        expected = np.repeat((wide >> 8).astype(np.uint8)[..., None], 3, axis=2)
    assert Image.open(path).mode == kind.split()[0]
    np.testing.assert_array_equal(read_image(path).permute(1, 2, 0).numpy(), expected)


def test_pixels_without_a_defined_range_are_refused_by_name(tmp_path: Path) -> None:
    Image.fromarray(np.full((4, 4), 70000, np.int32)).save(tmp_path / "i32.tif")
    Image.fromarray(np.full((4, 4), 0.5, np.float32)).save(tmp_path / "f32.tif")
    with pytest.raises(BadImageError, match=r"i32\.tif: 32-bit integer pixels in 70000\.\.70000, outside 0\.\.65535"):
        read_image(tmp_path / "i32.tif")
    with pytest.raises(BadImageError, match=r"f32\.tif: 32-bit float pixels have no defined range"):
        read_image(tmp_path / "f32.tif")


def test_every_reader_sees_16bit_images_scaled(tmp_path: Path) -> None:
    """Detection, segmentation, ReID and image lists all read through read_image: same 8-bit pixels."""
    wide = _wide((40, 40))
    path = tmp_path / "img.png"
    Image.fromarray(wide).save(path)
    as8 = torch.from_numpy((wide >> 8).astype(np.uint8)).expand(3, -1, -1)
    # detection: float [0, 1]
    from tasks.data.records import DetectionRecord, DetectionSplit

    empty = np.zeros((0, 4), np.float32)
    rec = DetectionRecord(1, path, 40, 40, empty, np.zeros(0, np.int64), np.zeros(0, bool), np.zeros(0, np.float32))
    det, _ = DetectionDataset(DetectionSplit([rec], ["a"], [1], "x", "coco"), train=False)[0]
    torch.testing.assert_close(det, as8.float() / 255)
    # ReID: float [0, 1] after its transform
    reid = ReIDDataset([ReIDSample(str(path), 1, 0)], transform=lambda x: x.float() / 255)[0]["image"]
    torch.testing.assert_close(reid, as8.float() / 255)
    # image lists (segmentation/detection predict, ReID extract): uint8
    assert torch.equal(ImageListDataset([path])[0]["image"], as8)
    # segmentation: uint8 images, masks read as labels
    voc = tmp_path / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / sub).mkdir(parents=True)
    (voc / "JPEGImages" / "a.jpg").write_bytes(path.read_bytes())  # Pillow reads the content, not the suffix
    labels = np.zeros((40, 40), np.uint16)
    labels[10:20, 5:30], labels[0, :] = 2, 255
    Image.fromarray(labels).save(voc / "SegmentationClass" / "a.png")  # a 16-bit mask of labels
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("a\n")
    sample = VOCSegmentation(voc, "val", num_classes=3)[0]
    assert torch.equal(sample["image"].as_subclass(torch.Tensor), as8)
    assert torch.equal(sample["mask"].as_subclass(torch.Tensor), torch.from_numpy(labels.astype(np.int64)))


def test_16bit_mask_with_values_of_256_or_more_is_refused(tmp_path: Path) -> None:
    labels = np.zeros((8, 8), np.uint16)
    labels[2:4, 2:4] = 1
    Image.fromarray(labels).save(tmp_path / "ok.png")
    assert Image.open(tmp_path / "ok.png").mode == "I;16"
    assert torch.equal(read_mask(tmp_path / "ok.png", num_classes=2), torch.from_numpy(labels.astype(np.int64)))
    labels[0, 0], labels[1, 1] = 256, 4000
    Image.fromarray(labels).save(tmp_path / "depth.png")
    with pytest.raises(BadMaskError, match=r"depth\.png: a 16-bit mask holds values \[256, 4000\] outside 0\.\.255"):
        read_mask(tmp_path / "depth.png", num_classes=2)


# ---------------------------------------------------------------------------- images smaller than the net
def _tiny_segmentation_task(**kw: object):
    from tasks.segment import SegmentationTask

    tiny = {"family": "unet", "arch": "vgg11_bn", "width_mult": 0.125, "decoder_channels": [16, 16, 8, 8, 8]}
    return SegmentationTask(num_classes=3, **tiny, **kw).eval()


@pytest.mark.parametrize(("scale", "ceil_mode", "size", "small"), [
    (0.5, True, (1, 1), True), (0.5, True, (2, 9), False), (1.0, True, (1, 1), False),
    (1.0, False, (31, 64), True), (1.0, False, (32, 32), False),
])  # fmt: skip
def test_too_small_matches_what_the_network_can_take(scale: float, ceil_mode: bool, size: tuple, small: bool) -> None:
    task = _tiny_segmentation_task(inference_scale=scale, ceil_mode=ceil_mode)
    image = torch.zeros(3, *size, dtype=torch.uint8)
    assert (task.too_small(image) is not None) == small
    if not small:
        assert task.predict_logits(image).shape == (1, 3, *size)
    else:
        with pytest.raises((RuntimeError, ValueError)):  # what the skip prevents
            task.predict_logits(image)


def test_image_smaller_than_the_network_is_skipped_in_evaluation_and_predict(tmp_path: Path) -> None:
    from tasks.segment import SegmentationWriter

    task = _tiny_segmentation_task(inference_scale=0.5)
    ok = torch.randint(0, 256, (3, 40, 40), dtype=torch.uint8)
    dot = torch.zeros(3, 1, 1, dtype=torch.uint8)
    batch = {"image": [dot, ok], "mask": [torch.zeros(1, 1, dtype=torch.long), torch.zeros(40, 40, dtype=torch.long)],
             "id": ["dot", "ok"], "path": ["dot.png", "ok.png"], "skipped": []}  # fmt: skip
    task.eval_step(batch)
    assert task.confmat.confmat.sum() == 40 * 40  # only the 40x40 image counted
    assert [(s.path, s.reason) for s in task.eval_skips.items] == [
        ("dot.png", "image is 1x1 (0x0 at inference_scale 0.5), smaller than the network's minimum input 1x1")
    ]
    task.eval_skips.reset()
    writer = SegmentationWriter(output_dir=str(tmp_path / "pred"))
    writer.outputs.begin()
    unlabelled = {k: v for k, v in batch.items() if k != "mask"}
    written = task.predict_step(unlabelled, 0)
    writer.write_batch(task, written, unlabelled)  # the masks replaced by the paths written
    assert written == [str(tmp_path / "pred" / "ok.png")] and not (tmp_path / "pred" / "dot.png").exists()
    with pytest.warns(UserWarning, match=r"predict: skipped 1 unreadable image\(s\): dot\.png \(image is 1x1"):
        task.predict_skipped()


def test_fit_with_a_1x1_validation_image_writes_its_checkpoint(tmp_path: Path) -> None:
    import yaml

    from tasks.data.shapes import ShapesConfig, ensure_shapes
    from tasks.segment import main

    root = tmp_path / "shapes"
    ensure_shapes(root, ShapesConfig(num_train=2, num_val=2, min_image_size=40, max_image_size=40,
                                     min_object_size=10, max_object_size=20, layouts=("voc",)))  # fmt: skip
    voc = root / "VOCdevkit" / "VOC2007"
    first = (voc / "ImageSets" / "Segmentation" / "val.txt").read_text().split()[0]
    Image.new("RGB", (1, 1), (9, 9, 9)).save(voc / "JPEGImages" / f"{first}.jpg")
    Image.new("L", (1, 1), 0).save(voc / "SegmentationClass" / f"{first}.png")
    cfg = {
        "trainer": {"accelerator": "cpu", "max_epochs": 1, "limit_train_batches": 1, "num_sanity_val_steps": 0,
                    "enable_progress_bar": False, "enable_model_summary": False, "default_root_dir": str(tmp_path),
                    "logger": False},
        "model": {"family": "unet", "arch": "vgg11_bn", "width_mult": 0.125, "decoder_channels": [16, 16, 8, 8, 8],
                  "inference_scale": 0.5},
        "data": {"root": str(root), "layout": "voc", "crop_size": 32, "batch_size": 2, "eval_batch_size": 2,
                 "num_workers": 0},
    }  # fmt: skip
    (config := tmp_path / "seg.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.warns(
        UserWarning, match=rf"val evaluation: skipped 1 unreadable image\(s\): .*{first}\.jpg \(image is 1x1"
    ):
        main(["fit", "--config", str(config)])
    assert list(tmp_path.rglob("last.ckpt")), "the epoch's checkpoint was not written"


# ---------------------------------------------------------------------------- malformed annotation fields
@pytest.mark.parametrize(("field", "value", "message"), [
    ("width", "wide", r"<size> <width> is not a number: 'wide'"),
    ("xmin", "12px", r"object 0 \(dog\) <bndbox> <xmin> is not a number: '12px'"),
    ("ymax", "nan", r"object 0 \(dog\) <bndbox> <ymax> is not a finite number: 'nan'"),
])  # fmt: skip
def test_non_numeric_voc_fields_name_the_file_image_and_field(tmp_path: Path, field: str, value: str, message: str):
    voc = tmp_path / "VOCdevkit" / "VOC2007"
    (voc / "ImageSets" / "Main").mkdir(parents=True)
    (voc / "Annotations").mkdir()
    (voc / "ImageSets" / "Main" / "test.txt").write_text("000005\n")
    vals = {"width": "64", "height": "48", "xmin": "2", "ymin": "3", "xmax": "20", "ymax": "30", field: value}
    (voc / "Annotations" / "000005.xml").write_text(
        f"<annotation><size><width>{vals['width']}</width><height>{vals['height']}</height></size>"
        f"<object><name>dog</name><bndbox><xmin>{vals['xmin']}</xmin><ymin>{vals['ymin']}</ymin>"
        f"<xmax>{vals['xmax']}</xmax><ymax>{vals['ymax']}</ymax></bndbox></object></annotation>"
    )
    with pytest.raises(ValueError, match=r"000005\.xml: image 000005: " + message):
        read_voc(tmp_path, "test")


@pytest.mark.parametrize(("image", "ann", "message"), [
    ({"id": 1, "width": 8, "height": 8}, None, r"image 1 has no 'file_name'"),
    ({"id": 1, "file_name": "a.png", "width": "8", "height": 8}, None, r"image 1 \(a\.png\): 'width' must be"),
    (None, {"bbox": [1, 2, 3]}, r"annotation 9 of image 1: 'bbox' must be 4 numbers \[x, y, w, h\], got \[1, 2, 3\]"),
    (None, {"bbox": [1, 2, "3", 4]}, r"annotation 9 of image 1: 'bbox' must be 4 numbers"),
    (None, {"category_id": None}, r"annotation 9 has no 'category_id'"),
])  # fmt: skip
def test_malformed_coco_fields_name_the_file_and_id(tmp_path: Path, image: dict | None, ann: dict | None, message):
    a = {"id": 9, "image_id": 1, "category_id": 1, **(ann or {})}
    path = _coco(tmp_path / "bad.json", [image or _img(1)], [{k: v for k, v in a.items() if v is not None}])
    for reader in (lambda: read_coco(path, tmp_path), lambda: COCOSegmentation(path, tmp_path, ["bg", "square"])):
        with pytest.raises(ValueError, match=r"bad\.json: " + message):
            reader()


def test_malformed_coco_segmentation_names_the_annotation(tmp_path: Path) -> None:
    Image.new("RGB", (8, 8)).save(tmp_path / "1.png")
    ann = {"id": 9, "image_id": 1, "category_id": 1, "segmentation": [[1, 2]], "area": 1}
    ds = COCOSegmentation(_coco(tmp_path / "seg.json", [_img(1)], [ann]), tmp_path, ["bg", "square"])
    with pytest.raises(BadMaskError, match=r"seg\.json: annotation 9 of image 1 \(1\.png\) has an unreadable"):
        ds[0]


def test_mask_with_a_decompression_bomb_header_is_a_clear_error(tmp_path: Path) -> None:
    for w, h in [(20_000, 20_000), (10_000, 9_000)]:  # above Pillow's hard limit / between its warning and limit
        bomb = bomb_png(tmp_path / f"{w}.png", w, h, mode="L")
        with pytest.raises(BadMaskError, match=rf"{w}\.png: cannot read mask \(.*pixels"):
            read_mask(bomb, num_classes=3)


# ---------------------------------------------------------------------------- pixel limit
def test_images_above_the_pixel_limit_are_skipped_before_decoding(tmp_path: Path, monkeypatch) -> None:
    assert MAX_IMAGE_PIXELS == Image.MAX_IMAGE_PIXELS  # the documented choice: Pillow's warning threshold
    between = bomb_png(tmp_path / "between.png", 10_000, 9_000)  # 90 Mpx: Pillow only warns
    with pytest.raises(BadImageError, match=r"between\.png: image is 10000x9000 = 90000000 pixels, above the limit"):
        read_image(between)
    huge = bomb_png(tmp_path / "huge.png", 100_000, 100_000)  # Pillow's own error, as a skip reason
    with pytest.raises(BadImageError, match=r"huge\.png: too many pixels, refused before decoding"):
        read_image(huge)
    ok = tmp_path / "ok.png"
    Image.new("RGB", (40, 30)).save(ok)
    items = ImageListDataset([between, huge, ok])
    assert (
        isinstance(items[0], SkippedSample) and isinstance(items[1], SkippedSample) and items[2]["image"].shape[1] == 30
    )
    monkeypatch.setenv("VGGBACKBONE_MAX_IMAGE_PIXELS", "1000")  # read in every loader process
    with pytest.raises(BadImageError, match=r"ok\.png: image is 40x30 = 1200 pixels, above the limit of 1000"):
        read_image(ok)
    monkeypatch.setenv("VGGBACKBONE_MAX_IMAGE_PIXELS", "lots")
    with pytest.raises(ValueError, match="VGGBACKBONE_MAX_IMAGE_PIXELS='lots' is not a whole number"):
        read_image(ok)


def test_corrupt_truncated_and_missing_images_are_still_reasons_not_crashes(tmp_path: Path) -> None:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, format="PNG")
    (tmp_path / "cut.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (tmp_path / "junk.jpg").write_bytes(b"not an image")
    (tmp_path / "empty.jpg").write_bytes(b"")
    reasons = [read_reason(tmp_path / n) for n in ("cut.png", "junk.jpg", "empty.jpg", "gone.jpg")]
    assert reasons[0].startswith("cannot decode image") and reasons[1].startswith("cannot decode image")
    assert reasons[2:] == ["image file is empty", "image file not found"]


def read_reason(path: Path) -> str:
    with pytest.raises(BadImageError) as e:
        read_image(path)
    assert e.value.path == str(path)
    return e.value.reason


# ---------------------------------------------------------------------------- EXIF orientation
def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    displayed = exif_rotated_jpeg(tmp_path / "rot.jpg")  # stored 48x32 (WxH), displayed 32 wide, 48 high
    image = read_image(tmp_path / "rot.jpg")
    assert image.shape == (3, 48, 32)
    np.testing.assert_array_equal(image.permute(1, 2, 0).numpy(), displayed)
    assert image[0, 5, 28] > 200 and image[2, 5, 28] < 60  # the red block is now top-right (rotated 90 deg cw)


def test_exif_orientation_in_detection_boxes_are_for_the_displayed_image(tmp_path: Path) -> None:
    from tasks.data.records import DetectionRecord, DetectionSplit

    path = tmp_path / "rot.jpg"
    exif_rotated_jpeg(path)
    box = np.array([[16, 0, 32, 24]], np.float32)  # around the red block, as displayed

    def sample(w: int, h: int):
        rec = DetectionRecord(1, path, w, h, box, np.ones(1, np.int64), np.zeros(1, bool), np.ones(1, np.float32))
        return DetectionDataset(DetectionSplit([rec], ["a"], [1], "x", "coco"), train=True,
                                transforms=lambda img, tgt: (img, tgt))[0]  # fmt: skip

    image, target = sample(32, 48)
    assert image.shape == (3, 48, 32) and target["boxes"].tolist() == box.tolist()
    skipped = sample(48, 32)  # annotated on the stored pixels: skipped and counted, with the reason
    assert isinstance(skipped, SkippedSample)
    assert skipped.reason == (
        "image is 32x48 (read upright, EXIF orientation applied; boxes must be for the displayed image) "
        "but its annotation says 48x32"
    )


def test_exif_orientation_segmentation_image_and_mask_agree(tmp_path: Path) -> None:
    voc = tmp_path / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / sub).mkdir(parents=True)
    exif_rotated_jpeg(voc / "JPEGImages" / "a.jpg")
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("a\n")
    Image.fromarray(np.ones((48, 32), np.uint8)).save(voc / "SegmentationClass" / "a.png")  # drawn as displayed
    sample = VOCSegmentation(voc, "val", num_classes=2)[0]
    assert sample["image"].shape == (3, 48, 32) and sample["mask"].shape == (48, 32)
    Image.fromarray(np.ones((32, 48), np.uint8)).save(voc / "SegmentationClass" / "a.png")  # drawn on stored pixels
    with pytest.raises(BadMaskError, match=r"a\.png: mask is 32x48 \(HxW\) but its image is 48x32 \(images are read"):
        VOCSegmentation(voc, "val", num_classes=2)[0]
