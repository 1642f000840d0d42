"""Images for every task: listing the inputs, reading them with errors that name the file, and
skipping unreadable samples with a count.

* :func:`list_images`: a folder, an image list file, one image or a list of paths -> the names
  and the files, the one reader of "images to run on" (detection and segmentation ``predict``,
  ReID ``extract``);
* :func:`output_names`: a distinct output file stem per listed image;
* :class:`ImageListDataset`: the one dataset of "images without annotations" (listed by
  :func:`list_images`, read by :func:`read_image`, unreadable ones returned as
  :class:`SkippedSample`); each task formats its items for its own collate;
* :func:`read_image`; :class:`SkippedSample`, :func:`drop_skipped`, :func:`warn_skipped` and
  :class:`SkipCounter` (skipped images gathered from every process and reported once) live in
  :mod:`tasks.skips` and are importable from here;
* :func:`open_image`: the one way a file is opened (images and masks): the pixel limit
  :data:`MAX_IMAGE_PIXELS` checked on the header before anything is decoded, then the EXIF
  orientation applied, so every reader sees the image as it is displayed.

What every reader gets (``docs/bad-input.md`` has the whole table):

* 16-bit images (PNG/TIFF ``I;16``/``I;16B``, 16-bit PGM/PPM read as ``I``) are scaled to 8 bits
  as torchvision's ``to_dtype(..., scale=True)`` does (the high byte), not clipped to white;
  48-bit RGB and 64-bit RGBA PNGs are already read that way by Pillow. 32-bit integer pixels
  outside ``0..65535`` and float (``F``) images have no defined range and are refused;
* an image whose header declares more than :func:`max_image_pixels` pixels is refused before
  it is decoded (a decompression bomb costs nothing);
* the EXIF orientation tag is applied (``ImageOps.exif_transpose``), in training and inference
  alike, so annotations are taken to be in the displayed orientation (as detectron2's
  ``read_image``, OpenCV's ``imread`` and the annotation tools LabelMe and CVAT have it).
"""

from __future__ import annotations

import os
import struct
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset
from torchvision.transforms.v2 import functional as TF

from tasks.distributed import is_global_zero
from tasks.pathnames import display_path
from tasks.skips import SkipCounter, SkippedSample, drop_skipped, warn_skipped
from tasks.walk import walk_files

__all__ = [
    "IMAGE_EXTENSIONS",
    "MAX_IMAGE_PIXELS",
    "BadImageError",
    "ImageListDataset",
    "SkipCounter",
    "SkippedSample",
    "draft_decode",
    "drop_skipped",
    "list_images",
    "max_image_pixels",
    "open_image",
    "output_names",
    "read_image",
    "warn_skipped",
]

#: File suffixes (lower case) that :func:`list_images` takes from a folder or as a single image.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")

#: Images (and masks) whose header declares more pixels than this are refused before decoding:
#: Pillow's own warning threshold (``PIL.Image.MAX_IMAGE_PIXELS``, 89,478,485 px, 0.25 GiB as
#: 24-bit RGB), which it only warns about; read as a float tensor such an image takes ~1 GiB, and
#: a worker holds a few. Raise it with the environment variable ``VGGBACKBONE_MAX_IMAGE_PIXELS``
#: (read in every loader process). Pillow still refuses images above twice its own threshold
#: (raise ``PIL.Image.MAX_IMAGE_PIXELS`` as well to go past ~179 Mpx).
MAX_IMAGE_PIXELS = 89_478_485

_MAX_PIXELS_ENV = "VGGBACKBONE_MAX_IMAGE_PIXELS"
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")


