"""MLflow (file store) and Weights & Biases (offline) loggers from YAML: a tiny classification fit
writes its metrics and its confusion picture to both, with nothing sent over the network."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from cli_configs import quick_trainer, write_config
from PIL import Image

pytest.importorskip("mlflow")
pytest.importorskip("wandb")


def _tree(root: Path) -> None:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for k, cls in enumerate(("a", "b", "c")):
            (root / split / cls).mkdir(parents=True)
            for i in range(2):
                pixels = np.full((12, 12), 60 * k, dtype=np.uint8) + rng.integers(0, 30, (12, 12), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / cls / f"{i}.png")


def test_classify_fit_logs_metrics_and_the_confusion_picture_to_mlflow_and_wandb(tmp_path: Path, monkeypatch):
    from tasks.classify import main

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # mlflow 3.18 refuses the file store without it
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wandb_dir").mkdir()
    _tree(tmp_path / "tree")
    trainer = quick_trainer(tmp_path, logger="csv", limit_train_batches=1)
    trainer["logger"] += [
        {"class_path": "pytorch_lightning.loggers.MLFlowLogger",
         "init_args": {"experiment_name": "demo", "tracking_uri": f"file:{tmp_path / 'mlruns'}"}},
        {"class_path": "pytorch_lightning.loggers.WandbLogger",
         "init_args": {"project": "demo", "offline": True, "save_dir": str(tmp_path / "wandb_dir")}},
    ]  # fmt: skip
    cfg = write_config({
        "seed_everything": 0,
        "trainer": trainer,
        "model": {"arch": [[1, 8]], "fc_channels": 8, "optim": {"name": "sgd", "lr": 0.01, "scheduler": "none"}},
        "data": {"root": str(tmp_path / "tree"), "in_channels": 1, "image_size": 8, "resize_size": 8,
                 "batch_size": 3, "eval_batch_size": 3, "num_workers": 0},
        "test_after_fit": {"enabled": False},
    }, tmp_path / "classify.yaml")  # fmt: skip
    main(["fit", "--config", str(cfg)])
    import wandb

    wandb.finish()  # what the end of a `python -m tasks.classify fit` process does (the run's summary file)

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"file:{tmp_path / 'mlruns'}")
    (run,) = client.search_runs([client.get_experiment_by_name("demo").experiment_id])
    (acc1,) = client.get_metric_history(run.info.run_id, "val/acc1")
    assert 0.0 <= acc1.value <= 1.0
    (picture,) = client.list_artifacts(run.info.run_id, "pictures/val/confusion")
    assert picture.path.startswith("pictures/val/confusion/step_") and picture.path.endswith(".png")
    local = Path(client.download_artifacts(run.info.run_id, picture.path, str(tmp_path / "dl")))
    assert Image.open(local).size == Image.open(next((tmp_path / "runs").rglob("val_confusion.png"))).size

    (wandb_run,) = (tmp_path / "wandb_dir" / "wandb").glob("offline-run-*")
    assert list((wandb_run / "files" / "media" / "images" / "val").glob("confusion_*.png"))
    # the metrics are in the run's record log (what `wandb sync` uploads): HistoryItem protobufs,
    # key = field 2 (0x12, length), value_json = field 16 (0x82 0x01, length)
    (record_log,) = wandb_run.glob("run-*.wandb")
    found = re.search(rb"\x12\x08val/acc1\x82\x01(.)", record_log.read_bytes(), re.DOTALL)
    assert found is not None, "val/acc1 not in the W&B offline run"
    value = found.string[found.end() : found.end() + found.group(1)[0]]
    assert float(value) == pytest.approx(acc1.value)


@pytest.mark.parametrize(("fixture", "tag", "count"), [("detect_fasterrcnn", "predict/detections", 1),
                                                       ("segment_unet", "predict/overlay", 2)])  # fmt: skip
def test_predict_pictures_reach_tensorboard(tmp_path: Path, fixture: str, tag: str, count: int):
    """Detection's grid of drawn images and segmentation's first overlays, from a checkpoint's ``predict``."""
    import importlib

    import yaml
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from test_checkpoint_fixtures import _predict_config

    module, args = _predict_config(fixture, tmp_path)  # 2 images
    config = Path(args[2])
    cfg = yaml.safe_load(config.read_text())
    cfg["trainer"]["logger"] = [{"class_path": "pytorch_lightning.loggers.TensorBoardLogger",
                                 "init_args": {"save_dir": str(tmp_path / "tb"), "name": ""}}]  # fmt: skip
    cfg["inference"] = {"enabled": False}  # not what is tested here
    config.write_text(yaml.safe_dump(cfg))
    importlib.import_module(module).main(args)
    (events,) = (tmp_path / "tb").rglob("events.out.tfevents.*")
    acc = EventAccumulator(str(events), size_guidance={"images": 0})
    acc.Reload()
    assert acc.Tags()["images"] == [tag]
    assert len(acc.Images(tag)) == count
