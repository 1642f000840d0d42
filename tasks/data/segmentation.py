"""Segmentation data: PASCAL VOC layout, COCO instance masks, joint image/mask transforms.

The other layouts of ``data.layout`` (``folders``, ``pairs``, ``cityscapes``, ``ade20k``) are read by
their own modules, set up by :mod:`tasks.data.seg_layouts`.

* :class:`VOCSegmentation`: ``VOCdevkit/VOC20xx/{JPEGImages,SegmentationClass,
  ImageSets/Segmentation/<split>.txt}``; masks are palette (or grayscale) PNGs of class indices,
  255 = void/ignore (``data.ignore_index``; raw values of another numbering: ``data.label_map``).
* :class:`COCOSegmentation`: a COCO instances JSON + image folder; the instance masks
  (polygons or RLE, decoded by pycocotools) are painted into one semantic mask, largest
  objects first so small ones stay visible; crowd regions become ``data.ignore_index`` (255).
* :func:`train_transforms`: torchvision ``transforms.v2`` on ``tv_tensors.Image`` +
  ``tv_tensors.Mask`` together (random scale, crop padded with ``data.ignore_index`` in the mask, flip).
* :class:`SegmentationDataModule`: the ``LightningDataModule`` of ``python -m tasks.segment``; it
  generates the synthetic shapes data when asked (``synthetic:``) and it is missing.

Samples are dicts ``{"image": uint8 (3, H, W), "mask": int64 (H, W), "id": str, "path": str}``.
A missing or corrupt image is skipped with one counted warning per batch; a mask that does not
fit its image or holds labels outside ``[0, num_classes)`` (other than the ignore value) raises an error
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

from tasks.data.class_weights import cached_median_frequency, describe_weights
from tasks.data.coco import load_coco_json, read_coco_categories
from tasks.data.folders import folders_split
from tasks.data.masks import IGNORE_INDEX, BadMaskError, MaskLabels, as_mask_labels, check_mask, read_mask
from tasks.data.pairs import pairs_split
from tasks.data.sbd import sbd_layout_split
from tasks.data.seg_layouts import FOLDER_LAYOUTS, PRESETS, Layout, check_layout_options, folder_layout, mask_labels
from tasks.data.seg_transforms import collate_eval, collate_train, flip_probability, train_transforms
from tasks.data.shapes import CLASSES as SHAPES_CLASSES
from tasks.data.shapes import ShapesConfig, ensure_shapes
from tasks.data.voc import VOC_SEGMENTATION_CLASSES, read_image_set
from tasks.deprecation import old_names, renamed
from tasks.distributed import is_global_zero
from tasks.images import BadImageError, ImageListDataset, SkippedSample, read_image
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

#: classes of VOC segmentation, background included (21)
VOC_NUM_CLASSES = len(VOC_SEGMENTATION_CLASSES)


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
        num_classes: classes including background (21 for VOC), or the
            :class:`~tasks.data.masks.MaskLabels` the masks are read with (ignore value, label map).
        year: ``VOC2007`` or ``VOC2012`` when ``root`` holds ``VOCdevkit``.
        transforms: joint transform of the sample dict (see :func:`train_transforms`).
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        num_classes: int | MaskLabels = VOC_NUM_CLASSES,
        year: str = "VOC2012",
        transforms: Callable[[dict], dict] | None = None,
    ) -> None:
        root = Path(root)
        self.root = root if (root / "JPEGImages").is_dir() else root / "VOCdevkit" / year
        list_file = self.root / "ImageSets" / "Segmentation" / f"{split}.txt"
        if not list_file.is_file():
            raise FileNotFoundError(f"{list_file}: VOC split list not found (is {root} a VOC folder?)")
        self.ids = read_image_set(list_file)  # an empty list or an id listed twice: an error naming the lines
        self.labels = as_mask_labels(num_classes)
        self.num_classes = self.labels.num_classes
        self.transforms = transforms

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict | SkippedSample:
        sid = self.ids[i]
        mask_path = self.root / "SegmentationClass" / f"{sid}.png"
        sample = _load(
            self.root / "JPEGImages" / f"{sid}.jpg", sid, lambda size: read_mask(mask_path, self.labels, size)
        )
        return self._finish(sample)

    def mask_files(self) -> list[Path]:
        """The mask files in sample order (class statistics: :mod:`tasks.data.class_weights`)."""
        return [self.root / "SegmentationClass" / f"{sid}.png" for sid in self.ids]

    def mask_at(self, i: int) -> torch.Tensor:
        """Sample ``i``'s mask ``(H, W)`` in training ids, its image not read."""
        return read_mask(self.mask_files()[i], self.labels)