def list_images(source: str | Path | Sequence[str | Path]) -> tuple[list[str], list[Path]]:
    """``(names, files)`` of the images in ``source``, in order.

    ``source`` is one of:

    * a folder: searched recursively for :data:`IMAGE_EXTENSIONS`, sorted; names are the paths
      relative to the folder (``sub/x.jpg``). Linked files and folders are followed, never into
      a folder listed already (a loop), and dangling links are listed (reading them fails with
      a reason naming the target): :func:`tasks.walk.walk_files`; skipped links are warned about;
    * a text file with one image path per line: relative paths are relative to the list file's
      folder, blank lines and ``#`` comments are ignored; names are the lines as written (bytes
      that are not UTF-8 read as Python reads such file names, ``surrogateescape``);
    * a single image file (by its suffix): name = the path as given;
    * a sequence of paths: names = the paths as given.

    Raises ``FileNotFoundError`` naming ``source`` when it does not exist and ``ValueError``
    when it holds no image. The files are not opened here (unreadable ones are skipped later).
    """
    if not isinstance(source, (str, Path)):
        names = [str(p) for p in source]
        if not names:
            raise ValueError("no images found: the list of image paths is empty")
        return names, [Path(n) for n in names]
    src = Path(source)
    if src.is_dir():
        walk = walk_files(src, IMAGE_EXTENSIONS)  # links followed, never into a loop (tasks.walk)
        if is_global_zero():
            walk.warn()
        rel = sorted(walk.files)  # as sorted(Path): name by name
        if not rel:
            raise ValueError(f"{src}: no images found in this folder (looked for {', '.join(IMAGE_EXTENSIONS)})")
        return ["/".join(r) for r in rel], [src.joinpath(*r) for r in rel]
    if src.suffix.lower() in IMAGE_EXTENSIONS:
        if not src.is_file():
            raise FileNotFoundError(f"{src}: no such image")
        return [str(source)], [src]
    if src.is_file():
        try:
            lines = src.read_text(errors="surrogateescape").splitlines()  # names as the file system has them
        except OSError as e:
            raise ValueError(f"{src}: cannot read the image list ({e})") from e
        names = [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]
        if not names:
            raise ValueError(f"{src}: no images found: the image list is empty")
        return names, [Path(n) if Path(n).is_absolute() else src.parent / n for n in names]
    raise FileNotFoundError(f"{src}: no such image, folder or image list")


def output_names(names: Sequence[str | Path]) -> list[str]:
    """A distinct, file-name-safe stem per image, to name its outputs (``<stem>.png``...).

    The file stem (``a/x.jpg`` -> ``x``) where it is unique; where stems collide, the path
    without suffix below the colliding files' common folder with ``/`` written ``__``
    (``a/x.jpg``, ``b/x.jpg`` -> ``a__x``, ``b__x``); the position is prefixed if that still
    collides (``x.jpg``, ``x.png`` -> ``0_x``, ``1_x``).
    """
    paths = [Path(n) for n in names]
    stems = [p.stem for p in paths]
    out = list(stems)
    groups: dict[str, list[int]] = {}
    for i, stem in enumerate(stems):
        groups.setdefault(stem, []).append(i)
    for group in (g for g in groups.values() if len(g) > 1):
        try:
            common = os.path.commonpath([str(paths[i].parent) for i in group])
        except ValueError:  # absolute and relative paths mixed
            common = ""
        for i in group:
            rel = paths[i].with_suffix("")
            rel = rel.relative_to(common) if common else rel
            out[i] = "__".join(part for part in rel.parts if part not in (rel.anchor, os.sep, "/"))
    counts = Counter(out)
    out = [f"{i}_{o}" if counts[o] > 1 else o for i, o in enumerate(out)]
    if len(set(out)) != len(out):  # only for names built to defeat the rules above
        out = [f"{i}_{o}" for i, o in enumerate(out)]
    return out


class BadImageError(ValueError):
    """An image that is missing, empty or cannot be decoded. ``str(e)`` starts with the path."""

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


def max_image_pixels() -> int:
    """The pixel limit in force: ``$VGGBACKBONE_MAX_IMAGE_PIXELS`` if set, else :data:`MAX_IMAGE_PIXELS`."""
    env = os.environ.get(_MAX_PIXELS_ENV)
    if env is None or not env.strip():
        return MAX_IMAGE_PIXELS
    try:
        value = int(env)
    except ValueError:
        raise ValueError(f"{_MAX_PIXELS_ENV}={env!r} is not a whole number of pixels") from None
    if value <= 0:
        raise ValueError(f"{_MAX_PIXELS_ENV}={env!r} must be > 0")
    return value


# Pillow raises these for corrupt, truncated or hostile files (struct.error: malformed EXIF).
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, Image.DecompressionBombError)


