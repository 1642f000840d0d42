"""Segmentation data: PASCAL VOC layout, COCO instance masks, joint image/mask transforms.

* :class:`VOCSegmentation`: ``VOCdevkit/VOC20xx/{JPEGImages,SegmentationClass,
  ImageSets/Segmentation/<split>.txt}``; masks are palette (or grayscale) PNGs of class indices,
  255 = void/ignore.
* :class:`COCOSegmentation`: a COCO instances JSON + image folder; the instance masks
  (polygons or RLE, decoded by pycocotools) are painted into one semantic mask, largest
  objects first so small ones stay visible; crowd regions become 255 (ignored).
* :func:`train_transforms`: torchvision ``transforms.v2`` on ``tv_tensors.Image`` +
  ``tv_tensors.Mask`` together (random scale, crop padded with 255 in the mask, flip).
* :class:`SegmentationDataModule`: the ``LightningDataModule`` of ``python -m tasks.segment``; it
  generates the synthetic shapes data when asked (``synthetic:``) and it is missing.

Samples are dicts ``{"image": uint8 (3, H, W), "mask": int64 (H, W), "id": str, "path": str}``.
A missing or corrupt image is skipped with one counted warning per batch; a mask that does not
fit its image or holds labels outside ``[0, num_classes)`` (other than 255) raises an error
naming the file, since training on it would be silently wrong.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from tasks.data.coco import load_coco_json, read_coco_categories
from tasks.data.masks import IGNORE_INDEX, BadMaskError, check_mask, read_mask
from tasks.data.sbd import sbd_layout_split
from tasks.data.shapes import CLASSES as SHAPES_CLASSES
from tasks.data.shapes import ShapesConfig, ensure_shapes
from tasks.data.voc import VOC_SEGMENTATION_CLASSES, read_image_set
from tasks.deprecation import old_names, renamed
from tasks.images import BadImageError, ImageListDataset, SkippedSample, drop_skipped, read_image
from tasks.module import TaskDataModule
from tasks.options import check_probability, check_range, check_size, require_exists, require_file, require_folder

__all__ = [
    "IGNORE_INDEX",
    "BadMaskError",
    "COCOSegmentation",
    "SegmentationDataModule",
    "VOCSegmentation",
    "check_mask",
    "collate_eval",
    "collate_train",
    "read_mask",
    "segmentation_images",
    "train_transforms",
]

# ``VOC_CLASSES`` here was the 21 segmentation labels, under the name of the 20 object classes of
# tasks.data.voc: it is tasks.data.voc.VOC_SEGMENTATION_CLASSES now (the old name warns once).
__getattr__ = old_names(
    __name__,
    {
        "SegmentationData": lambda: SegmentationDataModule,
        "VOC_CLASSES": lambda: VOC_SEGMENTATION_CLASSES,
        "ImageList": lambda: segmentation_images,
    },
    new_names={"VOC_CLASSES": "tasks.data.voc.VOC_SEGMENTATION_CLASSES"},
)


def _load(
    image_path: Path, sample_id: str, mask_fn: Callable[[tuple[int, int]], torch.Tensor] | None
) -> dict | SkippedSample:
    try:
        image = read_image(image_path)
    except BadImageError as e:
        return SkippedSample(str(image_path), e.reason)
    out: dict[str, Any] = {"image": tv_tensors.Image(image), "id": sample_id, "path": str(image_path)}
    if mask_fn is not None:
        out["mask"] = tv_tensors.Mask(mask_fn((image.shape[-2], image.shape[-1])))
    return out


class _SegmentationDataset(Dataset):
    num_classes: int
    transforms: Callable[[dict], dict] | None

    def _finish(self, sample: dict | SkippedSample) -> dict | SkippedSample:
        if isinstance(sample, SkippedSample) or self.transforms is None:
            return sample
        return self.transforms(sample)


class VOCSegmentation(_SegmentationDataset):
    """PASCAL VOC segmentation layout.

    Args:
        root: the ``VOC20xx`` folder (holding ``JPEGImages``), or a folder holding
            ``VOCdevkit/<year>``.
        split: name of a list in ``ImageSets/Segmentation`` (``train``, ``val``, ``trainval``).
        num_classes: classes including background (21 for VOC).
        year: ``VOC2007`` or ``VOC2012`` when ``root`` holds ``VOCdevkit``.
        transforms: joint transform of the sample dict (see :func:`train_transforms`).
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        num_classes: int = len(VOC_SEGMENTATION_CLASSES),
        year: str = "VOC2012",
        transforms: Callable[[dict], dict] | None = None,
    ) -> None:
        root = Path(root)
        self.root = root if (root / "JPEGImages").is_dir() else root / "VOCdevkit" / year
        list_file = self.root / "ImageSets" / "Segmentation" / f"{split}.txt"
        if not list_file.is_file():
            raise FileNotFoundError(f"{list_file}: VOC split list not found (is {root} a VOC folder?)")
        self.ids = read_image_set(list_file)  # an empty list or an id listed twice: an error naming the lines
        self.num_classes = num_classes
        self.transforms = transforms

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict | SkippedSample:
        sid = self.ids[i]
        mask_path = self.root / "SegmentationClass" / f"{sid}.png"
        sample = _load(
            self.root / "JPEGImages" / f"{sid}.jpg", sid, lambda size: read_mask(mask_path, self.num_classes, size)
        )
        return self._finish(sample)


