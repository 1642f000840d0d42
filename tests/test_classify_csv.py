"""Classification ``layout: csv``: ``path,label`` rows with class names or indices."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tasks.data.classify import ClassificationDataModule


def _tree(root: Path, rows: str, name: str = "train.csv") -> None:
    (root / "img").mkdir(parents=True, exist_ok=True)
    for k in range(3):
        Image.fromarray(np.full((8, 8, 3), 60 * k, np.uint8)).save(root / f"img/{k}.png")
    (root / name).write_text(rows)


def _dm(root: Path, **kw: object) -> ClassificationDataModule:
    return ClassificationDataModule(str(root), layout="csv", image_size=8, resize_size=8, num_workers=0, **kw)


def test_csv_by_names_sorted_classes(tmp_path: Path, capsys) -> None:
    _tree(tmp_path, "path,label,note\nimg/0.png,dog,x\nimg/1.png,cat,y\nimg/2.png,dog,z\n")
    dm = _dm(tmp_path)
    assert dm.classes == ["cat", "dog"] and dm.class_source == f"the sorted label names of {tmp_path / 'train.csv'}"
    assert "2 classes, the sorted label names of" in capsys.readouterr().out
    ds = dm.dataset("train")
    assert ds.labels == [1, 0, 1] and [Path(p).name for p in ds.paths] == ["0.png", "1.png", "2.png"]
    assert ds[1]["label"] == 0 and tuple(ds[1]["image"].shape) == (3, 8, 8)


def test_csv_by_indices_needs_classes_and_checks_the_range(tmp_path: Path) -> None:
    _tree(tmp_path, "path,label\nimg/0.png,1\nimg/1.png,0\n")
    with pytest.raises(ValueError, match=r"train\.csv:2: label '1' is an index, and index labels need data.classes"):
        _dm(tmp_path)
    dm = _dm(tmp_path, classes=["cat", "dog"])
    assert dm.dataset("train").labels == [1, 0]
    (tmp_path / "val.csv").write_text("path,label\nimg/2.png,dog\nimg/0.png,2\n")
    with pytest.raises(ValueError, match=r"val\.csv:3: label index 2 outside 0\.\.1 \(data\.classes\)"):
        dm.dataset("val")
    (tmp_path / "val.csv").write_text("path,label\nimg/2.png,cow\n")
    with pytest.raises(ValueError, match=r"val\.csv:2: label 'cow' is not among the classes \['cat', 'dog'\]"):
        dm.dataset("val")
    (tmp_path / "val.csv").write_text("path,label\nimg/9.png,dog\n")
    with pytest.raises(FileNotFoundError, match=r"val\.csv:2: image img/9\.png not found"):
        dm.dataset("val")
    (tmp_path / "val.csv").write_text("file,class\nimg/2.png,dog\n")
    with pytest.raises(ValueError, match=r"val\.csv:1: the header row must name the columns path and label"):
        dm.dataset("val")
