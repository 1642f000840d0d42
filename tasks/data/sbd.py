"""SBD (Hariharan et al., "Semantic Contours from Inverse Detectors", ICCV 2011) and id-listed VOC sets.

The FCN recipe (``configs/segment/voc_fcn8s.yaml``) trains on SBD's ``train`` (8,498 images)
and evaluates on ``seg11valid`` (736 VOC2011 ``val`` images that are not in SBD ``train``).

* :class:`SBDSegmentation`: the Berkeley release, ``benchmark_RELEASE/dataset/{img/<id>.jpg,
  cls/<id>.mat, train.txt, val.txt}``. The label of an image is ``GTcls.Segmentation`` of its
  ``.mat`` file (uint8 ``H x W``, 0 = background, 1..20 = VOC's classes), read with
  ``scipy.io.loadmat`` as FCN's ``voc_layers.SBDDSegDataLayer`` does.
* :class:`VOCListSegmentation`: VOC images and ``SegmentationClass`` PNGs of the ids in a list
  file anywhere (e.g. ``configs/segment/lists/seg11valid.txt``), not only ``ImageSets/Segmentation``.

Samples are ``{"image": uint8 (3, H, W), "mask": int64 (H, W), "id", "path"}`` as in
:mod:`tasks.data.segmentation`; an unreadable image is a counted :class:`~tasks.images.SkippedSample`;
a missing or wrong label raises :class:`~tasks.data.masks.BadMaskError` naming the file.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors

from tasks.data.masks import BadMaskError, MaskLabels, as_mask_labels, check_mask, read_mask
from tasks.data.voc import read_image_set
from tasks.images import BadImageError, SkippedSample, read_image

__all__ = ["SBD_DIR", "SBDSegmentation", "VOCListSegmentation", "read_id_list", "read_sbd_label"]

#: Where the Berkeley release keeps its ``dataset`` folder, relative to the data root.
SBD_DIR = "benchmark_RELEASE/dataset"


def read_id_list(path: str | Path) -> list[str]:
    """Image ids of a list file, one per line (first column; blank lines skipped; each id once)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: image id list not found")
    return read_image_set(path)  # an empty list or an id listed twice: an error naming the file and lines


def read_sbd_label(
    path: str | Path, num_classes: int | MaskLabels, image_size: tuple[int, int] | None = None
) -> torch.Tensor:
    """``GTcls.Segmentation`` of an SBD ``cls/<id>.mat`` file as an int64 ``(H, W)`` tensor
    (through the label map of ``num_classes`` when it is a :class:`~tasks.data.masks.MaskLabels`).

    Raises :class:`BadMaskError` naming the file when it is missing, not a MATLAB file, has no
    ``GTcls.Segmentation``, or does not fit the image / the classes.
    """
    import scipy.io

    labels = as_mask_labels(num_classes)
    path = Path(path)
    if not path.is_file():
        raise BadMaskError(f"{path}: SBD label file not found")
    try:
        mat = scipy.io.loadmat(str(path), squeeze_me=False, struct_as_record=True)
        seg = mat["GTcls"][0]["Segmentation"][0]  # FCN's voc_layers.py reads it the same way
    except (ValueError, OSError, KeyError, IndexError, TypeError) as e:
        raise BadMaskError(f"{path}: cannot read GTcls.Segmentation ({type(e).__name__}: {e})") from e
    seg = np.asarray(seg)
    if seg.ndim != 2:
        raise BadMaskError(f"{path}: GTcls.Segmentation is {seg.ndim}-D, expected an H x W array")
    mask = torch.from_numpy(labels.convert(seg.astype(np.int64), path))
    check_mask(mask, labels.num_classes, path, image_size, labels.ignore_index)
    return mask


class _ListedSegmentation(Dataset):
    """Ids + where an id's image and label are (subclasses); the transforms act on the sample dict."""

    root: Path
    ids: list[str]
    labels: MaskLabels
    transforms: Callable[[dict], dict] | None

    @property
    def num_classes(self) -> int:
        return self.labels.num_classes

    def label_path(self, sid: str) -> Path:
        raise NotImplementedError

    def mask_files(self) -> list[Path]:
        """The label files in sample order (class statistics: :mod:`tasks.data.class_weights`)."""
        return [self.label_path(sid) for sid in self.ids]

    def mask_at(self, i: int) -> torch.Tensor:
        """Sample ``i``'s label ``(H, W)`` in training ids, its image not read."""
        return self.read_label(self.ids[i], None)

    def image_path(self, sid: str) -> Path:
        raise NotImplementedError

    def read_label(self, sid: str, size: tuple[int, int] | None) -> torch.Tensor:
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict | SkippedSample:
        sid = self.ids[i]
        path = self.image_path(sid)
        try:
            image = read_image(path)
        except BadImageError as e:
            return SkippedSample(str(path), e.reason)
        sample: dict[str, Any] = {
            "image": tv_tensors.Image(image),
            "mask": tv_tensors.Mask(self.read_label(sid, (image.shape[-2], image.shape[-1]))),
            "id": sid,
            "path": str(path),
        }
        return sample if self.transforms is None else self.transforms(sample)


