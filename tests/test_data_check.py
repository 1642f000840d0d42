"""``python -m tasks.data check``: broken trees (detection, segmentation, ReID) with their exact counts and a
non-zero exit, a clean tree with exit 0, the JSON output parsed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from tasks.data.__main__ import main


def _png(path: Path, size=(40, 40), mode="RGB", value=0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value).save(path)


def _write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text) if isinstance(text, bytes) else path.write_text(text)
    return path


def _config(path: Path, family: str, data: dict) -> Path:
    return _write(path, yaml.safe_dump({"model": {"family": family}, "data": data}))


def _run(capsys, *args: str) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(["check", *args])
    return exit_info.value.code, capsys.readouterr().out


def _yolo_tree(root: Path) -> Path:
    _png(root / "images/train/a.png", (100, 50))
    _write(root / "labels/train/a.txt", "0 0.5 0.5 0.2 0.4\n5 0.5 0.5 0.1 0.1\n0 0.5 0.5 0.0 0.2\n")
    _png(root / "images/train/b.png")  # no label file
    _write(root / "images/train/c.png", b"not an image")
    _write(root / "labels/train/c.txt", "1 0.5 0.5 0.2 0.2\n")
    _png(root / "images/train/d.png")
    _write(root / "labels/train/d.txt", "1 0.5 1.5 0.2 0.2\n1 0.5 0.5 0.5 0.5\n")
    _png(root / "images/val/e.png", (20, 20))
    _write(root / "labels/val/e.txt", "0 0.5 0.5 0.5 0.5\n")
    return _write(root / "data.yaml", "train: images/train\nval: images/val\nnames: [cat, dog]\n")


def test_check_counts_every_fault_of_a_broken_yolo_tree(tmp_path, capsys) -> None:
    cfg = _config(tmp_path / "c.yaml", "fasterrcnn", {"root": str(_yolo_tree(tmp_path / "yolo")), "layout": "yolo"})
    code, out = _run(capsys, "--config", str(cfg), "--json")
    assert code == 1
    result = json.loads(out)
    train, val = result["splits"]
    assert result["ok"] is False and train["failed"] and not val["failed"]
    assert train["images"] == 4 and train["per_class"] == {"cat": 1, "dog": 1}
    assert train["counts"] == {
        "unreadable files": 1,
        "labels outside the classes": 1,
        "bad label lines": 1,
        "images without labels": 1,
        "boxes dropped (zero/negative size or outside the image)": 1,
        "duplicate ids": 0,
    }
    assert train["examples"]["labels outside the classes"][0].endswith(
        "a.txt:2: class '5' is not one of the 2 class indices 0..1"
    )
    assert "d.txt:1: value(s) ['1.5'] outside [0, 1]" in train["examples"]["bad label lines"][0]
    assert "c.png" in train["examples"]["unreadable files"][0]
    assert train["examples"]["images without labels"] == [str(tmp_path / "yolo/images/train/b.png")]
    assert any("a.txt:3" in note for note in train["notes"])  # the dropped box named by the reader
    assert val["images"] == 1 and val["per_class"] == {"cat": 1, "dog": 0} and sum(val["counts"].values()) == 0


def test_check_passes_a_clean_tree_and_prints_plain_lines(tmp_path, capsys) -> None:
    root = tmp_path / "yolo"
    _png(root / "images/train/a.png", (20, 20))
    _write(root / "labels/train/a.txt", "1 0.5 0.5 0.5 0.5\n")
    _write(root / "data.yaml", "train: images/train\nval: images/train\nnames: {0: cat, 1: dog}\n")
    cfg = _config(tmp_path / "configs/detect/mine.yaml", "ssd", {"root": str(root), "layout": "yolo"})
    code, out = _run(capsys, "--config", str(cfg), "--decode")
    assert code == 0, out
    assert "detect train (train): ok" in out and "  images: 1" in out and "  dog: 1" in out
    assert out.rstrip().endswith("check: every split ok")


def _voc_segmentation(root: Path) -> None:
    mask = np.zeros((4, 4), np.uint8)
    mask[0, :] = 1
    mask[1, :2] = 2
    mask[3, :2] = 255  # 8 background, 4 of class 1, 2 of class 2, 2 ignored
    for sid in ("s1", "s2", "s3", "s5"):
        _png(root / f"JPEGImages/{sid}.jpg", (4, 4))
    (root / "SegmentationClass").mkdir()
    Image.fromarray(mask, "L").save(root / "SegmentationClass/s1.png")
    Image.fromarray(mask[:, :3].copy(), "L").save(root / "SegmentationClass/s2.png")  # 3 wide: size mismatch
    Image.fromarray(np.full((4, 4), 7, np.uint8), "L").save(root / "SegmentationClass/s3.png")  # class 7 of 3
    _write(root / "JPEGImages/s4.jpg", b"\xff\xd8 truncated")
    Image.fromarray(mask, "L").save(root / "SegmentationClass/s4.png")
    _write(root / "ImageSets/Segmentation/train.txt", "s1\ns2\ns3\ns4\ns5\n")  # s5: no mask
    _write(root / "ImageSets/Segmentation/val.txt", "s1\n")


def test_check_counts_every_fault_of_a_broken_segmentation_tree(tmp_path, capsys) -> None:
    _voc_segmentation(tmp_path / "VOC")
    data = {"root": str(tmp_path / "VOC"), "layout": "voc", "classes": ["background", "road", "car"]}
    code, out = _run(capsys, "--config", str(_config(tmp_path / "c.yaml", "fcn8s", data)), "--json")
    train, val = json.loads(out)["splits"]
    assert code == 1 and train["failed"] and not val["failed"]
    assert train["images"] == 5 and train["per_class"] == {"background": 8, "road": 4, "car": 2}
    assert train["info"] == {"ignored pixels (value 255)": 2}
    assert train["counts"] == {
        "unreadable files": 1,
        "labels outside the classes": 1,
        "images without labels": 1,
        "mask/image size mismatches": 1,
        "duplicate ids": 0,
    }
    assert "s2.png" in train["examples"]["mask/image size mismatches"][0]
    assert "s3.png" in train["examples"]["labels outside the classes"][0]
    assert val["per_class"] == {"background": 8, "road": 4, "car": 2}


def test_check_counts_every_fault_of_a_broken_reid_split(tmp_path, capsys) -> None:
    for name in ("a", "q1", "q2", "g1", "g2"):
        _png(tmp_path / f"{name}.jpg", (8, 16))
    _write(tmp_path / "b.jpg", b"")
    _write(tmp_path / "train.csv", "path,pid,camid\na.jpg,1,0\na.jpg,1,0\nb.jpg,2,1\n")
    _write(tmp_path / "query.csv", "path,pid,camid\nq1.jpg,1,0\nq2.jpg,9,1\n")
    _write(tmp_path / "gallery.csv", "path,pid,camid\ng1.jpg,1,1\ng2.jpg,3,0\n")
    data = {"layout": "csv", **{f"{s}_csv": str(tmp_path / f"{s}.csv") for s in ("train", "query", "gallery")}}
    code, out = _run(capsys, "--config", str(_config(tmp_path / "c.yaml", "reid_vgg", data)), "--json")
    train, query, gallery = json.loads(out)["splits"]
    assert code == 1 and train["failed"] and not query["failed"] and not gallery["failed"]
    assert train["images"] == 3 and train["info"] == {"identities": 2, "cameras (0-based)": "2: [0, 1]"}
    assert train["counts"] == {"unreadable files": 1, "duplicate ids": 1}
    assert train["examples"]["duplicate ids"] == [f"image {tmp_path / 'a.jpg'} x2"]
    assert query["counts"] == {"unreadable files": 0, "duplicate ids": 0, "query identities without a gallery image": 1}
    assert query["examples"]["query identities without a gallery image"] == ["[9]"]
    assert gallery["info"] == {"identities": 2, "cameras (0-based)": "2: [0, 1]"}


def test_check_refuses_a_config_it_cannot_place(tmp_path, capsys) -> None:
    cfg = _write(tmp_path / "c.yaml", "data:\n  root: x\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["check", "--config", str(cfg)])
    assert exit_info.value.code == 2 and "cannot tell the task" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["check", "--config", str(_config(tmp_path / "d.yaml", "fasterrcnn", {"no_such_option": 1}))])
    assert exit_info.value.code == 2 and "no_such_option" in capsys.readouterr().err


def test_rich_tables_in_a_terminal_name_the_errors() -> None:
    import io

    from tasks.data.check_report import SplitReport, render

    report = SplitReport("reid", "train", source="x.csv", images=3)
    report.add("unreadable files", "b.jpg: image file is empty")
    report.counts["duplicate ids"] += 0
    out = io.StringIO()
    render([report], out, rich=True)
    text = out.getvalue()
    assert "reid train: FAILED" in text and "ERROR unreadable files" in text
    assert "1 (e.g. b.jpg: image file is empty)" in text and "check: FAILED: reid train" in text


def test_check_counts_the_faults_of_an_image_folder_tree(tmp_path, capsys) -> None:
    for rel in ("train/cat/1.png", "train/cat/2.png", "train/dog/3.png", "val/cat/4.png", "val/dog/5.png"):
        _png(tmp_path / "digits" / rel, (8, 8))
    _write(tmp_path / "digits/train/dog/6.png", b"")
    data = {"root": str(tmp_path / "digits"), "train_split": "train", "val_split": "val", "test_split": "val"}
    code, out = _run(capsys, "--config", str(_config(tmp_path / "c.yaml", "vgg", data)), "--json")
    train, val = json.loads(out)["splits"]
    assert code == 1 and train["failed"] and not val["failed"]
    assert train["images"] == 4 and train["per_class"] == {"cat": 2, "dog": 2}
    assert train["counts"] == {"unreadable files": 1, "labels outside the classes": 0, "images without labels": 0,
                               "duplicate ids": 0}  # fmt: skip
    assert "6.png: image file is empty" in train["examples"]["unreadable files"][0]
    assert val["images"] == 2 and val["per_class"] == {"cat": 1, "dog": 1}
