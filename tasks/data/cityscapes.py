"""``layout: cityscapes``: Cityscapes' fine annotations, a preset of :mod:`tasks.data.folders`.

The tree of the official release (``leftImg8bit_trainvaltest.zip`` + ``gtFine_trainvaltest.zip``)::

    <root>/leftImg8bit/{train,val,test}/<city>/<city>_<seq>_<frame>_leftImg8bit.png
    <root>/gtFine/{train,val,test}/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png

The masks read are the ``*_gtFine_labelIds.png`` (the 34 label ids of ``cityscapesscripts/helpers/
labels.py``), mapped to the 19 training ids of that same table (:data:`CITYSCAPES_LABEL_MAP`:
road 7 -> 0 ... bicycle 33 -> 18); the 15 ids whose ``trainId`` is 255 (unlabeled, ego vehicle,
parking, rail track, guard rail, caravan, trailer...) become ``data.ignore_index``. Any other raw
value is an error (``data.unlisted``). The other files of ``gtFine`` (``_color.png``,
``_instanceIds.png``, ``_polygons.json``) are left out and counted. Masks already in training ids
(``*_labelTrainIds.png`` of ``createTrainIdLabelImgs.py``) are read with ``layout: folders``.
"""

from __future__ import annotations

from tasks.data.folders import FolderLayout
from tasks.data.masks import IGNORE_INDEX

__all__ = ["CITYSCAPES_CLASSES", "CITYSCAPES_FOLDERS", "CITYSCAPES_TRAIN_IDS", "cityscapes_label_map"]

#: The 19 evaluated classes in training-id order (``cityscapesscripts`` ``labels.py``).
CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)  # fmt: skip

#: label id -> training id of ``labels.py`` for the 34 ids 0..33 (``None``: trainId 255, ignored).
CITYSCAPES_TRAIN_IDS: dict[int, int | None] = {
    0: None, 1: None, 2: None, 3: None, 4: None, 5: None, 6: None,  # unlabeled .. ground
    7: 0, 8: 1, 9: None, 10: None, 11: 2, 12: 3, 13: 4,  # road, sidewalk, parking, rail track, building, wall, fence
    14: None, 15: None, 16: None, 17: 5, 18: None,  # guard rail, bridge, tunnel, pole, polegroup
    19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15,  # traffic light .. bus
    29: None, 30: None, 31: 16, 32: 17, 33: 18,  # caravan, trailer, train, motorcycle, bicycle
}  # fmt: skip

#: Where the fine annotations are and how images and masks are named.
CITYSCAPES_FOLDERS = FolderLayout(
    image_dir="leftImg8bit/{split}",
    mask_dir="gtFine/{split}",
    image_suffix="_leftImg8bit.png",
    mask_suffix="_gtFine_labelIds.png",
)


def cityscapes_label_map(ignore_index: int = IGNORE_INDEX) -> dict[int, int]:
    """The 34 label ids -> the 19 training ids, the rest -> ``ignore_index``."""
    return {raw: ignore_index if train is None else train for raw, train in CITYSCAPES_TRAIN_IDS.items()}