def draft_decode(img: Image.Image, mode: str, size: tuple[int, int]) -> int:
    """Ask Pillow to decode ``img`` (opened, not yet loaded) at a reduced scale, where that is free.

    For a JPEG, libjpeg's DCT scaling decodes at 1/2, 1/4 or 1/8 of the stored size (Pillow's
    :meth:`~PIL.Image.Image.draft`): the largest reduction that keeps the image at least ``size``
    (``(height, width)``, the size it will be resized to next) on both sides, in its displayed
    orientation (an EXIF rotation by 90 degrees swaps the sides asked for). Other formats, and
    JPEGs less than twice ``size``, decode in full. Returns the reduction (1, 2, 4 or 8).

    Not exact: a draft-decoded image then resized to ``size`` differs from the full decode
    resized to ``size`` by a few grey levels (the DCT scaling is a box-like filter, where the
    resize is an antialiased bilinear one); ``tests/test_draft_decode.py`` bounds it.
    """
    h, w = size
    if img.format != "JPEG" or h <= 0 or w <= 0:
        return 1
    if img.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # EXIF Orientation: transposed by 90 degrees
        h, w = w, h
    stored = img.size
    img.draft(mode if mode in ("RGB", "L") else None, (w, h))
    return round(stored[0] / img.size[0])  # sides are rounded up: 129 / 2 -> 65


