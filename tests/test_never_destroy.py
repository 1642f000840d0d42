"""The project never deletes or overwrites a file it did not write, and never calls a run that read nothing done.

* demo generators (``data.synthetic`` of every task, ``python -m tasks.data``)
  write only into a missing or empty folder, or a dataset they generated (its manifest);
* writers (detection, segmentation and classification ``predict``, ReID ``extract``) remove only
  what their previous run's manifest lists, never overwrite a file no manifest lists, and refuse
  an output that is, holds or lies inside their input;
* a ``predict``/``extract`` in which no image could be read fails and marks nothing complete.

Each test plants a user's files (a photo, a text file, a nested folder) where the old code
removed or overwrote them and checks they survive byte for byte.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
from cli_configs import REPO, fasterrcnn_fpn_model, quick_trainer, write_config
from PIL import Image

from tasks.data._build import GeneratedFolderError, building
from tasks.data.digits import DigitsConfig, ensure_digits
from tasks.data.market import MarketConfig, ensure_market
from tasks.data.shapes import ShapesConfig, ensure_shapes
from tasks.outputs import MANIFEST, UnsafeOutputError


# ---------------------------------------------------------------------------- helpers
def _image_bytes(seed: int, fmt: str = "JPEG", size: int = 64) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, fmt)
    return buf.getvalue()


def _plant(folder: Path, seed: int = 0) -> dict[Path, bytes]:
    """A user's files in ``folder``: a photo, a text file and a picture in a nested folder."""
    files = {
        folder / "holiday.jpg": _image_bytes(seed),
        folder / "notes.txt": b"my notes\n",
        folder / "trip" / "day1" / "beach.png": _image_bytes(seed + 1, "PNG"),
    }
    for path, data in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return files


def _intact(files: dict[Path, bytes]) -> None:
    for path, data in files.items():
        assert path.is_file() and path.read_bytes() == data, f"{path} was removed or changed"


