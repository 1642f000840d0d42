"""The YOLO detection layout: hand-written trees read exactly, errors naming file:line, a CLI fit step, YOLO txt out."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_configs import fasterrcnn_fpn_model, quick_trainer, write_config
from PIL import Image

from tasks.data.detection import DetectionDataModule
from tasks.data.yolo import read_yolo, read_yolo_config, yolo_label_path


def _image(path: Path, size: tuple[int, int], color=(40, 40, 40), box=None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", size, color)
    if box is not None:
        img.paste((220, 30, 30), box)
    img.save(path)


def _label(root: Path, rel: str, text: str) -> None:
    path = root / "labels" / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _tree(root: Path, names: str = "names: [cat, dog]\n") -> Path:
    """train: a.png 100x50 (a box and a polygon), b.png 40x40 (empty label file), c.png 20x10 (no label file)."""
    _image(root / "images" / "train" / "a.png", (100, 50))
    _image(root / "images" / "train" / "b.png", (40, 40))
    _image(root / "images" / "train" / "c.png", (20, 10))
    _label(root, "train/a.txt", "0 0.5 0.5 0.2 0.4\n\n1 0.1 0.2 0.3 0.2 0.25 0.6\n")
    _label(root, "train/b.txt", "")
    (root / "data.yaml").write_text(f"path: .\ntrain: images/train\nval: images/train\n{names}")
    return root / "data.yaml"


def test_yolo_lines_become_exact_pixel_boxes(tmp_path) -> None:
    with pytest.warns(UserWarning, match=r"1 image\(s\) without a label file and 1 with an empty one"):
        split = read_yolo(_tree(tmp_path), "train")
    assert split.classes == ["cat", "dog"] and split.category_ids == [1, 2] and split.layout == "yolo"
    a, b, c = split.records
    assert [r.path.name for r in split.records] == ["a.png", "b.png", "c.png"]
    assert [(r.width, r.height, r.image_id) for r in split.records] == [(100, 50, 0), (40, 40, 1), (20, 10, 2)]
    # 0 0.5 0.5 0.2 0.4 on 100x50 -> [40, 15, 60, 35]; the polygon (0.1,0.2) (0.3,0.2) (0.25,0.6) -> [10, 10, 30, 30]
    np.testing.assert_allclose(a.boxes, [[40, 15, 60, 35], [10, 10, 30, 30]], atol=1e-4)
    assert a.labels.tolist() == [1, 2] and a.ignore.tolist() == [False, False]
    np.testing.assert_allclose(a.area, [400, 400], atol=1e-3)
    assert b.boxes.shape == (0, 4) and c.boxes.shape == (0, 4) and c.labels.tolist() == []


def test_names_as_a_dict_and_label_paths(tmp_path) -> None:
    cfg = read_yolo_config(_tree(tmp_path, "names:\n  1: dog\n  0: cat\n"))
    assert cfg.names == ["cat", "dog"] and cfg.splits["train"] == [tmp_path / "images/train"]
    assert yolo_label_path(Path("/d/images/x/images/val/p.q.jpg")) == Path("/d/images/x/labels/val/p.q.txt")
    (tmp_path / "data.yaml").write_text("train: images/train\nnames: {0: cat, 2: dog}\n")
    with pytest.raises(ValueError, match=r"keys of 'names' must be the class indices 0\.\.1, got \[0, 2\]"):
        read_yolo_config(tmp_path)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("2 0.5 0.5 0.1 0.1", r"a\.txt:2: class '2' is not one of the 2 class indices 0\.\.1"),
        ("0 0.5 1.5 0.1 0.1", r"a\.txt:2: value\(s\) \['1\.5'\] outside \[0, 1\]"),
        ("0 0.5 0.5 0.1", r"a\.txt:2: 4 values"),
        ("0 0.5 0.5 -0.1 0.1", r"a\.txt:2: value\(s\) \['-0\.1'\] outside"),
    ],
)
def test_bad_lines_are_errors_naming_file_and_line(tmp_path, line, message) -> None:
    cfg = _tree(tmp_path)
    _label(tmp_path, "train/a.txt", f"0 0.5 0.5 0.2 0.4\n{line}\n")
    with pytest.raises(ValueError, match=message):
        read_yolo(cfg, "train")


def test_data_module_reads_yolo_and_refuses_other_classes(tmp_path) -> None:
    _tree(tmp_path)
    dm = DetectionDataModule(root=str(tmp_path), layout="yolo", num_workers=0)
    assert dm.classes == ["cat", "dog"] and dm.category_ids == [1, 2]
    with pytest.warns(UserWarning, match="without a label file"):
        assert len(dm.split("train").records) == 3
    dm = DetectionDataModule(root=str(tmp_path / "data.yaml"), layout="yolo", classes=["dog", "cat"], num_workers=0)
    with pytest.warns(UserWarning), pytest.raises(ValueError, match=r"categories \['cat', 'dog'\] differ"):
        dm.split("train")


def _fit_tree(root: Path) -> Path:
    """4 training and 2 validation 64x64 images, each with one red square."""
    for split, n in (("train", 4), ("val", 2)):
        for k in range(n):
            x = 8 + 8 * k
            _image(root / "images" / split / f"{k}.png", (64, 64), box=(x, 16, x + 24, 40))
            _label(root, f"{split}/{k}.txt", f"{k % 2} {(x + 12) / 64} 0.4375 0.375 0.375\n")
    (root / "data.yaml").write_text("train: images/train\nval: images/val\nnames: [square, box]\n")
    return root


def test_detect_fit_and_predict_yolo_txt_on_a_yolo_tree(tmp_path) -> None:
    from tasks.detect import main

    root = _fit_tree(tmp_path / "yolo")
    cfg = {
        "seed_everything": 0,
        "trainer": quick_trainer(tmp_path, limit_train_batches=1, limit_val_batches=1),
        "model": fasterrcnn_fpn_model(width_mult=0.125, warmup_steps=1),
        "data": {"root": str(root), "layout": "yolo", "batch_size": 2, "eval_batch_size": 2, "num_workers": 0},
        "writer": {"output_dir": str(tmp_path / "pred"), "yolo_txt": True, "draw": False, "score_threshold": 0.0},
    }
    path = write_config(cfg, tmp_path / "detect.yaml")
    main(["fit", "--config", str(path)])
    last = next((tmp_path / "runs").rglob("last.ckpt"))
    ckpt = torch.load(last, map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 1 and ckpt["hyper_parameters"]["classes"] == ["square", "box"]
    main(["predict", "--config", str(path), "--ckpt_path", str(last)])
    out = tmp_path / "pred"
    images = {i["id"]: i for i in json.loads((out / "images.json").read_text())}
    expected: dict[str, list[list[float]]] = {Path(i["file_name"]).stem: [] for i in images.values()}
    for d in json.loads((out / "detections.json").read_text()):  # COCO results: bbox xywh (rounded) in pixels
        img = images[d["image_id"]]
        x, y, w, h = d["bbox"]
        W, H = img["width"], img["height"]
        row = [d["category_id"] - 1, (x + w / 2) / W, (y + h / 2) / H, w / W, h / H]
        expected[Path(img["file_name"]).stem].append(row)
    assert sorted(expected) == ["0", "1"] and sum(map(len, expected.values())) > 0
    for stem, rows in expected.items():
        lines = (out / "labels" / f"{stem}.txt").read_text().splitlines()
        got = [[float(v) for v in line.split()] for line in lines]
        assert [r[0] for r in got] == [r[0] for r in rows] and all(len(line.split()) == 5 for line in lines)
        np.testing.assert_allclose(np.array(got).reshape(-1, 5), np.array(rows).reshape(-1, 5), atol=2e-4)
    manifest = json.loads((out / "_MANIFEST.json").read_text())
    assert {"labels/0.txt", "labels/1.txt"} <= set(manifest["files"])


def test_yolo_txt_lines_of_a_literal_prediction(tmp_path) -> None:
    from tasks.data.detection import DetectionBatch
    from tasks.detect_writer import DetectionWriter

    writer = DetectionWriter(output_dir=str(tmp_path / "pred"), score_threshold=0.5, draw=False, yolo_txt=True)
    writer.outputs.begin()
    pred = {"image_id": 3, "path": "in/cat.jpg", "out_name": "cat",
            "boxes": np.array([[10, 20, 30, 60], [0, 0, 5, 5]], np.float32),
            "scores": np.array([0.9, 0.2], np.float32), "labels": np.array([2, 1])}  # fmt: skip
    writer.write_batch(None, [pred], DetectionBatch([torch.zeros(3, 80, 40)], [{}], []))
    writer.outputs.close()
    # (10+30)/2/40 = 0.5, (20+60)/2/80 = 0.5, 20/40 = 0.5, 40/80 = 0.5; the 0.2-score box is below the threshold
    assert (tmp_path / "pred" / "labels" / "cat.txt").read_text() == "1 0.500000 0.500000 0.500000 0.500000\n"