class COCOSegmentation(_SegmentationDataset):
    """COCO instance annotations turned into semantic masks with pycocotools.

    Args:
        ann_file: COCO instances JSON.
        image_dir: folder of the images (``file_name`` is relative to it).
        classes: class names, ``classes[0]`` being background; category ``name`` -> index.
            Categories not listed are painted as background.
        transforms: joint transform of the sample dict.
        ignore_index: the value painted on crowd regions (``data.ignore_index``).
    """

    def __init__(
        self,
        ann_file: str | Path,
        image_dir: str | Path,
        classes: Sequence[str],
        transforms: Callable[[dict], dict] | None = None,
        ignore_index: int = IGNORE_INDEX,
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
        self.ignore_index = ignore_index

    def __len__(self) -> int:
        return len(self.ids)

    def semantic_mask(self, image_id: int, size: tuple[int, int]) -> torch.Tensor:
        """``(H, W)`` int64: instances painted largest first; crowd regions = ``ignore_index``."""
        info = self.coco.imgs[image_id]
        if (info["height"], info["width"]) != tuple(size):
            raise BadMaskError(
                f"{self.ann_file}: image {info['file_name']} is {size[0]}x{size[1]} but the annotation says "
                f"{info['height']}x{info['width']}"
            )
        mask = np.zeros(size, np.int64)
        anns = self.coco.loadAnns(self.coco.getAnnIds(imgIds=image_id, iscrowd=None))
        for ann in sorted(anns, key=lambda a: -float(a.get("area", 0))):
            try:
                m = self.coco.annToMask(ann).astype(bool)
            except Exception as e:  # pycocotools raises KeyError, TypeError... and bare Exception on bad polygons
                raise BadMaskError(
                    f"{self.ann_file}: annotation {ann['id']!r} of image {image_id!r} ({info['file_name']}) has an "
                    f"unreadable 'segmentation' (polygons [[x, y, ...]] or RLE {{'counts', 'size'}}): {e!r}"
                ) from e
            mask[m] = self.ignore_index if ann.get("iscrowd", 0) else self.cat_to_label.get(ann["category_id"], 0)
        return torch.from_numpy(mask)

    def mask_files(self) -> list[Path]:
        """The annotation file, once per sample (class statistics: :mod:`tasks.data.class_weights`)."""
        return [self.ann_file] * len(self.ids)

    def mask_at(self, i: int) -> torch.Tensor:
        """Sample ``i``'s semantic mask at the size its annotation gives, its image not read."""
        info = self.coco.imgs[self.ids[i]]
        return self.semantic_mask(self.ids[i], (info["height"], info["width"]))

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


# ---------------------------------------------------------------------------- data module
class SegmentationDataModule(TaskDataModule):
    """Semantic-segmentation data for ``python -m tasks.segment``.

    Args:
        root: dataset folder.
        layout: ``voc`` (``VOCdevkit/<voc_year>`` or a ``VOC20xx`` folder), ``coco``, ``sbd``
            (``root`` holds ``benchmark_RELEASE/dataset`` and ``VOCdevkit/<voc_year>``: a split is
            an SBD list name, read from SBD's ``.mat`` labels, or the path of an id list read from
            VOC, e.g. ``configs/segment/lists/seg11valid.txt``; :func:`tasks.data.sbd.sbd_layout_split`),
            ``folders`` (an image and a mask folder per split, :mod:`tasks.data.folders`), ``pairs``
            (a list of ``image mask`` lines per split, :mod:`tasks.data.pairs`), ``cityscapes`` or
            ``ade20k`` (presets of ``folders``: :mod:`tasks.data.cityscapes`, :mod:`tasks.data.ade20k`).
        classes: class names in mask-value (training id) order, ``background`` first where there is
            one. Default: VOC's 21 for ``voc``/``sbd``, the shapes classes when ``synthetic`` is set,
            the categories of the training JSON for ``coco``, the release's for ``cityscapes`` (19)
            and ``ade20k`` (150); ``folders`` and ``pairs`` need them.
        train_split, val_split, test_split: split names (VOC list names; COCO ``{split}`` in
            ``coco_ann_file`` / ``coco_image_dir``). ``test_split`` defaults to ``val_split``.
        predict_images: images for ``predict``: a folder, a text file of paths or one image
            (:func:`tasks.images.list_images`; default: ``val_split``).
        voc_year: ``VOC2007`` / ``VOC2012``.
        coco_ann_file, coco_image_dir: paths under ``root`` with ``{split}`` filled in.
        image_dir, mask_dir, image_suffix, mask_suffix: ``folders`` (default ``images/{split}``,
            ``masks/{split}``, ``.jpg``, ``.png``) and its presets (their release's tree by default).
        pairs_file: ``pairs``: the list of a split, ``{split}`` filled in, under ``root`` when
            relative (default ``{split}.txt``).
        pairs_base: ``pairs``: relative paths of a list are below ``root`` or the list's folder (``list``).
        path_prefix: ``pairs``: ``{"/old/prefix": "new/prefix"}`` re-roots absolute paths of another machine.
        ignore_index: the mask value of pixels neither trained on nor counted (linked to
            ``model.ignore_index``); outside ``0..num_classes-1``.
        label_map: raw mask value -> training id (a class index or ``ignore_index``), applied when a
            mask is read (``cityscapes``, ``ade20k``: their release's map unless given).
        unlisted: a raw value missing from the label map: ``error`` or ``ignore``.
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
        layout: Layout = "voc",
        classes: list[str] | None = None,
        train_split: str = "train",
        val_split: str = "val",
        test_split: str | None = None,
        predict_images: str | None = None,
        voc_year: str = "VOC2007",
        coco_ann_file: str = "annotations/instances_{split}.json",
        coco_image_dir: str = "images/{split}",
        image_dir: str | None = None,
        mask_dir: str | None = None,
        image_suffix: str | None = None,
        mask_suffix: str | None = None,
        pairs_file: str | None = None,
        pairs_base: Literal["root", "list"] = "root",
        path_prefix: dict[str, str] | None = None,
        ignore_index: int = IGNORE_INDEX,
        label_map: dict[int, int] | None = None,
        unlisted: Literal["ignore", "error"] = "error",
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
        given = {"image_dir": image_dir, "mask_dir": mask_dir, "image_suffix": image_suffix}
        given |= {"mask_suffix": mask_suffix, "pairs_file": pairs_file, "path_prefix": path_prefix}
        check_layout_options(layout, given)
        self.folders = folder_layout(layout, image_dir, mask_dir, image_suffix, mask_suffix)
        self.pairs_file, self.pairs_base, self.path_prefix = pairs_file or "{split}.txt", pairs_base, path_prefix
        self.synthetic = renamed("data", "shapes", "synthetic", shapes, synthetic, None)
        check_size("data.crop_size", crop_size, optional=True)
        check_size("data.scale_size", scale_size, optional=True)
        check_range("data.scale_range", scale_range, positive=True)
        self.crop_size, self.scale_size, self.scale_range = crop_size, scale_size, scale_range
        self.hflip = check_probability("data.hflip", flip_probability(hflip))
        #: who says what the mask values mean, for messages (checked against a model's: tasks.classes)
        self.class_source = "data.classes"
        self.classes = list(classes) if classes else self._default_classes()
        if len(self.classes) < 2:
            raise ValueError(f"classes needs background and at least one class, got {self.classes}")
        #: how masks become training ids (ignore value, label map): every layout reads its masks with it
        self.labels = mask_labels(layout, len(self.classes), ignore_index, label_map, unlisted)
        if crop_size is None and batch_size != 1:
            raise ValueError(f"data.crop_size null (whole images) needs data.batch_size 1, got {batch_size}")

    def _default_classes(self) -> list[str]:
        if self.synthetic is not None:
            self.class_source = "the shapes dataset's classes (data.synthetic)"
            return ["background", *SHAPES_CLASSES]
        if self.layout in ("voc", "sbd"):
            self.class_source = "VOC's 21 classes (data.classes unset)"
            return list(VOC_SEGMENTATION_CLASSES)
        if self.layout in PRESETS:
            self.class_source = f"the {self.layout} classes (data.classes unset)"
            return list(PRESETS[self.layout].classes)
        if self.layout in ("folders", "pairs"):
            raise ValueError(f"layout {self.layout} needs data.classes: the names of the mask values 0, 1, ...")
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
    def ignore_index(self) -> int:
        """The mask value that is not a class (linked to ``model.ignore_index``)."""
        return self.labels.ignore_index

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
            return VOCSegmentation(self.root, split, self.labels, self.voc_year, transforms)
        if self.layout == "sbd":
            return sbd_layout_split(self.root, split, self.labels, self.voc_year, transforms)
        if self.layout in FOLDER_LAYOUTS:
            root = PRESETS[self.layout].root(self.root) if self.layout in PRESETS else self.root
            return folders_split(root, split, self.folders, self.labels, transforms)
        if self.layout == "pairs":
            return pairs_split(
                self.root, split, self.pairs_file, self.labels, self.pairs_base, self.path_prefix, transforms
            )
        return COCOSegmentation(
            require_file("data.coco_ann_file", self.root / self.coco_ann_file.format(split=split)),
            require_folder("data.coco_image_dir", self.root / self.coco_image_dir.format(split=split)),
            self.classes,
            transforms,
            self.ignore_index,
        )

    def median_frequency_weights(self) -> list[float]:
        """``model.class_weights: median_frequency`` of the training masks (:mod:`tasks.data.class_weights`:
        cached in ``data.root``, printed once), in class order."""
        options = {"layout": self.layout, "split": self.train_split, "label_map": self.labels.label_map,
                   "unlisted": self.labels.unlisted, "classes": self.classes}  # fmt: skip
        weights, where = cached_median_frequency(
            self.dataset(self.train_split), self.num_classes, self.ignore_index, self.root, options,
            write=is_global_zero(),
        )  # fmt: skip
        if is_global_zero():
            print(f"model.class_weights median_frequency ({where}): {describe_weights(weights, self.classes)}")
        return weights

    def build_dataset(self, name: str) -> Dataset:
        """``train`` (augmented)/``val``/``test``: their splits; ``predict``: ``predict_images``, else ``val_split``."""
        if name == "train":
            tf = train_transforms(self.crop_size, self.scale_size, self.scale_range, self.hflip, self.ignore_index)
            return self.dataset(self.train_split, tf)
        if name == "predict" and self.predict_images:
            require_exists("data.predict_images", self.predict_images, "folder, image list or image")
            return segmentation_images(self.predict_images)
        if name == "predict":
            return self.dataset(self.val_split)
        return self.dataset(self.test_split if name == "test" else self.val_split)
