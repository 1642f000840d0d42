"""One predict contract (:mod:`tasks.writer`): every task's ``predict`` writes under ``writer.output_dir``,
``_COMPLETE`` last; the old output options (``model.predict_dir``, ``model.predict_file``) still work and warn once."""

from __future__ import annotations

import importlib
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cli_configs import fasterrcnn_fpn_model, quick_trainer, write_config
from PIL import Image

import tasks.deprecation
from tasks.deprecation import RenamedOptionWarning
from tasks.outputs import COMPLETE_MARKER, MANIFEST

TINY_MARKET = {"num_train_ids": 2, "num_test_ids": 2, "num_cameras": 2, "min_cameras": 2, "max_cameras": 2,
               "max_per_camera": 2, "num_distractors": 1, "num_junk": 1, "height": 32, "width": 16,
               "seed": 1}  # fmt: skip


def _photos(folder: Path, n: int = 2) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (48, 56, 3), dtype=np.uint8)).save(folder / f"p{i}.jpg")
    return folder


def _config(task: str, tmp: Path) -> dict[str, Any]:
    """A predict config of ``task`` on random weights (no checkpoint), without any output option."""
    cfg: dict[str, Any] = {"trainer": quick_trainer(None, logger=False, default_root_dir=str(tmp / "runs"))}
    photos = str(tmp / "photos")
    if task == "detect":
        cfg["model"] = fasterrcnn_fpn_model(width_mult=0.0625, warmup_steps=0)
        cfg["data"] = {"predict_images": photos, "classes": ["circle", "square"], "num_workers": 0}
    elif task == "segment":
        cfg["model"] = {"family": "unet", "arch": "vgg11_bn", "width_mult": 0.0625, "decoder_channels": [8] * 5}
        cfg["data"] = {"predict_images": photos, "classes": ["background", "thing"], "num_workers": 0}
    elif task == "classify":
        cfg["model"] = {"arch": [[1, 8], [1, 16]], "fc_channels": 16}
        cfg["data"] = {"predict_images": photos, "classes": ["cat", "dog"], "image_size": 32, "num_workers": 0}
        cfg["test_after_fit"] = {"enabled": False}
    else:  # reid: the query and gallery images of the data
        cfg["model"] = {"arch": "vgg11", "width_mult": 0.0625, "embedding_dim": 8}
        cfg["data"] = {"root": str(tmp / "market"), "synthetic": TINY_MARKET, "image_size": [32, 16], "num_workers": 0}
    return cfg


def _predict(task: str, cfg: dict[str, Any], tmp: Path, *args: str) -> None:
    if task != "reid":
        _photos(tmp / "photos")
    config = write_config(cfg, tmp / f"{task}.yaml")
    importlib.import_module(f"tasks.{task}").main(["predict", "--config", str(config), *args])


#: what each task's predict writes into its output folder (besides the manifest and the marker)
WRITES = {
    "detect": {"detections.json", "images.json", "grid.jpg", "images/p0.jpg", "images/p1.jpg"},
    "segment": {"p0.png", "p0_overlay.png", "p1.png", "p1_overlay.png"},
    "classify": {"predictions.csv"},
    "reid": {"embeddings.npz"},
}


def _check_complete_last(out: Path, expected: set[str]) -> dict[str, Any]:
    files = {p.relative_to(out).as_posix(): p for p in out.rglob("*") if p.is_file()}
    assert set(files) == expected | {MANIFEST, COMPLETE_MARKER}
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["complete"] is True and set(manifest["files"]) == expected | {COMPLETE_MARKER}
    newest = max(p.stat().st_mtime_ns for name, p in files.items() if name != COMPLETE_MARKER)
    assert (out / COMPLETE_MARKER).stat().st_mtime_ns >= newest  # written last
    return json.loads((out / COMPLETE_MARKER).read_text())


@pytest.mark.parametrize("task", ["detect", "segment", "classify", "reid"])
def test_every_predict_writes_under_writer_output_dir_complete_last(task: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    with warnings.catch_warnings():
        warnings.simplefilter("error", RenamedOptionWarning)  # the new keys warn about nothing
        _predict(task, _config(task, tmp_path), tmp_path, "--writer.output_dir", str(out))
    summary = _check_complete_last(out, WRITES[task])
    if task == "reid":
        from tasks.embeddings_file import load_embeddings

        emb = load_embeddings(out / "embeddings.npz")  # the format of `extract`
        n = summary["images"]
        assert emb["embeddings"].shape == (n, 8) and emb["embeddings"].dtype == np.float32 and len(emb["paths"]) == n
        assert all(Path(p).parent.name in ("query", "bounding_box_test") for p in emb["paths"])
        norms = np.linalg.norm(emb["embeddings"], axis=1)
        np.testing.assert_allclose(norms, 1.0, rtol=1e-2)  # eval embeddings (L2-normalised; bf16 where fast)
    else:
        assert summary["images"] == 2


@pytest.mark.parametrize(
    ("task", "old", "value", "where"),
    [("segment", "predict_dir", "masks", "masks"), ("classify", "predict_file", "mine/rows.csv", "mine")],
)
def test_old_output_options_still_work_and_warn_once(task: str, old: str, value: str, where: str, tmp_path) -> None:
    tasks.deprecation._warned.clear()  # as in a fresh process
    cfg = _config(task, tmp_path)
    cfg["model"][old] = str(tmp_path / value)
    with pytest.warns(RenamedOptionWarning, match=rf"model\.{old} is deprecated: .* write writer\.output_dir") as rec:
        _predict(task, cfg, tmp_path)
    assert sum(issubclass(w.category, RenamedOptionWarning) for w in rec) == 1
    expected = WRITES[task] if task == "segment" else {"rows.csv"}
    assert _check_complete_last(tmp_path / where, expected)["images"] == 2
    with pytest.raises(ValueError, match=rf"model\.{old} is the old name of writer\.output_dir: give only writer"):
        _predict_again(task, tmp_path, "--writer.output_dir", str(tmp_path / "elsewhere"))


def _predict_again(task: str, tmp: Path, *args: str) -> None:
    importlib.import_module(f"tasks.{task}").main(["predict", "--config", str(tmp / f"{task}.yaml"), *args])


def test_old_predict_dir_in_python_still_writes_there(tmp_path: Path) -> None:
    import pytorch_lightning as pl

    from tasks.data.segmentation import SegmentationDataModule
    from tasks.segment import SegmentationTask

    tasks.deprecation._warned.clear()
    with pytest.warns(RenamedOptionWarning, match=r"model\.predict_dir is deprecated"):
        task = SegmentationTask(num_classes=2, family="unet", arch="vgg11_bn", width_mult=0.0625,
                                decoder_channels=[8] * 5, predict_dir=str(tmp_path / "old"))  # fmt: skip
    assert "predict_dir" not in task.hparams  # a run setting, not part of the model: never checkpointed
    dm = SegmentationDataModule(predict_images=str(_photos(tmp_path / "photos")), classes=["bg", "x"], num_workers=0)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    written = trainer.predict(task, datamodule=dm)
    assert [Path(p).name for batch in written for p in batch] == ["p0.png", "p1.png"]  # the paths, as before
    _check_complete_last(tmp_path / "old", WRITES["segment"])
