"""Detection data: datasets, transforms v2, collate and :class:`DetectionDataModule`.

The readers turn their files into the same :class:`~tasks.data.records.DetectionRecord` list,
so training, evaluation and prediction never care which layout the data came from:
COCO instances JSON (:mod:`tasks.data.coco`, pycocotools), PASCAL VOC XML (:mod:`tasks.data.voc`)
or the Ultralytics YOLO tree (:mod:`tasks.data.yolo`).

Boxes are clipped to the image; boxes that are degenerate or fall outside the image are
dropped with one counted warning per file. Unreadable images are skipped with a counted
warning (:mod:`tasks.images`); everything else that is wrong raises an error naming the file.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from tasks.data.coco import find_coco_images, read_coco, read_coco_categories
from tasks.data.records import DetectionRecord, DetectionSplit, check_has_boxes
from tasks.data.shapes import CLASSES as SHAPES_CLASSES
from tasks.data.shapes import ShapesConfig, ensure_shapes
from tasks.data.voc import VOC_CLASSES, read_voc
from tasks.data.yolo import YoloConfig, read_yolo, read_yolo_config
from tasks.deprecation import old_names, renamed
from tasks.images import BadImageError, ImageListDataset, SkippedSample, drop_skipped, read_image
from tasks.module import TaskDataModule
from tasks.options import check_probability, check_size, require_exists, require_file, require_folder

__all__ = [
    "VOC_CLASSES",
    "DetectionBatch",
    "DetectionDataModule",
    "DetectionDataset",
    "DetectionRecord",
    "DetectionSplit",
    "collate_detection",
    "detection_images",
    "detection_transforms",
    "find_coco_images",
    "read_coco",
    "read_voc",
]


#: ImageNet mean in 0-255: what SSD's zoom-out fills the canvas with (torchvision's detection references).
SSD_FILL_MEAN = (123, 117, 104)


def detection_transforms(
    train: bool,
    hflip: float = 0.5,
    photometric: float = 0.5,
    augment: Literal["frcnn", "ssd"] = "frcnn",
    fixed_size: int | None = None,
) -> v2.Compose:
    """transforms v2 on ``(tv_tensors.Image uint8, {"boxes": BoundingBoxes, "labels": ...})``.

    Training, ``augment="frcnn"``: horizontal flip and photometric distortion (brightness/
    contrast/saturation/hue jitter), boxes moved with the image. ``augment="ssd"``: the SSD
    paper's augmentation as torchvision's detection references build it (``presets.py``,
    ``data_augmentation="ssd"``): ``RandomPhotometricDistort(p=photometric)``,
    ``RandomZoomOut`` (the "expand" up to 4x, canvas filled with the ImageNet mean
    :data:`SSD_FILL_MEAN`), ``RandomIoUCrop`` (the paper's min-IoU patch sampling, or the whole
    image), ``RandomHorizontalFlip(hflip)``. Then, in training, ``fixed_size``: a resize to
    ``fixed_size x fixed_size`` (SSD's input; the model's own transform resizes to its ``size``
    again, a no-op when they agree, which :class:`~tasks.detect.DetectionTask` checks); float
    ``[0, 1]``; and ``SanitizeBoundingBoxes``, which drops boxes a transform made degenerate
    (crops and flips). Evaluation images are only converted to float: resizing is the model's
    job (``GeneralizedRCNNTransform``), so predictions come back in the file's pixels.
    """
    if augment not in ("frcnn", "ssd"):
        raise ValueError(f"augment must be 'frcnn' or 'ssd', got {augment!r}")
    ops: list[Any] = []
    if train:
        if augment == "ssd":
            if photometric > 0:
                ops.append(v2.RandomPhotometricDistort(p=photometric))
            ops += [v2.RandomZoomOut(fill={tv_tensors.Image: SSD_FILL_MEAN, "others": 0}), v2.RandomIoUCrop()]
            if hflip > 0:
                ops.append(v2.RandomHorizontalFlip(hflip))
        else:
            if hflip > 0:
                ops.append(v2.RandomHorizontalFlip(hflip))
            if photometric > 0:
                ops.append(v2.RandomPhotometricDistort(p=photometric))
        if fixed_size is not None:
            ops.append(v2.Resize((fixed_size, fixed_size)))
    ops.append(v2.ToDtype(torch.float32, scale=True))
    if train:
        ops.append(v2.SanitizeBoundingBoxes())
    return v2.Compose(ops)


class DetectionDataset(Dataset):
    """Samples of a :class:`DetectionSplit`: ``(image (3, H, W) float in [0, 1], target)``.

    Training targets hold ``boxes`` (``BoundingBoxes`` xyxy), ``labels`` and ``image_id``;
    ``ignore`` boxes are left out unless ``keep_ignored``. Evaluation targets hold only
    ``image_id`` and ``size`` (the ground truth for metrics comes from :attr:`split`).
    An unreadable image, or one whose size differs from its annotation, yields a
    :class:`~tasks.images.SkippedSample` that the collate drops with a counted warning.
    """

    def __init__(self, split: DetectionSplit, train: bool, transforms: Any = None, keep_ignored: bool = False) -> None:
        self.split = split
        self.train = train
        self.transforms = transforms if transforms is not None else detection_transforms(train)
        self.keep_ignored = keep_ignored

    def __len__(self) -> int:
        return len(self.split.records)

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, dict[str, Any]] | SkippedSample:
        rec = self.split.records[idx]
        try:
            raw = read_image(rec.path)
        except BadImageError as e:
            return SkippedSample(e.path, e.reason)
        h, w = raw.shape[-2:]
        if (w, h) != (rec.width, rec.height):
            turned = (h, w) == (rec.width, rec.height)  # annotated on the stored pixels of an EXIF-rotated file?
            why = " (read upright, EXIF orientation applied; boxes must be for the displayed image)" if turned else ""
            return SkippedSample(
                str(rec.path), f"image is {w}x{h}{why} but its annotation says {rec.width}x{rec.height}"
            )
        image = tv_tensors.Image(raw)
        if not self.train:
            return self.transforms(image), {"image_id": rec.image_id, "size": (h, w)}
        keep = np.ones(len(rec.labels), bool) if self.keep_ignored else ~rec.ignore
        target = {
            "boxes": tv_tensors.BoundingBoxes(torch.from_numpy(rec.boxes[keep]), format="XYXY", canvas_size=(h, w)),
            "labels": torch.from_numpy(rec.labels[keep]),
            "image_id": rec.image_id,
        }
        image, target = self.transforms(image, target)
        return image, target


def _image_sample(index: int, sample: dict[str, Any] | SkippedSample) -> Any:
    """An image to predict on as a detection sample: ``(float image in [0, 1], {"image_id", "size": (H, W),
    "path", "out_name"})`` (``out_name``: the distinct output stem)."""
    if isinstance(sample, SkippedSample):
        return sample
    raw = sample["image"]
    target = {"image_id": sample["id"], "size": tuple(raw.shape[-2:]), "path": sample["path"]}
    return v2.functional.to_dtype(raw, torch.float32, scale=True), target | {"out_name": sample["name"]}


def detection_images(source: str | Path | Sequence[str | Path], ids: Sequence[int] | None = None) -> ImageListDataset:
    """Images to predict on (:class:`tasks.images.ImageListDataset`) as detection samples
    (:func:`_image_sample`); ``ids`` default to the positions in the list."""
    return ImageListDataset(source, ids, item=_image_sample)


@dataclass
class DetectionBatch:
    """A collated batch: lists of images and targets, plus ``(path, reason)`` of skipped samples.

    (Plain tuples, not :class:`~tasks.images.SkippedSample`: Lightning's device transfer
    rebuilds dataclasses and refuses frozen ones.)
    """

    images: list[torch.Tensor]
    targets: list[dict[str, Any]]
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.images)


def collate_detection(samples: Sequence[Any]) -> DetectionBatch:
    """Detection models take lists (images differ in size); unreadable samples are dropped, listed in ``skipped``."""
    kept, skipped = drop_skipped(samples)  # counted and reported once per epoch by the task
    return DetectionBatch([s[0] for s in kept], [s[1] for s in kept], [(s.path, s.reason) for s in skipped])


class DetectionDataModule(TaskDataModule):
    """Detection data from a COCO, PASCAL VOC or YOLO tree.

    Args:
        root: dataset root. COCO: holds ``annotations/instances_<split>.json`` and the images
            (``images/<split>/`` or ``<split>/``). VOC: holds ``VOCdevkit/`` (or is it). YOLO:
            the ``data.yaml`` file, or the folder holding it (:mod:`tasks.data.yolo`).
        layout: ``coco``, ``voc`` or ``yolo``.
        train_split, val_split: split names (COCO: ``train2017``; VOC: ``trainval``,
            ``VOC2012/trainval``, ``VOC2007/trainval+VOC2012/trainval``; YOLO: keys of
            ``data.yaml``, ``train``/``val``/``test``).
        test_split: split for ``test`` (default: ``val_split``; VOC07: ``test``).
        train_ann, val_ann, test_ann: COCO only: explicit annotation files (override the split name).
        train_images, val_images, test_images: COCO only: explicit image folders.
        predict_images: images for ``predict``: a folder, an image, or a text file of paths
            (default: the validation images, with their ids).
        classes: VOC: object class names in label order (default: VOC's 20). COCO and YOLO: taken
            from the file's categories (``names``); if given, must match them.
        train_difficult: train on VOC ``difficult`` objects too (the paper's code does not).
        hflip: horizontal flip probability in training.
        photometric: probability of each photometric distortion in training.
        augment: training augmentation (:func:`detection_transforms`): ``frcnn`` (flip +
            photometric, Faster R-CNN/RetinaNet/FCOS) or ``ssd`` (the SSD paper's photometric,
            zoom-out, IoU crop and flip). Chosen here, not derived from ``model.family``: either
            works with every family; the SSD configs set ``ssd``.
        fixed_size: resize training images to ``fixed_size x fixed_size`` in the loader (SSD: its
            ``model.size``, checked by the task; ``None``: the model resizes them).
        synthetic: generate the synthetic shapes dataset with these settings into ``root`` when
            it is missing or was made with other settings (the demo; :mod:`tasks.data.shapes`).
        batch_size, eval_batch_size, num_workers: loaders (``batch_size`` per process).
        format, train_set, val_set, test_set, predict_path, shapes: old names of ``layout``,
            ``train_split``, ``val_split``, ``test_split``, ``predict_images``, ``synthetic``
            (accepted, warned once).
    """

    collate_fns: ClassVar[Mapping[str, Any]] = dict.fromkeys(("train", "val", "test", "predict"), collate_detection)

    def __init__(
        self,
        root: str = "data/shapes",
        layout: Literal["coco", "voc", "yolo"] = "coco",
        train_split: str = "train",
        val_split: str = "val",
        test_split: str | None = None,
        train_ann: str | None = None,
        val_ann: str | None = None,
        test_ann: str | None = None,
        train_images: str | None = None,
        val_images: str | None = None,
        test_images: str | None = None,
        predict_images: str | None = None,
        classes: list[str] | None = None,
        train_difficult: bool = False,
        hflip: float = 0.5,
        photometric: float = 0.5,
        augment: Literal["frcnn", "ssd"] = "frcnn",
        fixed_size: int | None = None,
        synthetic: ShapesConfig | None = None,
        batch_size: int = 2,
        eval_batch_size: int | None = None,
        num_workers: int = 2,
        format: Literal["coco", "voc"] | None = None,
        train_set: str | None = None,
        val_set: str | None = None,
        test_set: str | None = None,
        predict_path: str | None = None,
        shapes: ShapesConfig | None = None,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers)
        owner = "data"
        layout = renamed(owner, "format", "layout", format, layout, "coco")
        train_split = renamed(owner, "train_set", "train_split", train_set, train_split, "train")
        val_split = renamed(owner, "val_set", "val_split", val_set, val_split, "val")
        test_split = renamed(owner, "test_set", "test_split", test_set, test_split, None)
        predict_images = renamed(owner, "predict_path", "predict_images", predict_path, predict_images, None)
        synthetic = renamed(owner, "shapes", "synthetic", shapes, synthetic, None)
        # not the classes: the model's hyper-parameters hold the resolved ones
        self.save_hyperparameters(ignore=["classes", "format", "train_set", "val_set", "test_set", "predict_path",
                                          "shapes"])  # fmt: skip
        if layout not in ("coco", "voc", "yolo"):
            raise ValueError(f"data.layout must be 'coco', 'voc' or 'yolo', got {layout!r}")
        self.root = Path(root)
        self.layout = layout
        self.splits = {"train": train_split, "val": val_split, "test": test_split or val_split}
        self.anns = {"train": train_ann, "val": val_ann, "test": test_ann}
        self.image_dirs = {"train": train_images, "val": val_images, "test": test_images}
        self.predict_images = predict_images
        self._classes = list(classes) if classes is not None else None
        self.train_difficult = train_difficult
        self.hflip = check_probability("data.hflip", hflip)
        self.photometric = check_probability("data.photometric", photometric)
        if augment not in ("frcnn", "ssd"):
            raise ValueError(f"data.augment must be 'frcnn' or 'ssd', got {augment!r}")
        check_size("data.fixed_size", fixed_size, optional=True)
        self.augment, self.fixed_size = augment, fixed_size
        self.synthetic = synthetic
        self._splits: dict[str, DetectionSplit] = {}
        self._categories: list[dict[str, Any]] | None = None
        self._yolo: YoloConfig | None = None

    # -- classes (linked to the model at instantiation, before any data is read) --
    @property
    def classes(self) -> list[str]:
        """Class names in label order (label 0 is background)."""
        if self._classes is not None:
            return self._classes
        if self.synthetic is not None:
            return list(SHAPES_CLASSES)
        if self.layout == "voc":
            return list(VOC_CLASSES)
        if self.layout == "yolo":
            return list(self.yolo_config().names)
        return [c["name"] for c in self._file_categories()]

    def yolo_config(self) -> YoloConfig:
        """``layout: yolo``: the ``data.yaml`` at ``data.root`` (read once)."""
        if self._yolo is None:
            self._yolo = read_yolo_config(require_exists("data.root", self.root, "YOLO data.yaml or its folder"))
        return self._yolo

    @property
    def category_ids(self) -> list[int]:
        """COCO category id of each label (results JSON); ``1..K`` unless a COCO file says otherwise."""
        if self.layout == "coco" and self.synthetic is None and self._classes is None:
            return [int(c["id"]) for c in self._file_categories()]
        return list(range(1, len(self.classes) + 1))

    def _file_categories(self) -> list[dict[str, Any]]:
        """``categories`` of the first COCO annotation file found (val first: the smallest), by id."""
        if self._categories is None:
            files = [self._ann_file(stage) for stage in ("val", "train", "test")]
            found = next((f for f in files if f.is_file()), None)
            if found is None:
                raise FileNotFoundError(
                    f"{self.root}: no COCO annotation file to read the class names from "
                    f"(looked for {files[0]} and {files[1]})"
                )
            self._categories = read_coco_categories(found)
        return self._categories

    def _ann_file(self, stage: str) -> Path:
        explicit = self.anns[stage]
        return Path(explicit) if explicit else self.root / "annotations" / f"instances_{self.splits[stage]}.json"

    def split(self, stage: Literal["train", "val", "test"]) -> DetectionSplit:
        """Read (once) the records of ``stage``; a split without a box to train on or evaluate is an error
        naming its file (:func:`~tasks.data.records.check_has_boxes`)."""
        split = self._read_split(stage)
        check_has_boxes(split, stage)
        return split

    def split_of(self, name: str) -> DetectionSplit | None:
        """The split the ``name`` dataset is read from: ``predict`` reads the validation images
        (``None`` with ``predict_images``: an image folder, no annotations needed)."""
        if name == "predict":
            return None if self.predict_images is not None else self._read_split("val")
        return self.split(name)  # type: ignore[arg-type]

    def read_split(self, stage: Literal["train", "val", "test"]) -> DetectionSplit:
        """The records of ``stage`` as its reader returns them (read once), not checked for boxes
        (``python -m tasks.data check`` counts what :meth:`split` would refuse)."""
        return self._read_split(stage)

    def _read_split(self, stage: Literal["train", "val", "test"]) -> DetectionSplit:
        if stage not in self._splits:
            if self.layout == "coco":
                image_dir, ann = self.image_dirs[stage], self.anns[stage]
                if not (image_dir and ann):  # read from data.root
                    require_folder("data.root", self.root)
                if image_dir:
                    images = require_folder(f"data.{stage}_images", image_dir)
                else:
                    images = find_coco_images(self.root, self.splits[stage])
                ann_file = require_file(f"data.{stage}_ann" if ann else f"data.{stage}_split", self._ann_file(stage))
                split = read_coco(ann_file, images)
            elif self.layout == "yolo":
                split = read_yolo(self.yolo_config(), self.splits[stage])
            else:
                split = read_voc(require_folder("data.root", self.root), self.splits[stage], self.classes)
            if self.layout != "voc" and self._classes is not None and split.classes != self._classes:
                raise ValueError(f"{split.source}: categories {split.classes} differ from data.classes {self._classes}")
            self._splits[stage] = split
        return self._splits[stage]

    def prepare_data(self) -> None:
        if self.synthetic is not None:
            if self.layout not in self.synthetic.layouts:
                raise ValueError(
                    f"data.layout is {self.layout!r} but data.synthetic.layouts is {self.synthetic.layouts}"
                )
            ensure_shapes(self.root, self.synthetic)

    def build_dataset(self, name: str) -> Dataset:
        """``train`` (augmented)/``val``/``test``: their splits; ``predict``: ``predict_images``, else
        the validation images with their ids."""
        if name == "train":
            return DetectionDataset(
                self.split("train"),
                train=True,
                transforms=detection_transforms(True, self.hflip, self.photometric, self.augment, self.fixed_size),
                keep_ignored=self.train_difficult,
            )
        if name == "predict":
            if self.predict_images is not None:
                require_exists("data.predict_images", self.predict_images, "folder, image list or image")
                return detection_images(self.predict_images)
            val = self._read_split("val")  # its images and ids only: annotations are not needed
            return detection_images([r.path for r in val.records], ids=[r.image_id for r in val.records])
        return DetectionDataset(self.split(name), train=False)

    @property
    def format(self) -> str:
        """The old name of :attr:`layout`."""
        return self.layout

    @property
    def shapes(self) -> ShapesConfig | None:
        """The old name of :attr:`synthetic`."""
        return self.synthetic


__getattr__ = old_names(
    __name__, {"DetectionData": lambda: DetectionDataModule, "ImageFolderDataset": lambda: detection_images}
)