class COCOSegmentation(_SegmentationDataset):
    """COCO instance annotations turned into semantic masks with pycocotools.

    Args:
        ann_file: COCO instances JSON.
        image_dir: folder of the images (``file_name`` is relative to it).
        classes: class names, ``classes[0]`` being background; category ``name`` -> index.
            Categories not listed are painted as background.
        transforms: joint transform of the sample dict.
    """

    def __init__(
        self,
        ann_file: str | Path,
        image_dir: str | Path,
        classes: Sequence[str],
        transforms: Callable[[dict], dict] | None = None,
    ) -> None:
        from pycocotools.coco import COCO

        self.ann_file = Path(ann_file)
        data = load_coco_json(self.ann_file)  # checked: duplicate ids, missing file_name... refused by name
        self.coco = COCO()
        self.coco.dataset = data
        _quiet(self.coco.createIndex)
        self.image_dir = Path(image_dir)
        self.ids = sorted(self.coco.getImgIds())
        if not self.ids:
            raise ValueError(f"{self.ann_file}: no images in the annotation file")
        index = {name: k for k, name in enumerate(classes)}
        self.cat_to_label = {c["id"]: index.get(c["name"], 0) for c in self.coco.loadCats(self.coco.getCatIds())}
        self.num_classes = len(classes)
        self.transforms = transforms

    def __len__(self) -> int:
        return len(self.ids)

    def semantic_mask(self, image_id: int, size: tuple[int, int]) -> torch.Tensor:
        """``(H, W)`` int64: instances painted largest first; crowd regions = 255."""
        info = self.coco.imgs[image_id]
        if (info["height"], info["width"]) != tuple(size):
            raise BadMaskError(
                f"{self.ann_file}: image {info['file_name']} is {size[0]}x{size[1]} but the annotation says "
                f"{info['height']}x{info['width']}"
            )
        mask = np.zeros(size, np.uint8)
        anns = self.coco.loadAnns(self.coco.getAnnIds(imgIds=image_id, iscrowd=None))
        for ann in sorted(anns, key=lambda a: -float(a.get("area", 0))):
            try:
                m = self.coco.annToMask(ann).astype(bool)
            except Exception as e:  # pycocotools raises KeyError, TypeError... and bare Exception on bad polygons
                raise BadMaskError(
                    f"{self.ann_file}: annotation {ann['id']!r} of image {image_id!r} ({info['file_name']}) has an "
                    f"unreadable 'segmentation' (polygons [[x, y, ...]] or RLE {{'counts', 'size'}}): {e!r}"
                ) from e
            mask[m] = IGNORE_INDEX if ann.get("iscrowd", 0) else self.cat_to_label.get(ann["category_id"], 0)
        return torch.from_numpy(mask.astype(np.int64))

    def __getitem__(self, i: int) -> dict | SkippedSample:
        image_id = self.ids[i]
        info = self.coco.imgs[image_id]
        sample = _load(
            self.image_dir / info["file_name"], str(image_id), lambda size: self.semantic_mask(image_id, size)
        )
        return self._finish(sample)


def segmentation_images(source: str | Path) -> ImageListDataset:
    """Images without masks, for ``predict`` (:class:`tasks.images.ImageListDataset`): ``id``, which
    names the outputs, is the distinct output stem (the file stem, or ``sub__stem`` where files in
    different folders share one)."""
    return ImageListDataset(source, ids="names")


def _quiet(fn: Callable[[], Any]) -> Any:
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress on stdout
        return fn()


