"""Synthetic shapes: a small detection + segmentation dataset the project generates itself.

Each image has a smooth random background with noise and 1..``max_objects`` filled shapes
(circle, square, triangle), each a random colour and size, possibly rotated and partly occluded
by later shapes. Written in two real layouts so the same readers users run on real data are
exercised:

* COCO: ``images/<split>/<id>.jpg``, ``annotations/instances_<split>.json`` (boxes, areas and
  RLE instance masks of the *visible* pixels), plus ``masks/<split>/<id>.png`` semantic masks
  (palette PNG, 0 = background, 1..3 = classes);
* PASCAL VOC: ``VOCdevkit/VOC2007/{JPEGImages,Annotations,SegmentationClass,SegmentationObject,
  ImageSets/Main,ImageSets/Segmentation}`` with XML boxes (1-based, ``difficult`` set on tiny
  objects), palette PNGs with a 255 "void" band along object borders, as VOC draws them.

Generation is deterministic given the seed and atomic: the tree is built in a temporary folder
and renamed into place, so an interrupted run never leaves a half dataset behind.

``python -m tasks.data shapes --out data/shapes`` writes it; data modules call
:func:`ensure_shapes` so demo configs generate it when it is missing.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from xml.etree import ElementTree as ET

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

from ._build import building, ensure_dataset
from .voc import voc_palette  # re-exported: its old home

__all__ = ["CLASSES", "ShapesConfig", "ensure_shapes", "generate_shapes", "voc_palette"]

CLASSES: tuple[str, ...] = ("circle", "square", "triangle")
SPEC_FILE = "shapes.json"


@dataclass(frozen=True)
class ShapesConfig:
    """Parameters of a generated dataset (stored in ``shapes.json`` beside the data).

    Args:
        num_train: training images.
        num_val: validation images.
        min_image_size: smallest image side in pixels (sides are drawn uniformly).
        max_image_size: largest image side in pixels.
        max_objects: at most this many shapes per image (at least one).
        min_object_size: smallest shape extent in pixels.
        max_object_size: largest shape extent in pixels (capped by the image size).
        seed: random seed; the same config always gives the same files.
        layouts: which layouts to write, ``coco`` and/or ``voc``.
    """

    num_train: int = 300
    num_val: int = 60
    min_image_size: int = 112
    max_image_size: int = 160
    max_objects: int = 4
    min_object_size: int = 16
    max_object_size: int = 56
    seed: int = 0
    layouts: tuple[str, ...] = ("coco", "voc")


# A data module built in Python holds this dataclass in its hyper-parameters: allow it in
# torch.load(weights_only=True), which every checkpoint load of the tasks uses.
torch.serialization.add_safe_globals([ShapesConfig])


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    angle = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    t = (np.cos(angle) * xx / w + np.sin(angle) * yy / h + 1) / 2
    img = c0 * (1 - t[..., None]) + c1 * t[..., None]
    img += rng.normal(0, 12, (h, w, 3))
    return img


def _shape_polygon(cls: str, cx: float, cy: float, size: float, angle: float) -> list[tuple[float, float]]:
    if cls == "square":
        pts = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
        r = size / 2
    else:  # triangle
        pts = [(0, -1), (math.sqrt(3) / 2, 0.5), (-math.sqrt(3) / 2, 0.5)]
        r = size / 2
    ca, sa = math.cos(angle), math.sin(angle)
    return [(cx + r * (x * ca - y * sa), cy + r * (x * sa + y * ca)) for x, y in pts]


def _draw_instance(draw: ImageDraw.ImageDraw, cls: str, cx: float, cy: float, size: float, angle: float, fill) -> None:
    if cls == "circle":
        r = size / 2
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon(_shape_polygon(cls, cx, cy, size, angle), fill=fill)


def _make_image(rng: np.random.Generator, cfg: ShapesConfig) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """One image: RGB uint8 (H, W, 3), instance map (H, W) with 0 = background, class per instance."""
    h = int(rng.integers(cfg.min_image_size, cfg.max_image_size + 1))
    w = int(rng.integers(cfg.min_image_size, cfg.max_image_size + 1))
    rgb = Image.fromarray(np.clip(_background(rng, h, w), 0, 255).astype(np.uint8))
    inst = Image.new("L", (w, h), 0)
    draw_rgb, draw_inst = ImageDraw.Draw(rgb), ImageDraw.Draw(inst)
    n = int(rng.integers(1, cfg.max_objects + 1))
    classes: list[int] = []
    full_areas: list[int] = []
    for i in range(1, n + 1):
        cls = int(rng.integers(len(CLASSES)))
        size = float(rng.uniform(cfg.min_object_size, min(cfg.max_object_size, 0.6 * min(h, w))))
        cx = float(rng.uniform(size / 2, w - size / 2))
        cy = float(rng.uniform(size / 2, h - size / 2))
        angle = float(rng.uniform(0, 2 * math.pi))
        color = tuple(int(v) for v in rng.integers(0, 256, 3))
        _draw_instance(draw_rgb, CLASSES[cls], cx, cy, size, angle, color)
        solo = Image.new("L", (w, h), 0)
        _draw_instance(ImageDraw.Draw(solo), CLASSES[cls], cx, cy, size, angle, 1)
        full_areas.append(int(np.asarray(solo).sum()))
        _draw_instance(draw_inst, CLASSES[cls], cx, cy, size, angle, i)
        classes.append(cls + 1)
    rgb = rgb.filter(ImageFilter.GaussianBlur(0.6))
    arr = np.asarray(rgb).astype(np.float32) + rng.normal(0, 4, (h, w, 3))
    inst_arr = np.asarray(inst).copy()
    # Drop instances occluded to less than 35% of their area: no annotator would box them.
    for i, full in enumerate(full_areas, start=1):
        if (inst_arr == i).sum() < 0.35 * max(full, 1):
            inst_arr[inst_arr == i] = 0
            classes[i - 1] = 0
    return np.clip(arr, 0, 255).astype(np.uint8), inst_arr, classes


def _border_band(inst: np.ndarray, width: int = 1) -> np.ndarray:
    """Pixels within ``width`` of an instance boundary (VOC paints them 255 = void)."""
    band = np.zeros(inst.shape, bool)
    padded = np.pad(inst, width, mode="edge")
    h, w = inst.shape
    for dy in range(-width, width + 1):
        for dx in range(-width, width + 1):
            shifted = padded[width + dy : width + dy + h, width + dx : width + dx + w]
            band |= shifted != inst
    return band


def _voc_xml(file_id: str, w: int, h: int, objects: Sequence[tuple[str, list[int], int]]) -> bytes:
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = "VOC2007"
    ET.SubElement(root, "filename").text = f"{file_id}.jpg"
    size = ET.SubElement(root, "size")
    for tag, val in (("width", w), ("height", h), ("depth", 3)):
        ET.SubElement(size, tag).text = str(val)
    ET.SubElement(root, "segmented").text = "1"
    for name, (x0, y0, x1, y1), difficult in objects:
        obj = ET.SubElement(root, "object")
        ET.SubElement(obj, "name").text = name
        ET.SubElement(obj, "pose").text = "Unspecified"
        ET.SubElement(obj, "truncated").text = "0"
        ET.SubElement(obj, "difficult").text = str(difficult)
        bb = ET.SubElement(obj, "bndbox")
        # VOC boxes are 1-based inclusive pixel coordinates
        for tag, val in (("xmin", x0 + 1), ("ymin", y0 + 1), ("xmax", x1), ("ymax", y1)):
            ET.SubElement(bb, tag).text = str(val)
    return ET.tostring(root)


def _annotations(
    inst: np.ndarray, classes: list[int], image_id: int, ann_id: int
) -> tuple[np.ndarray, list[dict], list[tuple[str, list[int], int]]]:
    """``(semantic mask, COCO annotations with ids from ann_id, VOC objects)`` of one image's instance map."""
    from pycocotools import mask as mask_utils

    semantic = np.zeros(inst.shape, np.uint8)
    anns, voc_objects = [], []
    for i, cls in enumerate(classes, start=1):
        m = inst == i
        if cls == 0 or not m.any():
            continue
        semantic[m] = cls
        ys, xs = np.nonzero(m)
        x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
        rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
        rle["counts"] = rle["counts"].decode("ascii")
        bbox = [x0, y0, x1 - x0, y1 - y0]
        anns.append({"id": ann_id + len(anns), "image_id": image_id, "category_id": cls, "bbox": bbox,
                     "area": int(m.sum()), "segmentation": rle, "iscrowd": 0})  # fmt: skip
        voc_objects.append((CLASSES[cls - 1], [x0, y0, x1, y1], int(max(x1 - x0, y1 - y0) < 20)))
    return semantic, anns, voc_objects


