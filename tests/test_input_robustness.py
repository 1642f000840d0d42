"""Hostile file trees and option values: symbolic-link loops and dangling links in every folder
walk, file names that are not valid UTF-8 through real ``classify predict`` and ``reid extract``
runs, and bad option values refused by name through the task CLIs.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
from cli_configs import REPO, quick_trainer, run_module, write_config
from PIL import Image

from tasks.images import list_images, read_image

NON_UTF8 = os.fsdecode(b"caf\xe9.jpg")  # Latin-1 "café.jpg": the byte 0xE9 is not UTF-8


def _png(path: Path, value: int = 0, size: tuple[int, int] = (20, 24)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full(size, value, np.uint8)).save(path)
    return path


def _jpeg(path: Path, size: tuple[int, int] = (32, 16)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (*size, 3), dtype=np.uint8)).save(path, "JPEG")
    return path


def _non_utf8_jpeg(folder: Path) -> Path:
    try:
        return _jpeg(folder / NON_UTF8)
    except (OSError, UnicodeEncodeError):  # a file system that only takes UTF-8 names
        pytest.skip("this file system refuses file names that are not UTF-8")


def _save(module: pl.LightningModule, path: Path) -> Path:
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def classify_ckpt(tmp_path_factory) -> Path:
    """A checkpoint of a one-epoch ``classify fit`` on a 2-class, 8-image tree (as the CLI writes it)."""
    tmp = tmp_path_factory.mktemp("fit")
    for split in ("train", "val"):
        for cls, value in (("a", 20), ("b", 220)):
            for i in range(2):
                _png(tmp / "tree" / split / cls / f"{i}.png", value + i)
    run_module("tasks.classify", ["fit", "--config", str(_classify_config(tmp, tmp / "tree"))])
    return next((tmp / "runs").rglob("last.ckpt"))


def _classify_config(tmp: Path, root: Path, **data: object) -> Path:
    cfg = {
        "seed_everything": 0,
        "trainer": quick_trainer(tmp),
        "model": {"arch": [[1, 8], [1, 16]], "fc_channels": 32, "dropout": 0.0, "predict_file": str(tmp / "pred.csv"),
                  "optim": {"name": "adamw", "lr": 0.001, "scheduler": "none"}},
        "data": {"root": str(root), "classes": ["a", "b"], "val_split": "val", "test_split": "val", "in_channels": 1,
                 "image_size": 16, "resize_size": 18, "batch_size": 2, "eval_batch_size": 2, "num_workers": 0} | data,
        "test_after_fit": {"enabled": False},
    }  # fmt: skip
    return write_config(cfg, tmp / "classify.yaml")


# ---------------------------------------------------------------------------- symbolic links
def test_a_symlink_loop_in_an_imagefolder_class_adds_nothing_and_is_named(tmp_path: Path) -> None:
    from tasks.data.classify import ImageFolderDataset

    for cls in ("0", "1"):
        for i in range(3):
            _png(tmp_path / "train" / cls / f"{i}.png")
    os.symlink("..", tmp_path / "train" / "0" / "up")  # ln -s .. train/0/up
    with pytest.warns(UserWarning, match=r"0/up -> \.\. \(a loop: it leads back to .*train, which holds it\)"):
        ds = ImageFolderDataset(tmp_path / "train", ["0", "1"])
    assert len(ds) == 6  # torchvision's os.walk(followlinks=True) listed thousands
    assert [label for _, label in ds.samples] == [0, 0, 0, 1, 1, 1]


def test_a_class_folder_that_links_back_is_not_a_class(tmp_path: Path) -> None:
    from tasks.data.classify import ClassificationDataModule

    for cls in ("0", "1"):
        _png(tmp_path / "train" / cls / "x.png")
    os.symlink(".", tmp_path / "train" / "again")  # torchvision's find_classes: a class "again"
    data = ClassificationDataModule(root=str(tmp_path), num_workers=0)
    assert data.classes == ["0", "1"]
    with pytest.warns(UserWarning, match=r"train/again -> \. \(a loop"):
        assert len(data.build_dataset("train")) == 2


def test_names_that_are_not_utf8_have_a_text_form_and_a_way_back() -> None:
    from tasks.pathnames import display_path, name_fields, path_hex

    assert display_path(NON_UTF8) == "caf\\xe9.jpg" and display_path("été.jpg") == "été.jpg"
    assert os.fsdecode(bytes.fromhex(path_hex(NON_UTF8))) == NON_UTF8 and path_hex("été.jpg") == ""
    assert name_fields("été.jpg") == {"file_name": "été.jpg"}
    assert name_fields(NON_UTF8) == {"file_name": "caf\\xe9.jpg", "file_name_hex": b"caf\xe9.jpg".hex()}
    json.dumps(name_fields(NON_UTF8), ensure_ascii=False).encode("utf-8")  # writable as UTF-8


def test_linked_folders_are_followed_once_and_keep_their_class(tmp_path: Path) -> None:
    from torchvision.datasets.folder import make_dataset

    from tasks.data.classify import ImageFolderDataset
    from tasks.images import IMAGE_EXTENSIONS

    split = tmp_path / "train"
    _png(split / "0" / "a.png")
    _png(split / "1" / "sub" / "b.png")
    _png(tmp_path / "elsewhere" / "c.png")
    os.symlink(tmp_path / "elsewhere", split / "0" / "farm")  # a dataset made of links: followed
    plain = make_dataset(split, {"0": 0, "1": 1}, extensions=IMAGE_EXTENSIONS)
    os.symlink("../1/sub", split / "0" / "more")  # the same folder as 1/sub: its images stay in class 1
    with pytest.warns(UserWarning, match=r"0/more -> \.\./1/sub \(the same folder as .*1/sub, listed already\)"):
        ds = ImageFolderDataset(split, ["0", "1"])
    assert ds.samples == plain  # without the duplicate link: torchvision's samples, in its order
    assert [(Path(p).relative_to(split).as_posix(), y) for p, y in ds.samples] == [
        ("0/a.png", 0), ("0/farm/c.png", 0), ("1/sub/b.png", 1)
    ]  # fmt: skip


def test_image_folders_follow_links_never_loop_and_list_dangling_links_with_their_target(tmp_path: Path) -> None:
    root = tmp_path / "photos"
    _png(root / "x.png")
    _png(tmp_path / "more" / "y.png")
    os.symlink(tmp_path / "more", root / "linked")  # followed (Path.rglob did not enter it)
    os.symlink(".", root / "self")  # a loop
    os.symlink(tmp_path, root / "parent")  # a loop through the folder above
    os.symlink("gone.png", root / "dangling.png")  # listed, then skipped naming its target
    os.symlink("/nowhere/folder", root / "dead_folder")  # reported with the skipped links
    with pytest.warns(UserWarning) as caught:
        names, files = list_images(root)
    assert names == ["dangling.png", "linked/y.png", "x.png"]
    text = " ".join(str(w.message) for w in caught)
    assert "skipped 3 symbolic link(s)" in text
    for expected in ("self -> . (a loop", f"parent -> {tmp_path} (a loop", "dead_folder -> /nowhere/folder (dangling"):
        assert expected in text, text
    with pytest.raises(ValueError, match=r"dangling\.png: dangling symbolic link to gone\.png \(its target does not"):
        read_image(files[0])


def test_a_dangling_link_in_a_market_folder_is_a_counted_skip_naming_its_target(tmp_path: Path) -> None:
    from tasks.data.reid import ReIDDataset, read_market_split
    from tasks.images import SkippedSample

    query = tmp_path / "query"
    _jpeg(query / "0001_c1s1_000001_00.jpg")
    os.symlink("/moved/0002_c2s1_000001_00.jpg", query / "0002_c2s1_000001_00.jpg")
    samples = read_market_split(query, keep_distractors=False)
    items = [ReIDDataset(samples, transform=lambda x: x)[i] for i in range(len(samples))]
    assert isinstance(items[1], SkippedSample)
    assert items[1].reason == "dangling symbolic link to /moved/0002_c2s1_000001_00.jpg (its target does not exist)"


def test_classify_validate_counts_each_image_once_under_a_loop(tmp_path: Path, classify_ckpt: Path) -> None:
    root = tmp_path / "tree"
    for cls, value in (("a", 20), ("b", 220)):
        for i in range(2):
            _png(root / "val" / cls / f"{i}.png", value)
    os.symlink("..", root / "val" / "a" / "up")
    os.symlink("missing.png", root / "val" / "b" / "gone.png")
    cfg = _classify_config(tmp_path, root)
    proc = run_module("tasks.classify", ["validate", "--config", str(cfg), "--ckpt_path", str(classify_ckpt)])
    metrics = json.loads(next((tmp_path / "runs").rglob("val_metrics.json")).read_text())
    assert metrics["num_images"] == 4 and np.array(metrics["confusion_matrix"]).sum(1).tolist() == [2, 2]
    assert metrics["num_skipped"] == 1
    assert "a/up -> .. (a loop" in proc.stderr
    assert "gone.png (dangling symbolic link to missing.png" in proc.stderr


# ---------------------------------------------------------------------------- names that are not UTF-8
def test_classify_predict_writes_a_name_that_is_not_utf8(tmp_path: Path, classify_ckpt: Path) -> None:
    images = tmp_path / "images"
    odd = _non_utf8_jpeg(images)
    _png(images / "plain.png")
    cfg = _classify_config(tmp_path, tmp_path / "unused", predict_images=str(images), classes=["a", "b"])
    run_module("tasks.classify", ["predict", "--config", str(cfg), "--ckpt_path", str(classify_ckpt)])
    raw = (tmp_path / "pred.csv").read_bytes()
    rows = list(csv.DictReader(raw.decode("utf-8").splitlines()))  # valid UTF-8
    assert [r["path"] for r in rows] == [str(images) + "/caf\\xe9.jpg", str(images / "plain.png")]
    assert os.fsdecode(bytes.fromhex(rows[0]["path_hex"])) == str(odd)  # the way back to the file
    assert rows[1]["path_hex"] == "" and all(r["label1"] in ("a", "b") for r in rows)


def test_reid_extract_keeps_a_name_that_is_not_utf8(tmp_path: Path) -> None:
    from tasks.reid import ReIDTask
    from tasks.reid_extract import load_embeddings

    ckpt = _save(ReIDTask(num_classes=4, arch="vgg11", width_mult=0.0625), tmp_path / "reid.ckpt")
    images = tmp_path / "crops"
    odd = _non_utf8_jpeg(images)
    _jpeg(images / "plain.jpg")
    os.symlink("away.jpg", images / "lost.jpg")
    out = tmp_path / "emb.npz"
    proc = run_module(
        "tasks.reid",
        ["extract", "--ckpt", str(ckpt), "--images", str(images), "--out", str(out), "--image_size", "[32, 16]",
         "--num_workers", "0", "--precision", "fp32", "--trainer.accelerator", "cpu"],
    )  # fmt: skip
    d = load_embeddings(out)
    assert d["paths"].tolist() == [NON_UTF8, "plain.jpg"] and d["embeddings"].shape[0] == 2
    assert os.fsencode(images / d["paths"][0]) == os.fsencode(odd) and (images / d["paths"][0]).is_file()
    assert d["skipped_paths"].tolist() == ["lost.jpg"]
    assert d["skipped_reasons"].tolist() == ["dangling symbolic link to away.jpg (its target does not exist)"]
    assert "lost.jpg (dangling symbolic link to away.jpg" in proc.stderr
    # an image list written by a tool that knows only bytes (`ls > list.txt`) reads the same names
    (tmp_path / "list.txt").write_bytes(b"crops/caf\xe9.jpg\ncrops/plain.jpg\n")
    names, files = list_images(tmp_path / "list.txt")
    assert names == ["crops/" + NON_UTF8, "crops/plain.jpg"] and files[0].is_file()


# ---------------------------------------------------------------------------- options
def _cli(task: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", f"tasks.{task}", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_reid_p_0_is_refused_by_name_on_the_command_line(tmp_path: Path) -> None:
    demo = REPO / "configs" / "reid" / "demo.yaml"
    proc = _cli("reid", ["fit", "--config", str(demo), "--data.p", "0"], tmp_path)
    assert proc.returncode != 0
    assert "ValueError: data.p must be a whole number >= 1, got 0" in proc.stderr
    assert "ZeroDivisionError" not in proc.stderr and not any(tmp_path.iterdir())  # refused before anything ran


BAD_OPTIONS = [
    ("reid", "data.k", "-2", r"data\.k must be a whole number >= 1, got -2"),
    ("classify", "data.batch_size", "0", r"data\.batch_size must be a whole number >= 1, got 0"),
    ("classify", "data.eval_batch_size", "0", r"data\.eval_batch_size must be a whole number >= 1 or null, got 0"),
    ("detect", "data.num_workers", "-1", r"data\.num_workers must be a whole number >= 0, got -1"),
    ("detect", "data.hflip", "1.5", r"data\.hflip is a probability: it must be a number in \[0, 1\], got 1\.5"),
    ("segment", "data.crop_size", "0", r"data\.crop_size must be a size in pixels \(a whole number >= 1\), got 0"),
    ("reid", "data.image_size", "[0, 64]", r"data\.image_size must be 2 sizes in pixels"),
    ("reid", "data.random_erasing", "2", r"data\.random_erasing is a probability"),
    ("classify", "data.scale_range", "[0.5, 0.1]", r"data\.scale_range must be \[low, high\]"),
]


@pytest.mark.parametrize("task, option, value, message", BAD_OPTIONS, ids=[f"{t}-{o}" for t, o, _, _ in BAD_OPTIONS])
def test_bad_option_values_are_refused_naming_the_option(
    tmp_path: Path, monkeypatch, task: str, option: str, value: str, message: str
) -> None:
    import importlib

    monkeypatch.chdir(tmp_path)  # the demos' data would go here, if anything ran
    main = importlib.import_module(f"tasks.{task}").main
    with warnings.catch_warnings(), pytest.raises(ValueError, match=message):
        warnings.simplefilter("ignore")
        main(["fit", "--config", str(REPO / "configs" / task / "demo.yaml"), f"--{option}", value])
    assert not any(tmp_path.iterdir())


def test_missing_folders_and_files_name_their_option(tmp_path: Path, classify_ckpt: Path) -> None:
    from tasks.classify import main

    root = tmp_path / "tree"
    _png(root / "train" / "a" / "0.png")
    cfg = _classify_config(tmp_path, root)
    warnings.filterwarnings("ignore", message=".*args parameter is intended to run from within Python")
    validate = ["validate", "--config", str(cfg), "--ckpt_path", str(classify_ckpt)]
    with pytest.raises(FileNotFoundError, match=r"data\.val_split: folder .*tree/val not found in data\.root .*tree "
                       r"\(it holds: train\)"):  # fmt: skip
        main(validate)
    with pytest.raises(FileNotFoundError, match=r"data\.root: folder .*elsewhere not found"):
        main([*validate, "--data.root", str(tmp_path / "elsewhere")])
    predict = ["predict", "--config", str(cfg), "--ckpt_path", str(classify_ckpt)]
    with pytest.raises(FileNotFoundError, match=r"data\.predict_images: .*nowhere not found"):
        main([*predict, "--data.predict_images", str(tmp_path / "nowhere")])