def _photos(folder: Path, n: int = 2) -> list[Path]:
    """``n`` readable photos to predict on."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"p{i}.jpg" for i in range(n)]
    for i, p in enumerate(paths):
        p.write_bytes(_image_bytes(10 + i))
    return paths


def _run(module: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """``python -m module args`` in ``cwd`` with this checkout first on the path (exit code not checked)."""
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1"
    )
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900
    )


def _trainer(tmp: Path) -> dict:
    return quick_trainer(None, logger=False, default_root_dir=str(tmp / "runs"), devices=1)


def _detect_config(tmp: Path, out: Path) -> Path:
    cfg = {
        "trainer": _trainer(tmp),
        "model": fasterrcnn_fpn_model(width_mult=0.125, warmup_steps=1),
        "data": {"root": str(tmp / "no_data"), "layout": "voc", "classes": ["circle", "square"], "eval_batch_size": 2,
                 "num_workers": 0},
        "writer": {"output_dir": str(out), "score_threshold": 0.0},
    }  # fmt: skip
    return write_config(cfg, tmp / "detect.yaml")


def _segment_config(tmp: Path, out: Path) -> Path:
    cfg = {
        "trainer": _trainer(tmp),
        "model": {"family": "unet", "arch": "vgg11_bn", "width_mult": 0.125, "decoder_channels": [16, 16, 8, 8, 8],
                  "predict_dir": str(out)},
        "data": {"root": str(tmp / "no_data"), "layout": "voc", "eval_batch_size": 1, "num_workers": 0},
    }  # fmt: skip
    return write_config(cfg, tmp / "segment.yaml")


def _classify_config(tmp: Path, out: Path) -> Path:
    cfg = {
        "trainer": _trainer(tmp),
        "model": {"arch": [[1, 8], [1, 16]], "fc_channels": 16, "predict_file": str(out)},
        "data": {"root": str(tmp / "no_data"), "classes": ["cat", "dog"], "image_size": 32, "resize_size": 32,
                 "eval_batch_size": 2, "num_workers": 0},
        "test_after_fit": {"enabled": False},
    }  # fmt: skip
    return write_config(cfg, tmp / "classify.yaml")


def _predict(task: str, cfg: Path, photos: Path, *extra: str) -> None:
    """``python -m tasks.<task> predict`` in this process (the real CLI entry point)."""
    import importlib

    args = ["predict", "--config", str(cfg), "--data.predict_images", str(photos), *extra]
    importlib.import_module(f"tasks.{task}").main(args)


# ---------------------------------------------------------------------------- generators
DEMOS = [
    ("tasks.detect", "configs/detect/demo.yaml", "data.synthetic"),
    ("tasks.segment", "configs/segment/demo.yaml", "data.synthetic"),
    ("tasks.reid", "configs/reid/demo.yaml", "data.synthetic"),
    ("tasks.classify", "configs/classify/demo.yaml", "data.synthetic"),
]


@pytest.mark.parametrize(("module", "config", "option"), DEMOS, ids=[d[0].split(".")[1] for d in DEMOS])
def test_a_demo_config_pointed_at_ones_own_data_refuses_and_deletes_nothing(tmp_path, module, config, option) -> None:
    mine = tmp_path / "my_dataset"
    files = _plant(mine)
    args = ["fit", "--config", str(REPO / config), "--data.root", str(mine), "--trainer.max_steps", "1",
            "--trainer.limit_val_batches", "1"]  # fmt: skip
    proc = _run(module, args, cwd=tmp_path)
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert f"{mine}: this folder is not a generated dataset" in proc.stderr, proc.stderr[-3000:]
    assert f"drop `{option}`" in proc.stderr and "holiday.jpg" in proc.stderr
    _intact(files)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["my_dataset"]  # no renamed-aside copy, no temp folder
    assert sorted(p.relative_to(mine).as_posix() for p in mine.rglob("*")) == sorted(
        ["holiday.jpg", "notes.txt", "trip", "trip/day1", "trip/day1/beach.png"]
    )


_SHAPES = ShapesConfig(num_train=2, num_val=1, min_image_size=48, max_image_size=48, layouts=("coco", "voc"))
_MARKET = MarketConfig(num_train_ids=2, num_test_ids=2, num_cameras=2, min_cameras=2, max_cameras=2,
                       max_per_camera=2, num_distractors=1, num_junk=1, height=32, width=16, seed=1)  # fmt: skip
GENERATORS = [
    ("shapes", ensure_shapes, _SHAPES, ShapesConfig(**{**_SHAPES.__dict__, "seed": 5, "layouts": ("coco",)}),
     "data.synthetic"),
    ("market", ensure_market, _MARKET, MarketConfig(**{**_MARKET.__dict__, "seed": 2}), "data.synthetic"),
    ("digits", ensure_digits, DigitsConfig(), DigitsConfig(seed=1), "data.synthetic"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("ensure", "cfg", "other", "option"), [g[1:] for g in GENERATORS], ids=[g[0] for g in GENERATORS]
)
def test_a_generator_replaces_its_own_dataset_and_nothing_else(tmp_path, ensure, cfg, other, option) -> None:
    user = tmp_path / "user"
    files = _plant(user)
    with pytest.raises(GeneratedFolderError, match=rf"{user}: this folder is not a generated dataset.*drop `{option}`"):
        ensure(user, cfg, progress=False)
    _intact(files)

    root = tmp_path / "data"
    ensure(root, cfg, progress=False)
    manifest = json.loads((root / MANIFEST).read_text())
    written = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()} - {MANIFEST}
    assert set(manifest["files"]) == written  # every file it wrote, and nothing else
    ensure(root, other, progress=False)  # another config: what the manifest listed is replaced
    assert set(json.loads((root / MANIFEST).read_text())["files"]) == (
        {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()} - {MANIFEST}
    )

    added = _plant(root / "mine", seed=3)  # a user's files put into the generated dataset
    with pytest.raises(GeneratedFolderError, match=rf"{root}: this folder is not a generated dataset: it holds mine/"):
        ensure(root, cfg, progress=False)
    _intact(added)
    for path in added:
        path.unlink()
    changed = sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)[0]
    changed.write_bytes(b"edited by its user")  # a generated file the user changed is not the generator's any more
    with pytest.raises(GeneratedFolderError, match="changed since it was written"):
        ensure(root, cfg, progress=False)
    assert changed.read_bytes() == b"edited by its user"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "user"]  # no temp or renamed-aside folder left


def test_data_command_line_refuses_a_folder_it_did_not_generate(tmp_path) -> None:
    from tasks.data.__main__ import main as data_main

    files = _plant(tmp_path / "out")
    with pytest.raises(
        SystemExit, match=rf"python -m tasks.data shapes: {tmp_path / 'out'}: this folder is not a generated"
    ):
        data_main(["shapes", "--out", str(tmp_path / "out"), "--num-train", "1", "--num-val", "1"])
    _intact(files)


def test_builders_of_one_root_at_once_end_with_one_complete_dataset(tmp_path) -> None:
    root = tmp_path / "shapes"
    with building(root) as first:  # two builders of one root (prepare_data on two nodes)
        (first / "x.txt").write_text("first")
        with building(root) as second:
            (second / "x.txt").write_text("second")
        assert (root / "x.txt").read_text() == "second"
    assert (root / "x.txt").read_text() == "first"  # the generated dataset there was replaced, renames only
    assert set(json.loads((root / MANIFEST).read_text())["files"]) == {"x.txt"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shapes"]


# ---------------------------------------------------------------------------- writers
def test_detect_predict_into_the_folder_of_its_input_photos_refuses_and_deletes_none(tmp_path) -> None:
    photos = tmp_path / "photos"
    files = _plant(photos / "images")
    cfg = _detect_config(tmp_path, photos)
    args = ["predict", "--config", str(cfg), "--data.predict_images", str(photos / "images"),
            "--writer.output_dir", str(photos)]  # fmt: skip
    proc = _run("tasks.detect", args, cwd=tmp_path)
    assert proc.returncode != 0
    assert f"the output folder {photos} holds the input {photos / 'images'}" in proc.stderr, proc.stderr[-3000:]
    _intact(files)
    assert sorted(p.relative_to(photos).as_posix() for p in photos.rglob("*")) == sorted(
        ["images", "images/holiday.jpg", "images/notes.txt", "images/trip", "images/trip/day1",
         "images/trip/day1/beach.png"]
    )  # fmt: skip


def test_detect_predict_removes_only_what_its_manifest_lists(tmp_path) -> None:
    photos = tmp_path / "photos"
    _photos(photos)
    out = tmp_path / "out"
    files = _plant(out) | _plant(out / "images", seed=5)  # a user's photos where the old clean-up globbed *.jpg
    cfg = _detect_config(tmp_path, out)
    _predict("detect", cfg, photos)
    _intact(files)
    listed = json.loads((out / MANIFEST).read_text())["files"]
    assert {"detections.json", "images.json", "grid.jpg", "images/p0.jpg", "images/p1.jpg", "_COMPLETE"} == set(listed)
    late = _plant(out / "images" / "later", seed=7) | {out / "images" / "late.jpg": _image_bytes(9)}
    (out / "images" / "late.jpg").write_bytes(_image_bytes(9))  # put there after the run: in no manifest
    _predict("detect", cfg, photos, "--writer.score_threshold", "0.9")  # a rerun replaces its own files
    assert json.loads((out / "_COMPLETE").read_text())["images"] == 2
    assert set(json.loads((out / MANIFEST).read_text())["files"]) == set(listed)
    _intact(files | late)

    other = tmp_path / "other"
    mine = {other / "detections.json": b'{"mine": true}'}
    other.mkdir()
    (other / "detections.json").write_bytes(mine[other / "detections.json"])
    with pytest.raises(UnsafeOutputError, match=rf"{other}: detections.json is there and no manifest"):
        _predict("detect", cfg, photos, "--writer.output_dir", str(other))
    _intact(mine)


@pytest.mark.slow
def test_detect_predict_on_two_processes_records_what_each_wrote_and_refuses_on_every_rank(tmp_path) -> None:
    photos = tmp_path / "photos"
    _photos(photos, 4)
    out = tmp_path / "out"
    files = _plant(out / "images")
    cfg = _detect_config(tmp_path, out)
    ddp = ["--trainer.devices", "2", "--trainer.strategy", "ddp", "--data.predict_images", str(photos)]
    proc = _run("tasks.detect", ["predict", "--config", str(cfg), *ddp], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    listed = set(json.loads((out / MANIFEST).read_text())["files"])
    assert {f"images/p{i}.jpg" for i in range(4)} <= listed  # the pictures of both processes
    assert json.loads((out / "_COMPLETE").read_text())["images"] == 4
    assert not list(out.glob(f"{MANIFEST}.*"))  # the journals went into the manifest
    _intact(files)
    # refused on every process (none waits for the others forever), nothing written among the photos
    before = sorted(photos.rglob("*"))
    proc = _run("tasks.detect", ["predict", "--config", str(cfg), *ddp, "--writer.output_dir", str(photos / "out")],
                cwd=tmp_path)  # fmt: skip
    assert proc.returncode != 0 and "lies inside the input" in proc.stderr, proc.stderr[-3000:]
    assert sorted(photos.rglob("*")) == before


def test_segment_predict_never_overwrites_user_files_nor_writes_among_its_input(tmp_path) -> None:
    photos = tmp_path / "photos"
    _photos(photos)
    out = tmp_path / "masks"
    files = _plant(out) | {out / "p1.png": _image_bytes(4, "PNG")}  # a user's file named as an output
    (out / "p1.png").write_bytes(files[out / "p1.png"])
    cfg = _segment_config(tmp_path, out)
    with pytest.raises(UnsafeOutputError, match=rf"{out / 'p1.png'}: already there, and not written by this run"):
        _predict("segment", cfg, photos)
    _intact(files)
    assert not (out / "_COMPLETE").exists()

    (out / "p1.png").unlink()
    del files[out / "p1.png"]
    _predict("segment", cfg, photos)
    _predict("segment", cfg, photos)  # a rerun replaces its own masks
    assert json.loads((out / "_COMPLETE").read_text()) == {"images": 2, "skipped": 0}
    assert {"p0.png", "p0_overlay.png", "p1.png", "p1_overlay.png"} <= set(
        json.loads((out / MANIFEST).read_text())["files"]
    )
    _intact(files)

    before = sorted(photos.rglob("*"))
    with pytest.raises(
        UnsafeOutputError, match=rf"the output folder {photos / 'masks'} lies inside the input {photos}"
    ):
        _predict("segment", cfg, photos, "--model.predict_dir", str(photos / "masks"))
    assert sorted(photos.rglob("*")) == before


def test_classify_predict_never_overwrites_a_csv_it_did_not_write(tmp_path) -> None:
    photos = tmp_path / "photos"
    _photos(photos)
    csv = tmp_path / "results.csv"
    mine = {csv: b"my,own,spreadsheet\n"}
    csv.write_bytes(mine[csv])
    cfg = _classify_config(tmp_path, csv)
    with pytest.raises(UnsafeOutputError, match=rf"{tmp_path}: results.csv is there and no manifest"):
        _predict("classify", cfg, photos)
    _intact(mine)

    ours = tmp_path / "ours.csv"
    _predict("classify", cfg, photos, "--model.predict_file", str(ours))
    _predict("classify", cfg, photos, "--model.predict_file", str(ours))  # its own CSV: replaced
    assert ours.read_text().splitlines()[0].startswith("path,label1,score1")
    assert len(ours.read_text().splitlines()) == 3

    before = sorted(photos.rglob("*"))
    with pytest.raises(UnsafeOutputError, match=rf"the output file {photos / 'p.csv'} lies inside the input {photos}"):
        _predict("classify", cfg, photos, "--model.predict_file", str(photos / "p.csv"))
    assert sorted(photos.rglob("*")) == before


def _embedder():
    from vggbackbone.models import reid_vgg

    return reid_vgg("vgg11", width_mult=0.125, embedding_dim=8).eval()


def _extract(net, images, out) -> Path:
    from tasks.reid_extract import extract_embeddings

    trainer = {"accelerator": "cpu", "enable_progress_bar": False}
    return extract_embeddings(net, images, out, image_size=(32, 16), num_workers=0, precision="fp32", trainer=trainer)


def test_reid_extract_never_overwrites_nor_removes_files_it_did_not_write(tmp_path) -> None:
    photos = tmp_path / "photos"
    _photos(photos)
    net = _embedder()
    mine = {tmp_path / "emb.npz": b"my own array"}
    (tmp_path / "emb.npz").write_bytes(mine[tmp_path / "emb.npz"])
    with pytest.raises(UnsafeOutputError, match=rf"{tmp_path}: emb.npz is there and no manifest"):
        _extract(net, photos, tmp_path / "emb.npz")
    _intact(mine)

    # a folder named like the shards' one, holding a user's files: the old code removed it whole
    files = _plant(tmp_path / ".ours.npz.parts")
    out = _extract(net, photos, tmp_path / "ours.npz")
    _extract(_embedder(), photos, out)  # another model: the earlier output (in the manifest) is replaced
    assert np.load(out)["embeddings"].shape == (2, 8)
    _intact(files | mine)
    assert sorted(p.name for p in (tmp_path / ".ours.npz.parts").iterdir()) == ["holiday.jpg", "notes.txt", "trip"]

    before = sorted(photos.rglob("*"))
    with pytest.raises(UnsafeOutputError, match=rf"the output file {photos / 'e.npz'} lies inside the input {photos}"):
        _extract(net, photos, photos / "e.npz")
    assert sorted(photos.rglob("*")) == before


# ---------------------------------------------------------------------------- runs that read nothing
def _unreadable(folder: Path) -> Path:
    folder.mkdir(parents=True)
    for name in ("a.jpg", "b.png"):
        (folder / name).write_bytes(b"not an image at all")
    return folder


@pytest.mark.parametrize(
    ("task", "config"), [("detect", _detect_config), ("segment", _segment_config), ("classify", _classify_config)]
)
def test_predict_that_reads_no_image_fails_and_marks_nothing_complete(tmp_path, task, config) -> None:
    photos = _unreadable(tmp_path / "photos")
    out = tmp_path / ("out.csv" if task == "classify" else "out")
    with pytest.raises(
        RuntimeError, match=rf"{task} predict: nothing produced from {photos}: all 2 image\(s\) unreadable"
    ):
        _predict(task, config(tmp_path, out), photos)
    assert not (out / "_COMPLETE").exists() and not (task == "classify" and out.exists())


def test_extract_that_reads_no_image_fails(tmp_path) -> None:
    photos = _unreadable(tmp_path / "photos")
    with pytest.raises(RuntimeError, match=r"extract: nothing produced from 2 image\(s\): all 2 image\(s\) unreadable"):
        _extract(_embedder(), photos, tmp_path / "e.npz")
    assert not (tmp_path / "e.npz").exists()


def test_reid_predict_that_reads_no_image_fails(tmp_path) -> None:
    from tasks.data.reid import ReIDDataModule
    from tasks.reid import ReIDTask

    root = ensure_market(tmp_path / "market", _MARKET, progress=False)
    for folder in ("query", "bounding_box_test"):
        for image in (root / folder).iterdir():
            image.write_bytes(b"not an image at all")
    dm = ReIDDataModule(root=str(root), image_size=(32, 16), num_workers=0, p=2, k=1)
    task = ReIDTask(arch="vgg11", width_mult=0.125)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(
        RuntimeError, match=rf"reid predict: nothing produced from {root}: all \d+ image\(s\) unreadable"
    ):
        trainer.predict(task, datamodule=dm)
