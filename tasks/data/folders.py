"""``layout: folders``: per split an image folder and a mask folder, images and masks matched by name.

The layout of mmsegmentation's ``img_dir``/``ann_dir``, of smp's examples and of most Kaggle sets::

    <root>/<image_dir with {split}>/**/<name><image_suffix>     e.g. images/train/a.jpg
    <root>/<mask_dir with {split}>/**/<name><mask_suffix>       e.g. masks/train/a.png

An image and a mask belong together when their paths below their folders are the same once the
suffixes are removed (``aachen/aachen_000000_000019`` of ``aachen_000000_000019_leftImg8bit.png``
and ``aachen_000000_000019_gtFine_labelIds.png``), as mmseg's ``BaseSegDataset`` pairs them
(suffix replaced, not guessed). Suffixes are matched in any case. An image without a mask or a
mask without an image is an error naming how many and the first few; other files in the folders
(Cityscapes' ``_color.png``, ``_polygons.json``...) are left out and counted in one printed line.

:class:`PairedSegmentation` is the dataset of listed ``(image, mask)`` pairs, shared with
:mod:`tasks.data.pairs`. Samples are ``{"image": uint8 (3, H, W), "mask": int64 (H, W), "id",
"path"}``; an unreadable image is a counted :class:`~tasks.images.SkippedSample`; a missing or
wrong mask raises :class:`~tasks.data.masks.BadMaskError` naming the file.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors

from tasks.data.masks import MaskLabels, as_mask_labels, read_mask
from tasks.distributed import is_global_zero
from tasks.images import BadImageError, SkippedSample, read_image
from tasks.manifest import few
from tasks.walk import walk_files

__all__ = ["FolderLayout", "PairedSegmentation", "distinct_ids", "folders_split", "match_folders"]


class PairedSegmentation(Dataset):
    """Segmentation samples of listed ``(image path, mask path, id)`` triples.

    Args:
        pairs: the samples in order; ``id`` names ``predict``'s outputs (distinct).
        labels: the number of classes or the :class:`~tasks.data.masks.MaskLabels` (ignore value,
            label map) the masks are read with.
        transforms: joint transform of the sample dict.
    """

    def __init__(
        self,
        pairs: Sequence[tuple[Path, Path, str]],
        labels: int | MaskLabels,
        transforms: Callable[[dict], dict] | None = None,
    ) -> None:
        self.pairs = list(pairs)
        self.labels = as_mask_labels(labels)
        self.num_classes = self.labels.num_classes
        self.transforms = transforms

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict | SkippedSample:
        image_path, mask_path, sid = self.pairs[i]
        try:
            image = read_image(image_path)
        except BadImageError as e:
            return SkippedSample(str(image_path), e.reason)
        sample: dict[str, Any] = {
            "image": tv_tensors.Image(image),
            "mask": tv_tensors.Mask(read_mask(mask_path, self.labels, (image.shape[-2], image.shape[-1]))),
            "id": sid,
            "path": str(image_path),
        }
        return sample if self.transforms is None else self.transforms(sample)

    def mask_at(self, i: int) -> torch.Tensor:
        """The training ids of sample ``i``'s mask ``(H, W)``, its image not read (class statistics)."""
        return read_mask(self.pairs[i][1], self.labels)

    def mask_files(self) -> list[Path]:
        """The mask files, in sample order (what a cache of mask statistics depends on)."""
        return [p[1] for p in self.pairs]


def distinct_ids(keys: Sequence[tuple[str, ...]]) -> list[str]:
    """Sample ids from relative paths without suffix: the last name where those are distinct,
    else the whole path joined with ``__`` (ids name ``predict``'s output files, one folder)."""
    stems = [k[-1] for k in keys]
    if len(set(stems)) == len(stems):
        return stems
    return ["__".join(k) for k in keys]


