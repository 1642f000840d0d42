"""``layout: ade20k``: the ADE20K scene-parsing benchmark (``ADEChallengeData2016``), a preset of
:mod:`tasks.data.folders`.

The tree of the release (``ADEChallengeData2016.zip``, MIT Scene Parsing)::

    <root>/images/{training,validation}/ADE_train_00000001.jpg
    <root>/annotations/{training,validation}/ADE_train_00000001.png

``<root>`` is ``ADEChallengeData2016`` or the folder holding it; the splits are ``training`` and
``validation``. Mask values are 0 ("other objects", not evaluated) and 1..150; as in the
benchmark's own evaluation and mmseg's ``reduce_zero_label``, 0 becomes ``data.ignore_index`` and
``k`` becomes ``k - 1`` (:func:`ade20k_label_map`); any other value is an error. The class names
are the benchmark's 150 (``objectInfo150``'s first name of each, as mmseg lists them).
"""

from __future__ import annotations

from pathlib import Path

from tasks.data.folders import FolderLayout
from tasks.data.masks import IGNORE_INDEX

__all__ = ["ADE20K_CLASSES", "ADE20K_FOLDERS", "ade20k_label_map", "ade20k_root"]

#: The 150 classes in training-id order (raw value ``k + 1``).
ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand",
    "path", "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove",
    "palm", "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
    "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle",
    "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything",
    "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven",
    "ball", "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake",
    "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray",
    "ashcan", "fan", "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator",
    "glass", "clock", "flag",
)  # fmt: skip

#: Where the images and annotations are and how they are named.
ADE20K_FOLDERS = FolderLayout(
    image_dir="images/{split}", mask_dir="annotations/{split}", image_suffix=".jpg", mask_suffix=".png"
)

#: The release's folder name, looked for below ``data.root``.
ADE20K_DIR = "ADEChallengeData2016"


def ade20k_label_map(ignore_index: int = IGNORE_INDEX) -> dict[int, int]:
    """Raw 0 -> ``ignore_index``, raw ``k`` (1..150) -> ``k - 1``."""
    return {0: ignore_index, **{k: k - 1 for k in range(1, len(ADE20K_CLASSES) + 1)}}


def ade20k_root(root: str | Path) -> Path:
    """``root`` itself when it holds ``images/``, else ``root/ADEChallengeData2016``."""
    root = Path(root)
    return root if (root / "images").is_dir() else root / ADE20K_DIR
