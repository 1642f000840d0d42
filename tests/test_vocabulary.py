"""One vocabulary: ``data.synthetic`` for every demo generator, one list of VOC's 20 classes, one image-list
dataset; the old keys and names still work and warn once."""

from __future__ import annotations

import ast
import warnings
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

import tasks.deprecation
from tasks.data.digits import DigitsConfig
from tasks.data.shapes import ShapesConfig
from tasks.deprecation import RenamedOptionWarning
from tasks.images import ImageListDataset

REPO = Path(__file__).resolve().parents[1]
SHAPES = ShapesConfig(num_train=1, num_val=1)


@pytest.fixture(autouse=True)
def _fresh_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tasks.deprecation, "_warned", set())  # as in a fresh process


def test_every_demo_generator_is_data_synthetic_and_the_old_keys_warn_once(tmp_path: Path) -> None:
    from tasks.data.classify import ClassificationDataModule
    from tasks.data.detection import DetectionDataModule
    from tasks.data.segmentation import SegmentationDataModule

    for module, old, cfg in (
        (DetectionDataModule, "shapes", SHAPES),
        (SegmentationDataModule, "shapes", SHAPES),
        (ClassificationDataModule, "digits", DigitsConfig()),
    ):
        tasks.deprecation._warned.clear()  # ("data", "shapes") is one key for detection and segmentation
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the new key: no warning
            assert module(root=str(tmp_path), synthetic=cfg).synthetic == cfg
        with pytest.warns(RenamedOptionWarning, match=rf"data: option '{old}' is renamed 'synthetic'"):
            dm = module(root=str(tmp_path), **{old: cfg})
        assert dm.synthetic == cfg and getattr(dm, old) == cfg
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # once per process
            module(root=str(tmp_path), **{old: cfg})
        with pytest.raises(ValueError, match=f"{old} is the old name of synthetic; give only synthetic"):
            module(root=str(tmp_path), **{old: cfg, "synthetic": cfg})


def test_shipped_demo_configs_use_the_new_keys() -> None:
    for path in sorted((REPO / "configs").glob("*/*.yaml")):
        cfg = yaml.safe_load(path.read_text())
        data, model = cfg.get("data") or {}, cfg.get("model") or {}
        assert not {"shapes", "digits"} & set(data), path
        assert not {"predict_dir", "predict_file"} & set(model), path
        assert "output_dir" in (cfg.get("writer") or {}), path  # every task's predict output: writer.output_dir
    for task in ("detect", "segment", "reid", "classify"):
        assert "synthetic" in yaml.safe_load((REPO / "configs" / task / "demo.yaml").read_text())["data"]


def test_a_generator_pointed_at_ones_own_folder_names_data_synthetic(tmp_path: Path) -> None:
    from tasks.data._build import GeneratedFolderError
    from tasks.data.digits import ensure_digits
    from tasks.data.shapes import ensure_shapes

    (tmp_path / "mine.txt").write_text("my file")
    for ensure, cfg in ((ensure_shapes, SHAPES), (ensure_digits, DigitsConfig())):
        with pytest.raises(GeneratedFolderError, match=r"drop `data\.synthetic` from the config"):
            ensure(tmp_path, cfg, progress=False)
    assert (tmp_path / "mine.txt").read_text() == "my file"


def test_one_list_of_the_20_voc_classes() -> None:
    from tasks.data.voc import VOC_CLASSES, VOC_SEGMENTATION_CLASSES

    assert len(VOC_CLASSES) == 20 and ("background", *VOC_CLASSES) == VOC_SEGMENTATION_CLASSES
    import tasks.data.segmentation

    with pytest.warns(RenamedOptionWarning, match=r"VOC_CLASSES is renamed tasks\.data\.voc\.VOC_SEGMENTATION_CLASSES"):
        assert tasks.data.segmentation.VOC_CLASSES is VOC_SEGMENTATION_CLASSES
    # nowhere else is the list written out: no other tuple or list literal of "aeroplane" ... "tvmonitor"
    holders = []
    for path in [
        *(REPO / "tasks").rglob("*.py"),
        *(REPO / "vggbackbone").rglob("*.py"),
        *(REPO / "tests").rglob("*.py"),
    ]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Tuple, ast.List)) and any(
                isinstance(e, ast.Constant) and e.value == "tvmonitor" for e in node.elts
            ):
                holders.append(path.relative_to(REPO).as_posix())
    assert holders == ["tasks/data/voc.py"]


def _images(folder: Path) -> Path:
    rng = np.random.default_rng(0)
    for rel in ("cat/a.png", "cat/sub/b.png", "dog/c.png"):
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (12, 10, 3), dtype=np.uint8)).save(folder / rel)
    return folder


def test_one_image_list_dataset_behind_the_old_names(tmp_path: Path) -> None:
    import tasks.data.classify as classify
    import tasks.data.detection as detection
    import tasks.data.segmentation as segmentation

    root = _images(tmp_path / "split")
    with pytest.warns(RenamedOptionWarning, match="ImageFolderDataset is renamed image_folder_split"):
        labelled = classify.ImageFolderDataset(root, ["cat", "dog"], in_channels=1)
    assert isinstance(labelled, ImageListDataset)
    assert [(Path(p).relative_to(root).as_posix(), y) for p, y in labelled.samples] == [
        ("cat/a.png", 0), ("cat/sub/b.png", 0), ("dog/c.png", 1)
    ]  # fmt: skip
    assert labelled[2]["image"].shape == (1, 12, 10) and labelled[2]["label"] == 1
    with pytest.warns(RenamedOptionWarning, match="ImageFiles is renamed unlabelled_images"):
        assert classify.ImageFiles(root)[0]["label"] == -1
    with pytest.warns(RenamedOptionWarning, match="ImageList is renamed segmentation_images"):
        seg = segmentation.ImageList(root)
    assert isinstance(seg, ImageListDataset) and seg.ids == ["a", "b", "c"] and seg[1]["id"] == "b"
    with pytest.warns(RenamedOptionWarning, match="ImageFolderDataset is renamed detection_images"):
        det = detection.ImageFolderDataset(root, ids=[7, 8, 9])
    image, target = det[2]
    assert isinstance(det, ImageListDataset) and image.dtype.is_floating_point and float(image.max()) <= 1.0
    assert target["image_id"] == 9 and target["out_name"] == "c" and target["size"] == (12, 10)