def _strip(files: Sequence[tuple[str, ...]], suffix: str) -> tuple[dict[tuple[str, ...], tuple[str, ...]], list]:
    """``{key: parts}`` of the files ending with ``suffix`` (any case), and the other files."""
    matched: dict[tuple[str, ...], tuple[str, ...]] = {}
    others = []
    low = suffix.lower()
    for parts in files:
        if parts[-1].lower().endswith(low) and len(parts[-1]) > len(suffix):
            matched[(*parts[:-1], parts[-1][: len(parts[-1]) - len(suffix)])] = parts
        else:
            others.append(parts)
    return matched, others


def match_folders(
    image_dir: str | Path, mask_dir: str | Path, image_suffix: str, mask_suffix: str
) -> tuple[list[tuple[Path, Path, str]], int]:
    """``(image, mask, id)`` of every image of ``image_dir`` and its mask in ``mask_dir`` (sorted),
    and the number of other files left out. Unmatched files raise ``ValueError`` naming how many
    and the first few; an empty match raises too."""
    image_dir, mask_dir = Path(image_dir), Path(mask_dir)
    image_walk, mask_walk = walk_files(image_dir, [""]), walk_files(mask_dir, [""])
    for walk in (image_walk, mask_walk):
        if is_global_zero():
            walk.warn()
    images, image_others = _strip(image_walk.files, image_suffix)
    masks, mask_others = _strip(mask_walk.files, mask_suffix)
    lone_images = sorted(set(images) - set(masks))
    lone_masks = sorted(set(masks) - set(images))
    if lone_images or lone_masks:
        parts = []
        if lone_images:
            names = [str(image_dir.joinpath(*images[k])) for k in lone_images]
            parts.append(f"{len(lone_images)} image(s) without a mask ({few(names, 3)})")
        if lone_masks:
            names = [str(mask_dir.joinpath(*masks[k])) for k in lone_masks]
            parts.append(f"{len(lone_masks)} mask(s) without an image ({few(names, 3)})")
        raise ValueError(
            f"{image_dir} / {mask_dir}: {' and '.join(parts)}; an image <name>{image_suffix} goes with the mask "
            f"<name>{mask_suffix} at the same place below its folder (data.image_suffix, data.mask_suffix)"
        )
    keys = sorted(images)
    if not keys:
        raise ValueError(
            f"{image_dir}: no image ending in {image_suffix!r} (data.image_suffix) with a mask ending in "
            f"{mask_suffix!r} (data.mask_suffix) in {mask_dir}"
        )
    ids = distinct_ids(keys)
    pairs = [(image_dir.joinpath(*images[k]), mask_dir.joinpath(*masks[k]), i) for k, i in zip(keys, ids)]
    return pairs, len(image_others) + len(mask_others)


@dataclass(frozen=True)
class FolderLayout:
    """Where a split's images and masks are below ``data.root`` (``{split}`` filled in) and their suffixes."""

    image_dir: str = "images/{split}"
    mask_dir: str = "masks/{split}"
    image_suffix: str = ".jpg"
    mask_suffix: str = ".png"


def folders_split(
    root: str | Path,
    split: str,
    layout: FolderLayout,
    labels: int | MaskLabels,
    transforms: Callable[[dict], dict] | None = None,
) -> PairedSegmentation:
    """The ``split`` of a ``folders`` tree under ``root`` (see the module docstring)."""
    root = Path(root)
    image_dir = root / layout.image_dir.format(split=split)
    mask_dir = root / layout.mask_dir.format(split=split)
    for option, folder in (("data.image_dir", image_dir), ("data.mask_dir", mask_dir)):
        if not folder.is_dir():
            there = sorted(p.name for p in folder.parent.iterdir() if p.is_dir()) if folder.parent.is_dir() else []
            hint = f" ({folder.parent} holds {few(there, 5)}: a split name?)" if there else ""
            raise FileNotFoundError(f"{folder}: {option} of split {split!r} is not a folder{hint}")
    pairs, others = match_folders(image_dir, mask_dir, layout.image_suffix, layout.mask_suffix)
    if others and is_global_zero():
        print(
            f"{image_dir} / {mask_dir}: {len(pairs)} image/mask pairs; {others} other file(s) left out (names not "
            f"ending in {layout.image_suffix!r} / {layout.mask_suffix!r})",
            flush=True,
        )
    return PairedSegmentation(pairs, labels, transforms)