# ---------------------------------------------------------------------------- transforms
def train_transforms(
    crop_size: int | None,
    scale_size: int | None = None,
    scale_range: tuple[float, float] = (0.5, 2.0),
    hflip: float = 0.5,
) -> v2.Compose:
    """Random scale (``v2.ScaleJitter``: fit in ``scale_size`` times a factor in ``scale_range``),
    random ``crop_size`` crop (padded with 0 in the image and 255 = ignore in the mask) and
    horizontal flip, applied jointly to ``tv_tensors.Image`` and ``tv_tensors.Mask`` (masks
    are resized with nearest neighbour). ``hflip``: flip probability (``True``/``False``, the
    old type, mean 0.5/0). ``crop_size=None``: whole images, neither scaled nor cropped (the
    FCN recipe's online training at batch 1)."""
    steps: list[Any] = []
    if crop_size is not None:
        size = scale_size or crop_size
        steps += [
            v2.ScaleJitter((size, size), scale_range=tuple(scale_range)),
            v2.RandomCrop(crop_size, pad_if_needed=True, fill={tv_tensors.Image: 0, tv_tensors.Mask: IGNORE_INDEX}),
        ]
    hflip = _flip_probability(hflip)
    if hflip > 0:
        steps.append(v2.RandomHorizontalFlip(hflip))
    return v2.Compose(steps or [v2.Identity()])


def _flip_probability(hflip: float | bool) -> float:
    return (0.5 if hflip else 0.0) if isinstance(hflip, bool) else float(hflip)


def collate_train(samples: list[Any]) -> dict[str, Any]:
    """Same-size crops -> ``{"image": uint8 (N, 3, h, w), "mask": int64 (N, h, w), "id": [...]}``."""
    kept, skipped = drop_skipped(samples)  # counted and reported once per epoch by the task
    return {
        "image": torch.stack([s["image"].as_subclass(torch.Tensor) for s in kept])
        if kept
        else torch.empty(0, 3, 1, 1, dtype=torch.uint8),
        "mask": torch.stack([s["mask"].as_subclass(torch.Tensor).long() for s in kept])
        if kept
        else torch.empty(0, 1, 1, dtype=torch.long),
        "id": [s["id"] for s in kept],
        "skipped": [(s.path, s.reason) for s in skipped],
    }


def collate_eval(samples: list[Any]) -> dict[str, Any]:
    """Images of any size -> lists (evaluation runs image by image at full resolution).

    ``mask`` is there when the samples have masks, and (empty) when every sample of the batch
    was unreadable, so an evaluation step never finds it missing.
    """
    kept, skipped = drop_skipped(samples)  # counted and reported once per epoch by the task
    out: dict[str, Any] = {
        "image": [s["image"].as_subclass(torch.Tensor) for s in kept],
        "id": [s["id"] for s in kept],
        "path": [s["path"] for s in kept],
        "skipped": [(s.path, s.reason) for s in skipped],
    }
    if not kept or "mask" in kept[0]:
        out["mask"] = [s["mask"].as_subclass(torch.Tensor).long() for s in kept]
    return out