def _palette_png(arr: np.ndarray, palette: list[int], path: Path) -> None:
    png = Image.fromarray(arr, mode="P")
    png.putpalette(palette)
    png.save(path)


def _write_voc_image(voc: Path, file_id: str, img: Image.Image, inst: np.ndarray, semantic: np.ndarray,
                     objects: list[tuple[str, list[int], int]], palette: list[int]) -> None:  # fmt: skip
    """The image, its XML and its class/object PNGs (instance borders 255 = void) in the VOC layout."""
    for sub in ("JPEGImages", "Annotations", "SegmentationClass", "SegmentationObject"):
        (voc / sub).mkdir(parents=True, exist_ok=True)
    img.save(voc / "JPEGImages" / f"{file_id}.jpg", quality=95)
    h, w = inst.shape
    (voc / "Annotations" / f"{file_id}.xml").write_bytes(_voc_xml(file_id, w, h, objects))
    band = _border_band(inst)
    for sub, arr in (("SegmentationClass", semantic), ("SegmentationObject", inst.astype(np.uint8))):
        out = arr.copy()
        out[band] = 255
        _palette_png(out, palette, voc / sub / f"{file_id}.png")


def _write_lists(tmp: Path, cfg: ShapesConfig, coco: dict[str, dict], voc_ids: dict[str, list[str]]) -> None:
    """The COCO annotation files and the VOC image sets, once every image is written."""
    if "coco" in cfg.layouts:
        (tmp / "annotations").mkdir(exist_ok=True)
        for split in coco:
            (tmp / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco[split]))
    if "voc" in cfg.layouts:
        for sets in ("Main", "Segmentation"):
            d = tmp / "VOCdevkit" / "VOC2007" / "ImageSets" / sets
            d.mkdir(parents=True, exist_ok=True)
            for split in voc_ids:
                (d / f"{split}.txt").write_text("".join(f"{i}\n" for i in voc_ids[split]))
            (d / "trainval.txt").write_text("".join(f"{i}\n" for s in voc_ids for i in voc_ids[s]))


