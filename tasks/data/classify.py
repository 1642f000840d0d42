"""Classification data: the ImageFolder layout (or ``layout: csv``), grayscale or RGB, torchvision ``transforms.v2``.

Layout (torchvision's ``ImageFolder``)::

    <root>/<split>/<class>/<image>.png|jpg|...    (split: train, val, test; any depth below <class>)

Class folders are found and listed as torchvision's ``find_classes`` / ``make_dataset`` do (same
samples, same order), by :func:`tasks.walk.walk_files`, which also follows linked folders but
never into a loop (torchvision's ``os.walk(followlinks=True)`` does) nor into a folder listed
already, and reports the links it skipped; the class indices are the sorted folder names of the
training split (or ``data.classes``), the same in every split. ``layout: csv`` reads a
``path,label`` CSV per split instead (:mod:`tasks.data.classify_csv`). Images are decoded by
:func:`tasks.images.read_image` (``L`` for ``in_channels: 1``, ``RGB`` for 3): a missing, empty
or corrupt image becomes a :class:`~tasks.images.SkippedSample`, dropped by the collate and
counted and reported once per epoch by the task, as in every other task.

Samples are ``{"image": float (C, S, S) in [0, 1], "label": int, "index": int, "path": str}``;
batches ``{"image": (N, C, S, S), "label": (N,), "index": (N,), "path": [...], "skipped": [...]}``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch.utils.data import Dataset
from torchvision.transforms import v2

from tasks.data.classify_csv import csv_class_names, csv_split
from tasks.data.digits import DigitsConfig, ensure_digits
from tasks.deprecation import old_names, renamed
from tasks.distributed import is_global_zero
from tasks.images import IMAGE_EXTENSIONS, ImageListDataset, drop_skipped
from tasks.module import TaskDataModule
from tasks.options import check_probability, check_range, check_size, require_exists, require_folder
from tasks.walk import class_folders, walk_files

__all__ = [
    "ClassificationDataModule",
    "collate_classify",
    "eval_transforms",
    "image_folder_split",
    "train_transforms",
    "unlabelled_images",
]

# the old datasets of this module, now :class:`tasks.images.ImageListDataset` (configured by these functions)
__getattr__ = old_names(
    __name__, {"ImageFolderDataset": lambda: image_folder_split, "ImageFiles": lambda: unlabelled_images}
)

_MODES = {1: "L", 3: "RGB"}
#: class names of the digits demo (the folder names :mod:`tasks.data.digits` writes)
DIGITS_CLASSES = [str(k) for k in range(10)]


def _mode(in_channels: int) -> str:
    if in_channels not in _MODES:
        raise ValueError(f"in_channels must be 1 (grayscale, read as L) or 3 (RGB), got {in_channels}")
    return _MODES[in_channels]


def image_folder_split(
    root: str | Path,
    classes: Sequence[str],
    in_channels: int = 3,
    transform: Callable[[Any], Any] | None = None,
    allow_empty: bool = False,
) -> ImageListDataset:
    """One split of an ImageFolder tree: ``root/<class>/**/<image>``, listed as torchvision does,
    as a labelled :class:`tasks.images.ImageListDataset`.

    Args:
        root: the split folder (``<data root>/train``...).
        classes: class names in index order; every class folder under ``root`` must be one of
            them (a folder that is not is an error naming it). A class without a folder or
            without images is allowed only with ``allow_empty`` (evaluation splits).
        in_channels: 1 (images read as ``L``) or 3 (``RGB``).
        transform: applied to the uint8 ``(C, H, W)`` image.
        allow_empty: allow classes without images (otherwise torchvision's error names them).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: split folder not found (ImageFolder layout: <root>/<split>/<class>/)")
    # torchvision's make_dataset walks with os.walk(followlinks=True), which loops for ever on a
    # link back into an ancestor: tasks.walk lists the same files in the same order, never twice
    walk = walk_files(root, IMAGE_EXTENSIONS)
    if is_global_zero():
        walk.warn()
    found = sorted({d[0] for d in walk.dirs})
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise ValueError(f"{root}: class folder(s) {unknown} are not among the classes {list(classes)}")
    class_to_idx = {c: i for i, c in enumerate(classes)}
    # torchvision's order: class by class, then by folder path, then by file name
    listed = sorted((f for f in walk.files if len(f) > 1), key=lambda f: (f[0], os.sep.join(f[:-1]), f[-1]))
    empty = sorted(set(found) - {f[0] for f in listed})
    if empty and not allow_empty:  # torchvision's make_dataset error
        raise FileNotFoundError(
            f"{root}: found no valid file for the classes {', '.join(empty)}. "
            f"Supported extensions are: {', '.join(IMAGE_EXTENSIONS)}"
        )
    if not listed:
        raise ValueError(f"{root}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)})")
    paths = [os.path.join(root, *f) for f in listed]
    dataset = ImageListDataset(paths, transform=transform, labels=[class_to_idx[f[0]] for f in listed],
                               mode=_mode(in_channels))  # fmt: skip
    dataset.classes, dataset.class_to_idx = list(classes), class_to_idx  # as torchvision's ImageFolder
    return dataset


def unlabelled_images(
    source: str | Path, in_channels: int = 3, transform: Callable[[Any], Any] | None = None
) -> ImageListDataset:
    """Images without labels (``label`` -1) from a folder, an image list file or one image
    (:func:`tasks.images.list_images`), for ``predict``."""
    return ImageListDataset(source, transform=transform, mode=_mode(in_channels))


# ---------------------------------------------------------------------------- transforms
def train_transforms(
    image_size: int,
    crop: Literal["random_resized", "resize_crop", "scale_jitter"] = "random_resized",
    resize_size: int | None = None,
    scale_range: tuple[float, float] = (0.08, 1.0),
    jitter_range: tuple[int, int] = (256, 512),
    hflip: float = 0.5,
) -> v2.Compose:
    """Training augmentation of uint8 images, ending in float ``[0, 1]`` ``(C, image_size, image_size)``.

    * ``random_resized``: ``v2.RandomResizedCrop(image_size, scale=scale_range)`` (Inception-style);
    * ``resize_crop``: shorter side resized to ``resize_size``, random ``image_size`` crop;
    * ``scale_jitter``: the VGG paper's multi-scale training: shorter side ``S`` drawn uniformly
      from the integers in ``jitter_range`` (``v2.RandomShortestSize``), random ``image_size`` crop;

    then a horizontal flip with probability ``hflip``.
    """
    steps: list[Any]
    if crop == "random_resized":
        steps = [v2.RandomResizedCrop(image_size, scale=tuple(scale_range), antialias=True)]
    elif crop == "resize_crop":
        steps = [v2.Resize(resize_size or image_size, antialias=True), v2.RandomCrop(image_size)]
    elif crop == "scale_jitter":
        lo, hi = int(jitter_range[0]), int(jitter_range[1])
        if not image_size <= lo <= hi:
            raise ValueError(f"jitter_range must satisfy image_size <= S_min <= S_max, got {jitter_range}")
        steps = [v2.RandomShortestSize(list(range(lo, hi + 1)), antialias=True), v2.RandomCrop(image_size)]
    else:
        raise ValueError(f"unknown train_crop {crop!r}; choose random_resized, resize_crop or scale_jitter")
    if hflip > 0:
        steps.append(v2.RandomHorizontalFlip(hflip))
    steps.append(v2.ToDtype(torch.float32, scale=True))
    return v2.Compose(steps)


def eval_transforms(image_size: int, resize_size: int | None = None) -> v2.Compose:
    """Shorter side resized to ``resize_size`` (default ``image_size``), centre ``image_size`` crop, ``[0, 1]``."""
    return v2.Compose(
        [
            v2.Resize(resize_size or image_size, antialias=True),
            v2.CenterCrop(image_size),
            v2.ToDtype(torch.float32, scale=True),
        ]
    )


def collate_classify(samples: list[Any]) -> dict[str, Any]:
    """Same-size images -> a batch; unreadable ones dropped and listed under ``skipped``."""
    kept, skipped = drop_skipped(samples)  # counted and reported once per epoch by the task
    return {
        "image": torch.stack([s["image"] for s in kept]) if kept else torch.empty(0, 1, 1, 1),
        "label": torch.tensor([s["label"] for s in kept], dtype=torch.long),
        "index": torch.tensor([s["index"] for s in kept], dtype=torch.long),
        "path": [s["path"] for s in kept],
        "skipped": [(s.path, s.reason) for s in skipped],
    }


# ---------------------------------------------------------------------------- data module
class ClassificationDataModule(TaskDataModule):
    """ImageFolder data for ``python -m tasks.classify``.

    Args:
        root: dataset folder holding one folder per split (``imagefolder``), or the images and
            the split CSVs (``csv``).
        layout: ``imagefolder`` (``<root>/<split>/<class>/...``) or ``csv`` (``csv_file`` per split:
            ``path,label`` rows, :mod:`tasks.data.classify_csv`).
        csv_file: ``csv``: the CSV of a split, ``{split}`` filled in, under ``root`` when relative
            (default ``{split}.csv``); its relative image paths are below ``root``.
        train_split, val_split, test_split: split folder names (ImageNet has no labelled test:
            set ``test_split: val``), or the ``{split}`` of ``csv_file``.
        classes: class names in index order. Default: the sorted class folders of
            ``train_split`` (of ``val_split``/``test_split`` when there is no training folder),
            the sorted label names of the training CSV (``csv``; index labels need ``classes``),
            or ``0``..``9`` for the digits (``synthetic``).
        in_channels: 1 (images read as grayscale ``L``) or 3 (``RGB``); linked to the model's.
        image_size: side of the square network input.
        resize_size: shorter side before the crop (evaluation: centre crop; ``resize_crop``
            training: random crop). Default ``image_size * 256 / 224`` (ImageNet's 256 -> 224).
        train_crop: ``random_resized``, ``resize_crop`` or ``scale_jitter`` (:func:`train_transforms`).
        scale_range: area range of ``random_resized``.
        jitter_range: ``[S_min, S_max]`` of ``scale_jitter`` (the paper's ``[256, 512]``).
        hflip: horizontal flip probability in training (0 for digits and text).
        predict_images: images for ``predict`` (folder, list file or one image); default: ``test_split``.
        synthetic: write scikit-learn's digits into ``root`` with this split when it is missing
            (:mod:`tasks.data.digits`, the demo's data: real images, generated as a tree, as every
            task's demo data is under ``data.synthetic``).
        batch_size, eval_batch_size, num_workers: loaders.
        digits: old name of ``synthetic`` (accepted, warned once).
    """

    collate_fns: ClassVar[Mapping[str, Any]] = {
        "train": collate_classify, "val": collate_classify, "test": collate_classify, "predict": collate_classify
    }  # fmt: skip

    def __init__(
        self,
        root: str = "data/digits",
        layout: Literal["imagefolder", "csv"] = "imagefolder",
        csv_file: str | None = None,
        train_split: str = "train",
        val_split: str = "val",
        test_split: str = "test",
        classes: list[str] | None = None,
        in_channels: int = 3,
        image_size: int = 224,
        resize_size: int | None = None,
        train_crop: Literal["random_resized", "resize_crop", "scale_jitter"] = "random_resized",
        scale_range: tuple[float, float] = (0.08, 1.0),
        jitter_range: tuple[int, int] = (256, 512),
        hflip: float = 0.5,
        predict_images: str | None = None,
        synthetic: DigitsConfig | None = None,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 2,
        digits: DigitsConfig | None = None,
    ) -> None:
        super().__init__(batch_size=batch_size, eval_batch_size=eval_batch_size, num_workers=num_workers)
        self.root = Path(root)
        self.layout = layout
        if csv_file is not None and layout != "csv":
            raise ValueError(f"data.csv_file is read by layout csv, not by {layout} (data.layout)")
        self.csv_file = csv_file or "{split}.csv"
        self.train_split, self.val_split, self.test_split = train_split, val_split, test_split
        _mode(in_channels)
        check_size("data.image_size", image_size)
        check_size("data.resize_size", resize_size, optional=True)
        check_range("data.scale_range", scale_range, maximum=1.0, positive=True)
        check_size("data.jitter_range", jitter_range, 2)
        check_probability("data.hflip", hflip)
        self.in_channels = in_channels
        self.image_size = image_size
        self.resize_size = resize_size or round(image_size * 256 / 224)
        if self.resize_size < image_size:
            raise ValueError(f"resize_size {self.resize_size} is smaller than image_size {image_size}")
        self.train_crop, self.scale_range, self.jitter_range = train_crop, tuple(scale_range), tuple(jitter_range)
        self.hflip = float(hflip)
        self.predict_images = predict_images
        self.synthetic = renamed("data", "digits", "synthetic", digits, synthetic, None)
        #: who says what the labels mean, for messages (checked against a model's: tasks.classes)
        self.class_source = "data.classes"
        self.classes = list(classes) if classes else self._default_classes()
        if len(self.classes) < 2:
            raise ValueError(f"classification needs at least 2 classes, got {self.classes}")

    def _default_classes(self) -> list[str]:
        if self.synthetic is not None:
            self.class_source = "the digits' classes (data.synthetic)"
            return list(DIGITS_CLASSES)
        if self.layout == "csv":
            path = self.split_csv(self.train_split)
            self.class_source = f"the sorted label names of {path}"
            names = csv_class_names(path)
            if is_global_zero():
                print(f"data.classes unset: {len(names)} classes, the sorted label names of {path}", flush=True)
            return names
        for split in (self.train_split, self.val_split, self.test_split):
            if (self.root / split).is_dir():
                self.class_source = f"the class folders of {self.root / split}"
                return class_folders(self.root / split)
        require_folder("data.root", self.root)
        raise FileNotFoundError(
            f"data.root {self.root}: none of the split folders {self.train_split}, {self.val_split}, "
            f"{self.test_split} (data.train_split, data.val_split, data.test_split) exists, so the class names "
            "cannot be read; set data.classes or create the data first"
        )

    @property
    def num_classes(self) -> int:
        """Number of classes (linked to ``model.num_classes``)."""
        return len(self.classes)

    @property
    def class_names(self) -> list[str]:
        return list(self.classes)

    @property
    def digits(self) -> DigitsConfig | None:
        """The old name of :attr:`synthetic`."""
        return self.synthetic

    def prepare_data(self) -> None:
        if self.synthetic is not None:
            ensure_digits(self.root, self.synthetic)

    def split_csv(self, split: str) -> Path:
        """``csv``: the CSV file of ``split`` (``csv_file`` with ``{split}`` filled in, under ``root``)."""
        path = Path(self.csv_file.format(split=split))
        return path if path.is_absolute() else self.root / path

    def dataset(self, split: str, train: bool = False, option: str = "data.val_split") -> ImageListDataset:
        """The ``split`` folder (or CSV) with training or evaluation transforms (``option`` names it in errors)."""
        if train:
            tf = train_transforms(
                self.image_size, self.train_crop, self.resize_size, self.scale_range, self.jitter_range, self.hflip
            )
        else:
            tf = eval_transforms(self.image_size, self.resize_size)
        if self.layout == "csv":
            require_folder("data.root", self.root)
            return csv_split(self.split_csv(split), self.root, self.classes, _mode(self.in_channels), tf)
        require_folder(option, self.root / split, within=("data.root", self.root))
        return image_folder_split(self.root / split, self.classes, self.in_channels, tf, allow_empty=not train)

    def build_dataset(self, name: str) -> Dataset:
        """``train``/``val``/``test``: their split folders; ``predict``: ``predict_images``, else ``test_split``."""
        if name == "train":
            return self.dataset(self.train_split, train=True, option="data.train_split")
        if name == "predict" and self.predict_images:
            require_exists("data.predict_images", self.predict_images, "folder, image list or image")
            tf = eval_transforms(self.image_size, self.resize_size)
            return unlabelled_images(self.predict_images, self.in_channels, tf)
        option = "data.val_split" if name == "val" else "data.test_split"
        return self.dataset(
            {"val": self.val_split, "test": self.test_split, "predict": self.test_split}[name], option=option
        )
