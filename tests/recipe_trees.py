"""Tiny data trees in the real layouts the recipes of ``configs/`` read (for ``tests/test_recipes.py``).

Each builder writes a few small images (``size`` pixels, random noise with one coloured box)
and the annotation files of one dataset's own layout, the file and folder names of the real
release, under ``root`` (the recipe's ``data.root``):

* :func:`make_voc_tree`: ``VOCdevkit/VOC2007`` + ``VOC2012`` (JPEGImages, Annotations XML,
  ImageSets/Main and ImageSets/Segmentation lists, SegmentationClass palette PNGs);
* :func:`make_sbd_tree`: SBD's ``benchmark_RELEASE/dataset/{img, cls/*.mat, train.txt, val.txt}``
  (``GTcls`` MATLAB structs written with scipy) next to a VOC2012 tree holding the first ids
  of ``seg11valid``;
* :func:`make_coco_tree`: ``annotations/instances_<split>.json`` + ``<split>/*.jpg`` (COCO 2017);
* :func:`make_market_tree`: Market-1501's ``bounding_box_train``, ``query``, ``bounding_box_test``
  with its file names (``0002_c1s1_000451_03.jpg``; ``-1`` junk and ``0000`` distractors in the gallery);
* :func:`make_imagefolder_tree`: ``<split>/<class>/<n>.<ext>`` (ImageNet / torchvision ImageFolder);
* :func:`make_cityscapes_tree`: ``leftImg8bit`` + ``gtFine`` (``_gtFine_labelIds.png``) by city;
* :func:`make_ade20k_tree`: ``ADEChallengeData2016/{images,annotations}/{training,validation}``.

Builders return what a test may need (ids, class names).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from tasks.data.voc import VOC_CLASSES

__all__ = [
    "SEG11VALID",
    "make_ade20k_tree",
    "make_cityscapes_tree",
    "make_coco_tree",
    "make_imagefolder_tree",
    "make_market_tree",
    "make_sbd_tree",
    "make_voc_tree",
]

REPO = Path(__file__).resolve().parents[1]
#: The shipped seg11valid list (the FCN recipe's evaluation ids).
SEG11VALID = REPO / "configs" / "segment" / "lists" / "seg11valid.txt"


def _image(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Noise with one flat-coloured box; returns the pixels and the box ``(x0, y0, x1, y1)``, exclusive."""
    arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    x0, y0 = int(rng.integers(0, w // 3)), int(rng.integers(0, h // 3))
    x1, y1 = int(rng.integers(w // 2, w)), int(rng.integers(h // 2, h))
    arr[y0:y1, x0:x1] = rng.integers(0, 256, 3, dtype=np.uint8)
    return arr, (x0, y0, x1, y1)


def _palette() -> list[int]:
    from tasks.data.voc import voc_palette

    return voc_palette()


def _write_voc_year(
    year_dir: Path, ids: Sequence[str], sets: dict[str, Sequence[str]], size: tuple[int, int], seed: int
) -> None:
    rng = np.random.default_rng(seed)
    for sub in ("JPEGImages", "Annotations", "SegmentationClass", "ImageSets/Main", "ImageSets/Segmentation"):
        (year_dir / sub).mkdir(parents=True, exist_ok=True)
    h, w = size
    for k, sid in enumerate(ids):
        arr, (x0, y0, x1, y1) = _image(rng, h, w)
        Image.fromarray(arr).save(year_dir / "JPEGImages" / f"{sid}.jpg", quality=90)
        label = 1 + k % len(VOC_CLASSES)
        name = VOC_CLASSES[label - 1]
        # VOC boxes are 1-based inclusive pixels
        (year_dir / "Annotations" / f"{sid}.xml").write_text(
            f"<annotation><folder>{year_dir.name}</folder><filename>{sid}.jpg</filename>"
            f"<size><width>{w}</width><height>{h}</height><depth>3</depth></size><segmented>1</segmented>"
            f"<object><name>{name}</name><pose>Unspecified</pose><truncated>0</truncated>"
            f"<difficult>{k % 3 == 2:d}</difficult><bndbox><xmin>{x0 + 1}</xmin><ymin>{y0 + 1}</ymin>"
            f"<xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object></annotation>"
        )
        mask = np.zeros((h, w), np.uint8)
        mask[y0:y1, x0:x1] = label
        mask[y0, x0:x1] = 255  # VOC's void border
        png = Image.fromarray(mask, mode="P")
        png.putpalette(_palette())
        png.save(year_dir / "SegmentationClass" / f"{sid}.png")
    for name, members in sets.items():
        (year_dir / "ImageSets" / "Main" / f"{name}.txt").write_text("".join(f"{i}\n" for i in members))
        (year_dir / "ImageSets" / "Segmentation" / f"{name}.txt").write_text("".join(f"{i}\n" for i in members))


def make_voc_tree(
    root: str | Path, size: tuple[int, int] = (64, 80), per_split: int = 2, seed: int = 0
) -> dict[str, list[str]]:
    """``root/VOCdevkit/VOC2007`` (ids ``000005``...: ``trainval``, ``test``, ``train``, ``val``)
    and ``root/VOCdevkit/VOC2012`` (ids ``2008_000008``...: ``trainval``, ``train``, ``val``).

    Returns the ids of each ``<year>/<set>``.
    """
    devkit = Path(root) / "VOCdevkit"
    n = per_split
    ids07 = [f"{5 + 2 * i:06d}" for i in range(3 * n)]
    sets07 = {"train": ids07[:n], "val": ids07[n : 2 * n], "trainval": ids07[: 2 * n], "test": ids07[2 * n :]}
    ids12 = [f"2008_{8 + 2 * i:06d}" for i in range(2 * n)]
    sets12 = {"train": ids12[:n], "val": ids12[n:], "trainval": ids12}
    _write_voc_year(devkit / "VOC2007", ids07, sets07, size, seed)
    _write_voc_year(devkit / "VOC2012", ids12, sets12, size, seed + 1)
    return {
        **{f"VOC2007/{k}": list(v) for k, v in sets07.items()},
        **{f"VOC2012/{k}": list(v) for k, v in sets12.items()},
    }


def make_sbd_tree(
    root: str | Path, size: tuple[int, int] = (64, 80), num_train: int = 2, num_valid: int = 2, seed: int = 0
) -> dict[str, list[str]]:
    """SBD's release under ``root/benchmark_RELEASE/dataset`` (``train.txt`` of ``num_train`` ids,
    ``val.txt``; ``img/<id>.jpg``; ``cls/<id>.mat`` holding the struct ``GTcls`` with
    ``Segmentation`` (uint8 class indices, no void), ``Boundaries`` and ``CategoriesPresent``, as
    the Berkeley files) and ``root/VOCdevkit/VOC2012`` holding the first ``num_valid`` ids of
    the shipped ``seg11valid.txt``.
    """
    import scipy.io
    import scipy.sparse

    root = Path(root)
    rng = np.random.default_rng(seed)
    ds = root / "benchmark_RELEASE" / "dataset"
    for sub in ("img", "cls", "inst"):
        (ds / sub).mkdir(parents=True, exist_ok=True)
    h, w = size
    train = [f"2008_{1000 + 2 * i:06d}" for i in range(num_train)]
    val = [f"2008_{2000 + 2 * i:06d}" for i in range(1)]
    for k, sid in enumerate(train + val):
        arr, (x0, y0, x1, y1) = _image(rng, h, w)
        Image.fromarray(arr).save(ds / "img" / f"{sid}.jpg", quality=90)
        seg = np.zeros((h, w), np.uint8)
        label = 1 + (3 * k) % 20
        seg[y0:y1, x0:x1] = label
        boundaries = np.empty((20, 1), dtype=object)  # a cell of one sparse logical map per class
        for c in range(20):
            boundaries[c, 0] = scipy.sparse.csc_matrix((h, w), dtype=bool)
        gt = {
            "Segmentation": seg,
            "Boundaries": boundaries,
            "CategoriesPresent": np.array([[label]], dtype=np.uint8),
        }
        scipy.io.savemat(ds / "cls" / f"{sid}.mat", {"GTcls": gt}, do_compression=True)
    (ds / "train.txt").write_text("".join(f"{i}\n" for i in train))
    (ds / "val.txt").write_text("".join(f"{i}\n" for i in val))
    valid = SEG11VALID.read_text().split()[:num_valid]
    _write_voc_year(root / "VOCdevkit" / "VOC2012", valid, {"seg11valid_head": valid}, size, seed + 1)
    return {"train": train, "val": val, "seg11valid": valid}


def make_coco_tree(
    root: str | Path,
    splits: Sequence[str] = ("train2017", "val2017"),
    size: tuple[int, int] = (64, 80),
    per_split: int = 2,
    seed: int = 0,
) -> list[str]:
    """COCO 2017 layout: ``root/annotations/instances_<split>.json`` and ``root/<split>/<id:012d>.jpg``.

    Categories keep COCO's id holes (1 person, 3 car, 18 dog); one box per image, plus a crowd
    region on the first. Returns the category names in id order.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    cats = [{"id": 1, "name": "person", "supercategory": "person"},
            {"id": 3, "name": "car", "supercategory": "vehicle"},
            {"id": 18, "name": "dog", "supercategory": "animal"}]  # fmt: skip
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    h, w = size
    image_id, ann_id = 1, 1
    for split in splits:
        (root / split).mkdir(parents=True, exist_ok=True)
        images, anns = [], []
        for k in range(per_split):
            arr, (x0, y0, x1, y1) = _image(rng, h, w)
            name = f"{image_id:012d}.jpg"
            Image.fromarray(arr).save(root / split / name, quality=90)
            images.append({"id": image_id, "file_name": name, "height": h, "width": w})
            bw, bh = x1 - x0, y1 - y0
            poly = [x0, y0, x1, y0, x1, y1, x0, y1]
            anns.append({"id": ann_id, "image_id": image_id, "category_id": cats[k % 3]["id"], "iscrowd": 0,
                         "bbox": [x0, y0, bw, bh], "area": float(bw * bh), "segmentation": [poly]})  # fmt: skip
            ann_id += 1
            if k == 0:
                anns.append({"id": ann_id, "image_id": image_id, "category_id": 1, "iscrowd": 1,
                             "bbox": [0, 0, 8, 8], "area": 64.0,
                             "segmentation": {"counts": [0, 64, h * w - 64], "size": [h, w]}})  # fmt: skip
                ann_id += 1
            image_id += 1
        data = {"info": {"description": "tiny"}, "licenses": [], "images": images, "annotations": anns,
                "categories": cats}  # fmt: skip
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
    return [c["name"] for c in cats]


def make_market_tree(
    root: str | Path, num_train_ids: int = 3, num_test_ids: int = 2, per_id: int = 2, size: tuple[int, int] = (64, 32)
) -> None:
    """Market-1501-v15.09.15's folders and names: ``<pid:04d>_c<cam>s<seq>_<frame:06d>_<box:02d>.jpg``.

    Train ids ``0002``..; test ids follow them, each in ``query`` (camera 1) and
    ``bounding_box_test`` (cameras 2..); the gallery also holds a ``-1`` junk image and a ``0000`` distractor.
    """
    root = Path(root)
    rng = np.random.default_rng(0)
    h, w = size

    def save(folder: str, pid: int, cam: int, frame: int) -> None:
        (root / folder).mkdir(parents=True, exist_ok=True)
        arr, _ = _image(rng, h, w)
        tag = "-1" if pid < 0 else f"{pid:04d}"
        Image.fromarray(arr).save(root / folder / f"{tag}_c{cam}s1_{frame:06d}_01.jpg", quality=90)

    pid = 2
    for _ in range(num_train_ids):
        for j in range(per_id):
            save("bounding_box_train", pid, 1 + j % 6, 100 + j)
        pid += 2
    for _ in range(num_test_ids):
        save("query", pid, 1, 200)
        for j in range(per_id):
            save("bounding_box_test", pid, 2 + j % 5, 300 + j)
        pid += 2
    save("bounding_box_test", -1, 3, 400)
    save("bounding_box_test", 0, 4, 401)


def make_imagefolder_tree(
    root: str | Path,
    splits: Sequence[str] = ("train", "val"),
    classes: Sequence[str] = ("n01440764", "n01443537"),
    per_class: int = 2,
    size: tuple[int, int] = (64, 64),
    ext: str = "JPEG",
) -> list[str]:
    """``root/<split>/<class>/<class>_<n>.<ext>`` (ImageNet's train layout, torchvision's
    ``ImageFolder``); returns the classes."""
    root = Path(root)
    rng = np.random.default_rng(0)
    h, w = size
    for split in splits:
        for c in classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for n in range(per_class):
                arr, _ = _image(rng, h, w)
                Image.fromarray(arr).save(root / split / c / f"{c}_{n}.{ext}", format="JPEG", quality=90)
    return list(classes)


def make_cityscapes_tree(
    root: str | Path, splits: Sequence[str] = ("train", "val"), size: tuple[int, int] = (64, 128), seed: int = 0
) -> None:
    """Cityscapes' release: ``leftImg8bit/<split>/<city>/<city>_000000_<frame>_leftImg8bit.png`` and
    ``gtFine/<split>/<city>/..._gtFine_labelIds.png`` (label ids: 7 road below, 23 sky above, a 26
    car box, a 0 unlabeled border) plus the ``_gtFine_color.png`` the release also holds."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    h, w = size
    for split, city in zip(splits, ("aachen", "frankfurt")):
        for frame in (19, 20):
            stem = f"{city}/{city}_000000_{frame:06d}"
            arr, (x0, y0, x1, y1) = _image(rng, h, w)
            ids = np.full((h, w), 23, np.uint8)
            ids[h // 2 :] = 7
            ids[y0:y1, x0:x1] = 26
            ids[:, :2] = 0
            for folder, name, pixels in (("leftImg8bit", "leftImg8bit", arr), ("gtFine", "gtFine_labelIds", ids),
                                         ("gtFine", "gtFine_color", arr)):  # fmt: skip
                path = root / folder / split / f"{stem}_{name}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels).save(path)


def make_ade20k_tree(root: str | Path, size: tuple[int, int] = (64, 80), seed: int = 0) -> None:
    """``ADEChallengeData2016/{images,annotations}/{training,validation}/ADE_<split>_<n:08d>.{jpg,png}``
    (mask values 0 = other, 1 wall, 3 sky, 13 person)."""
    root = Path(root) / "ADEChallengeData2016"
    rng = np.random.default_rng(seed)
    h, w = size
    for split, tag in (("training", "train"), ("validation", "val")):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
        for n in (1, 2):
            arr, (x0, y0, x1, y1) = _image(rng, h, w)
            mask = np.full((h, w), 1, np.uint8)
            mask[: h // 3] = 3
            mask[y0:y1, x0:x1] = 13
            mask[-2:] = 0
            Image.fromarray(arr).save(root / "images" / split / f"ADE_{tag}_{n:08d}.jpg", quality=90)
            Image.fromarray(mask).save(root / "annotations" / split / f"ADE_{tag}_{n:08d}.png")