def generate_shapes(root: str | Path, cfg: ShapesConfig = ShapesConfig(), *, progress: bool = True) -> Path:
    """Write the dataset described by ``cfg`` under ``root`` (replacing what is there)."""
    root = Path(root)
    rng = np.random.default_rng(cfg.seed)
    palette = voc_palette()
    categories = [{"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(CLASSES)]
    splits = {"train": cfg.num_train, "val": cfg.num_val}
    iterator = [(split, k) for split, n in splits.items() for k in range(n)]
    try:
        from tqdm import tqdm

        iterator = tqdm(iterator, desc=f"generating shapes in {root}", disable=not progress, leave=False)
    except ImportError:  # pragma: no cover
        pass
    coco: dict[str, dict] = {s: {"images": [], "annotations": [], "categories": categories} for s in splits}
    voc_ids: dict[str, list[str]] = {s: [] for s in splits}
    ann_id = 1
    with building(root) as tmp:
        for split, k in iterator:
            image_id = k + 1 + (0 if split == "train" else cfg.num_train)
            file_id = f"{image_id:06d}"
            rgb, inst, classes = _make_image(rng, cfg)
            h, w = inst.shape
            semantic, image_anns, voc_objects = _annotations(inst, classes, image_id, ann_id)
            ann_id += len(image_anns)
            img = Image.fromarray(rgb)
            if "coco" in cfg.layouts:
                (tmp / "images" / split).mkdir(parents=True, exist_ok=True)
                (tmp / "masks" / split).mkdir(parents=True, exist_ok=True)
                img.save(tmp / "images" / split / f"{file_id}.jpg", quality=95)
                _palette_png(semantic, palette, tmp / "masks" / split / f"{file_id}.png")
                coco[split]["images"].append({"id": image_id, "file_name": f"{file_id}.jpg", "width": w, "height": h})
                coco[split]["annotations"] += image_anns
            if "voc" in cfg.layouts:
                _write_voc_image(tmp / "VOCdevkit" / "VOC2007", file_id, img, inst, semantic, voc_objects, palette)
                voc_ids[split].append(file_id)
        _write_lists(tmp, cfg, coco, voc_ids)
        spec = asdict(cfg) | {"classes": list(CLASSES)}
        (tmp / SPEC_FILE).write_text(json.dumps(spec, indent=2))
    return root


def ensure_shapes(root: str | Path, cfg: ShapesConfig = ShapesConfig(), *, progress: bool = True) -> Path:
    """Generate the dataset unless ``root`` already holds one made with the same ``cfg``."""
    return ensure_dataset(root, cfg, SPEC_FILE, generate_shapes, progress=progress, option="data.synthetic")