class SBDSegmentation(_ListedSegmentation):
    """SBD's semantic labels (``cls/*.mat``) with their images (``img/*.jpg``).

    Args:
        root: the release's ``dataset`` folder, or a folder holding ``benchmark_RELEASE/dataset``.
        split: ``train`` / ``val`` (SBD's lists in ``dataset/``) or the path of a list file of ids.
        num_classes: classes including background (21).
        transforms: joint transform of the sample dict.
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        num_classes: int | MaskLabels = 21,
        transforms: Callable[[dict], dict] | None = None,
    ) -> None:
        root = Path(root)
        self.root = root if (root / "cls").is_dir() or (root / "img").is_dir() else root / SBD_DIR
        if not (self.root / "img").is_dir() or not (self.root / "cls").is_dir():
            raise FileNotFoundError(f"{self.root}: not an SBD dataset folder (needs img/ and cls/)")
        named = self.root / f"{split}.txt"
        self.ids = read_id_list(named if named.is_file() else Path(split))
        self.labels, self.transforms = as_mask_labels(num_classes), transforms

    def image_path(self, sid: str) -> Path:
        return self.root / "img" / f"{sid}.jpg"

    def label_path(self, sid: str) -> Path:
        return self.root / "cls" / f"{sid}.mat"

    def read_label(self, sid: str, size: tuple[int, int] | None) -> torch.Tensor:
        return read_sbd_label(self.label_path(sid), self.labels, size)


class VOCListSegmentation(_ListedSegmentation):
    """VOC ``JPEGImages`` + ``SegmentationClass`` PNGs of the ids in ``list_file``.

    Args:
        voc_dir: the ``VOC20xx`` folder (holding ``JPEGImages`` and ``SegmentationClass``).
        list_file: a file of image ids (e.g. FCN's ``seg11valid.txt``).
        num_classes: classes including background (21).
        transforms: joint transform of the sample dict.
    """

    def __init__(
        self,
        voc_dir: str | Path,
        list_file: str | Path,
        num_classes: int | MaskLabels = 21,
        transforms: Callable[[dict], dict] | None = None,
    ) -> None:
        self.root = Path(voc_dir)
        if not (self.root / "JPEGImages").is_dir():
            raise FileNotFoundError(f"{self.root}: not a VOC folder (no JPEGImages/)")
        self.ids = read_id_list(list_file)
        self.labels, self.transforms = as_mask_labels(num_classes), transforms

    def image_path(self, sid: str) -> Path:
        return self.root / "JPEGImages" / f"{sid}.jpg"

    def label_path(self, sid: str) -> Path:
        return self.root / "SegmentationClass" / f"{sid}.png"

    def read_label(self, sid: str, size: tuple[int, int] | None) -> torch.Tensor:
        return read_mask(self.label_path(sid), self.labels, size)


def sbd_layout_split(
    root: str | Path,
    split: str,
    num_classes: int | MaskLabels = 21,
    voc_year: str = "VOC2012",
    transforms: Callable[[dict], dict] | None = None,
) -> Dataset:
    """A split of the ``sbd`` layout (``data.layout: sbd``), ``root`` holding both
    ``benchmark_RELEASE/dataset`` and ``VOCdevkit/<voc_year>``:

    * a name of one of SBD's lists (``train``, ``val``: ``benchmark_RELEASE/dataset/<split>.txt``)
      is read from SBD (``img/``, ``cls/*.mat``);
    * otherwise ``split`` is the path of an id list (``configs/segment/lists/seg11valid.txt``)
      read from VOC (``JPEGImages``, ``SegmentationClass``).
    """
    root = Path(root)
    sbd = root / SBD_DIR
    if (sbd / f"{split}.txt").is_file():
        return SBDSegmentation(sbd, split, num_classes, transforms)
    if Path(split).is_file():
        return VOCListSegmentation(root / "VOCdevkit" / voc_year, split, num_classes, transforms)
    raise FileNotFoundError(
        f"layout sbd: split {split!r} is neither an SBD list ({sbd / f'{split}.txt'}) nor an id list file"
    )