# ---------------------------------------------------------------------------- data module
class SegmentationDataModule(TaskDataModule):
    """Semantic-segmentation data for ``python -m tasks.segment``.

    Args:
        root: dataset folder.
        layout: ``voc`` (``VOCdevkit/<voc_year>`` or a ``VOC20xx`` folder), ``coco``, or ``sbd``
            (``root`` holds ``benchmark_RELEASE/dataset`` and ``VOCdevkit/<voc_year>``: a split is
            an SBD list name, read from SBD's ``.mat`` labels, or the path of an id list read from
            VOC, e.g. ``configs/segment/lists/seg11valid.txt``; :func:`tasks.data.sbd.sbd_layout_split`).
        classes: class names with ``background`` first. Default: VOC's 21 for ``voc``, the
            shapes classes when ``synthetic`` is set, the categories of the training JSON for ``coco``.
        train_split, val_split, test_split: split names (VOC list names; COCO ``{split}`` in
            ``coco_ann_file`` / ``coco_image_dir``). ``test_split`` defaults to ``val_split``.
        predict_images: images for ``predict``: a folder, a text file of paths or one image
            (:func:`tasks.images.list_images`; default: ``val_split``).
        voc_year: ``VOC2007`` / ``VOC2012``.
        coco_ann_file, coco_image_dir: paths under ``root`` with ``{split}`` filled in.
        synthetic: generate the synthetic shapes dataset in ``root`` with these settings when it
            is missing (the demo's embedded data; :mod:`tasks.data.shapes`).
        crop_size, scale_size, scale_range: training augmentation (:func:`train_transforms`);
            ``crop_size: null`` trains on whole images (needs ``batch_size: 1``).
        hflip: horizontal flip probability in training (``true``/``false``, the old type, read as 0.5/0).
        batch_size, eval_batch_size, num_workers: loaders (evaluation runs image by image
            inside a batch, at each image's own size).
        shapes: old name of ``synthetic`` (accepted, warned once).
    """

    collate_fns: ClassVar[Mapping[str, Any]] = {
        "train": collate_train, "val": collate_eval, "test": collate_eval, "predict": collate_eval
    }  # fmt: skip

    def __init__(
        self,
        root: str = "data/shapes",
        layout: Literal["voc", "coco", "sbd"] = "voc",
        classes: list[str] | None = None,
        train_split: str = "train",
        val_split: str = "val",
        test_split: str | None = None,
        predict_images: str | None = None,
        voc_year: str = "VOC2007",
        coco_ann_file: str = "annotations/instances_{split}.json",
        coco_image_dir: str = "images/{split}",
        synthetic: ShapesConfig | None = None,
        crop_size: int | None = 320,
        scale_size: int | None = None,
        scale_range: tuple[float, float] = (0.5, 2.0),
        hflip: float | bool = 0.5,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 2,
        shapes: ShapesConfig | None = None,
    ) -> None:
        super().__init__(batch_size=batch_size, eval_batch_size=eval_batch_size, num_workers=num_workers)
        self.root = Path(root)
        self.layout = layout
        self.train_split, self.val_split = train_split, val_split
        self.test_split = test_split or val_split
        self.predict_images = predict_images
        self.voc_year = voc_year
        self.coco_ann_file, self.coco_image_dir = coco_ann_file, coco_image_dir
        self.synthetic = renamed("data", "shapes", "synthetic", shapes, synthetic, None)
        check_size("data.crop_size", crop_size, optional=True)
        check_size("data.scale_size", scale_size, optional=True)
        check_range("data.scale_range", scale_range, positive=True)
        self.crop_size, self.scale_size, self.scale_range = crop_size, scale_size, scale_range
        self.hflip = check_probability("data.hflip", _flip_probability(hflip))
        #: who says what the mask values mean, for messages (checked against a model's: tasks.classes)
        self.class_source = "data.classes"
        self.classes = list(classes) if classes else self._default_classes()
        if len(self.classes) < 2:
            raise ValueError(f"classes needs background and at least one class, got {self.classes}")
        if crop_size is None and batch_size != 1:
            raise ValueError(f"data.crop_size null (whole images) needs data.batch_size 1, got {batch_size}")

    def _default_classes(self) -> list[str]:
        if self.synthetic is not None:
            self.class_source = "the shapes dataset's classes (data.synthetic)"
            return ["background", *SHAPES_CLASSES]
        if self.layout in ("voc", "sbd"):
            self.class_source = "VOC's 21 classes (data.classes unset)"
            return list(VOC_SEGMENTATION_CLASSES)
        ann = self.root / self.coco_ann_file.format(split=self.train_split)
        if not ann.is_file():
            raise FileNotFoundError(f"{ann}: needed to read the class names; set data.classes or create the data first")
        self.class_source = f"background + the categories of {ann}"
        return ["background", *(c["name"] for c in read_coco_categories(ann))]

    @property
    def num_classes(self) -> int:
        """Classes including background (linked to ``model.num_classes``)."""
        return len(self.classes)

    @property
    def class_names(self) -> list[str]:
        return list(self.classes)

    @property
    def shapes(self) -> ShapesConfig | None:
        """The old name of :attr:`synthetic`."""
        return self.synthetic

    def prepare_data(self) -> None:
        if self.synthetic is not None:
            ensure_shapes(self.root, self.synthetic)

    def dataset(self, split: str, transforms: Callable[[dict], dict] | None = None) -> Dataset:
        """The ``split`` of the configured layout."""
        require_folder("data.root", self.root)
        if self.layout == "voc":
            return VOCSegmentation(self.root, split, self.num_classes, self.voc_year, transforms)
        if self.layout == "sbd":
            return sbd_layout_split(self.root, split, self.num_classes, self.voc_year, transforms)
        return COCOSegmentation(
            require_file("data.coco_ann_file", self.root / self.coco_ann_file.format(split=split)),
            require_folder("data.coco_image_dir", self.root / self.coco_image_dir.format(split=split)),
            self.classes,
            transforms,
        )

    def build_dataset(self, name: str) -> Dataset:
        """``train`` (augmented)/``val``/``test``: their splits; ``predict``: ``predict_images``, else ``val_split``."""
        if name == "train":
            tf = train_transforms(self.crop_size, self.scale_size, self.scale_range, self.hflip)
            return self.dataset(self.train_split, tf)
        if name == "predict" and self.predict_images:
            require_exists("data.predict_images", self.predict_images, "folder, image list or image")
            return segmentation_images(self.predict_images)
        if name == "predict":
            return self.dataset(self.val_split)
        return self.dataset(self.test_split if name == "test" else self.val_split)