@contextmanager
def open_image(
    path: str | Path, draft: tuple[int, int] | None = None, draft_mode: str = "RGB"
) -> Iterator[Image.Image]:
    """Open ``path`` with Pillow, refuse it above the pixel limit, apply its EXIF orientation.

    The size is read from the header, before anything is decoded, so a decompression bomb
    costs nothing; the image is then decoded and turned upright (``ImageOps.exif_transpose``).
    ``draft``: decode a JPEG at a reduced scale no smaller than this ``(height, width)``
    (:func:`draft_decode`, in ``draft_mode``), before the EXIF turn.
    Raises :class:`BadImageError` naming the file when it is missing, empty, corrupt or too large.
    """
    p = Path(path)
    if not p.is_file():
        if p.is_symlink() and not p.exists():
            target = display_path(os.readlink(p))
            raise BadImageError(p, f"dangling symbolic link to {target} (its target does not exist)")
        raise BadImageError(p, "image file not found")
    if p.stat().st_size == 0:
        raise BadImageError(p, "image file is empty")
    limit = max_image_pixels()
    try:
        with warnings.catch_warnings():  # the limit below replaces Pillow's DecompressionBombWarning
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(p)
    except Image.DecompressionBombError as e:  # above twice Pillow's own limit
        raise BadImageError(p, f"too many pixels, refused before decoding ({e})") from e
    except _DECODE_ERRORS as e:
        raise BadImageError(p, f"cannot decode image ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from e
    with img:
        w, h = img.size
        if w * h > limit:
            raise BadImageError(
                p,
                f"image is {w}x{h} = {w * h} pixels, above the limit of {limit} (refused before decoding; "
                f"set {_MAX_PIXELS_ENV} to allow more)",
            )
        try:
            if draft is not None:
                draft_decode(img, draft_mode, draft)
            ImageOps.exif_transpose(img, in_place=True)  # decodes; turns the pixels only if the tag says so
            img.load()
        except _DECODE_ERRORS as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise BadImageError(p, f"cannot decode image ({msg})") from e
        yield img


def _to_8bit(img: Image.Image, path: Path) -> Image.Image:
    """16-bit and 32-bit integer grayscale -> 8-bit ``L`` by the high byte (torchvision's ``to_dtype``
    scaling of uint16 to uint8); float images are refused (no defined range). Others as they are."""
    if img.mode in _SIXTEEN_BIT_MODES or img.mode == "I":
        arr = np.asarray(img)
        if img.mode == "I" and arr.size and (arr.min() < 0 or arr.max() > 65535):
            raise BadImageError(
                path,
                f"32-bit integer pixels in {arr.min()}..{arr.max()}, outside 0..65535: no defined range "
                "(save it as an 8- or 16-bit image)",
            )
        wide = torch.from_numpy(arr.astype(np.uint16))
        return Image.fromarray(TF.to_dtype(wide, torch.uint8, scale=True).numpy(), mode="L")
    if img.mode == "F":
        raise BadImageError(path, "32-bit float pixels have no defined range (save it as an 8- or 16-bit image)")
    return img


def read_image(path: str | Path, mode: str = "RGB", draft: tuple[int, int] | None = None) -> torch.Tensor:
    """Decode ``path`` to a ``(C, H, W)`` uint8 tensor (``mode`` is a PIL mode: RGB, L, ...).

    ``draft``: the ``(height, width)`` the caller resizes the image to next; a JPEG at least
    twice that size is then decoded at 1/2, 1/4 or 1/8 scale (:func:`draft_decode`: faster on
    large photos, approximately the same after the resize), never below ``draft``.

    The image is read as displayed (EXIF orientation applied); 16-bit images are scaled to 8
    bits (their high byte), not clipped (see the module docstring). Raises
    :class:`BadImageError` naming the file for a missing, empty, truncated, corrupt or too large
    image, or one whose pixels have no defined range. Decoding goes through Pillow: torchvision's
    own decoders are deprecated since 0.29 (superseded by TorchCodec, which is not a dependency
    here) and Pillow reads every format the datasets use.
    """
    p = Path(path)
    with open_image(p, draft, mode) as img:
        try:
            arr = np.asarray(_to_8bit(img, p).convert(mode))
        except _DECODE_ERRORS as e:
            if isinstance(e, BadImageError):
                raise
            raise BadImageError(p, f"cannot decode image ({str(e).splitlines()[0]})") from e
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(np.require(arr.transpose(2, 0, 1), requirements=["C", "W"]))  # a writable copy if needed


class ImageListDataset(Dataset):
    """The one dataset of listed images: whatever :func:`list_images` takes (a folder searched
    recursively, one image, a text file of paths, or a sequence of paths), read by :func:`read_image`.

    Items are ``{"image": (C, H, W), "index": i, "id": ids[i], "name": out_name, "path": str,
    "label": labels[i]}``, or a :class:`SkippedSample` for an unreadable file; ``item`` (when
    given) shapes both for a task's collate function.

    Args:
        source: the images.
        ids: an id per image (default: the positions in the list); ``"names"``: the output names.
        transform: applied to the uint8 image (``transforms.v2``: a plain tensor is an image).
        indices: restricts the dataset to those positions of the list (``index`` keeps the
            position in the full list).
        labels: a class index per image (a classification split; default ``-1``: unlabelled).
        mode: the Pillow mode images are read in (``RGB``; ``L`` for grayscale).
        draft: ``(height, width)``: JPEGs decoded at the smallest DCT scale still at least this
            size (:func:`draft_decode`).
        item: ``item(index, sample)`` -> what the dataset returns (``sample``: the dict above or
            a :class:`SkippedSample`), e.g. a detector's ``(image, target)``.

    ``name`` is :func:`output_names`' distinct stem, which names a task's outputs. The old
    datasets of the tasks (``tasks.data.classify.ImageFolderDataset`` and ``ImageFiles``,
    ``tasks.data.detection.ImageFolderDataset``, ``tasks.data.segmentation.ImageList``) are this
    one, configured (their old names still work).
    """

    def __init__(
        self,
        source: str | Path | Sequence[str | Path],
        ids: Sequence[Any] | str | None = None,
        transform: Any = None,
        indices: Sequence[int] | None = None,
        *,
        labels: Sequence[int] | None = None,
        mode: str = "RGB",
        draft: tuple[int, int] | None = None,
        item: Callable[[int, dict[str, Any] | SkippedSample], Any] | None = None,
    ) -> None:
        names, self.paths = list_images(source)
        self.names = output_names(names)
        if isinstance(ids, str):
            if ids != "names":
                raise ValueError(f"ids must be a sequence or 'names', got {ids!r}")
            ids = self.names
        self.ids = list(ids) if ids is not None else list(range(len(self.paths)))
        self.labels = [int(v) for v in labels] if labels is not None else [-1] * len(self.paths)
        if len(self.ids) != len(self.paths) or len(self.labels) != len(self.paths):
            raise ValueError(f"{len(self.ids)} ids and {len(self.labels)} labels for {len(self.paths)} images")
        self.transform, self.mode, self.draft, self.item = transform, mode, draft, item
        self.indices = list(range(len(self.paths))) if indices is None else [int(i) for i in indices]

    @property
    def samples(self) -> list[tuple[str, int]]:
        """``(path, label)`` of every image, as torchvision's ``ImageFolder.samples``."""
        return [(str(p), label) for p, label in zip(self.paths, self.labels)]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Any:
        index = self.indices[i]
        path = self.paths[index]
        sample: dict[str, Any] | SkippedSample
        try:
            image = read_image(path, self.mode, draft=self.draft)
        except BadImageError as e:
            sample = SkippedSample(e.path, e.reason)
        else:
            if self.transform is not None:
                image = self.transform(image)
            sample = {"image": image, "index": index, "id": self.ids[index], "name": self.names[index],
                      "path": str(path), "label": self.labels[index]}  # fmt: skip
        return self.item(index, sample) if self.item is not None else sample
