"""Unreadable images are counted by :class:`tasks.module.TaskModule` itself (one mechanism, training and
evaluation apart): a task whose steps never mention them still gets them reported, once per epoch and stage."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import Dataset

from tasks.datamodule import TaskDataModule
from tasks.module import TaskModule
from tasks.optim import OptimConfig
from tasks.skips import SkipCounter, SkippedSample, drop_skipped


class _Images(Dataset):
    """Four 2-pixel "images"; the ones named in ``bad`` are unreadable."""

    def __init__(self, split: str, bad: set[int]) -> None:
        self.split, self.bad = split, bad

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int):
        if i in self.bad:
            return SkippedSample(f"{self.split}/{i}.jpg", "cannot identify image file")
        return {"image": torch.full((2,), float(i)), "label": i % 2}


def _collate(items):
    kept, skipped = drop_skipped(items)
    return {
        "image": torch.stack([k["image"] for k in kept]) if kept else torch.empty(0),
        "label": torch.tensor([k["label"] for k in kept], dtype=torch.long),
        "skipped": [(s.path, s.reason) for s in skipped],
    }


class _Data(TaskDataModule):
    collate_fns = dict.fromkeys(("train", "val"), _collate)

    def __init__(self, train_bad: set[int], val_bad: set[int]) -> None:
        super().__init__(batch_size=2, num_workers=0)
        self.bad = {"train": train_bad, "val": val_bad}

    def build_dataset(self, name: str):
        return _Images(name, self.bad[name]) if name in self.bad else None


class _Task(TaskModule):
    """Its steps never mention unreadable images."""

    def __init__(self) -> None:
        super().__init__()
        self.optim = OptimConfig(scheduler="none")
        self.model = nn.Linear(2, 2)

    def training_step(self, batch, batch_idx):
        if not len(batch["label"]):
            return self.zero_loss()
        return nn.functional.cross_entropy(self.model(batch["image"]), batch["label"])

    def eval_step(self, batch) -> None:
        pass


def _fit(tmp_path, train_bad: set[int], val_bad: set[int]) -> _Task:
    task = _Task()
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(task, datamodule=_Data(train_bad, val_bad))
    return task


def test_training_and_evaluation_skips_are_counted_apart_and_reported_once(tmp_path) -> None:
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        task = _fit(tmp_path, {1}, {0, 3})
    said = [str(w.message) for w in rec if "unreadable image" in str(w.message)]
    assert said == [
        "val evaluation: skipped 2 unreadable image(s): val/0.jpg (cannot identify image file); "
        "val/3.jpg (cannot identify image file)",
        "training epoch 0: skipped 1 unreadable image(s): train/1.jpg (cannot identify image file)",
    ]
    assert task.eval_skipped == [SkippedSample("val/0.jpg", "cannot identify image file"),
                                 SkippedSample("val/3.jpg", "cannot identify image file")]  # fmt: skip
    assert task.train_skips.items == [] and task.train_skips.readable == 3  # reported, then cleared


def test_an_epoch_of_unreadable_images_is_an_error(tmp_path) -> None:
    with pytest.raises(RuntimeError, match=r"training epoch 0: every image of the training split was unreadable \(4"):
        _fit(tmp_path, {0, 1, 2, 3}, set())
    with pytest.raises(RuntimeError, match=r"val evaluation: every image of the val split was unreadable \(4 skipped"):
        _fit(tmp_path, set(), {0, 1, 2, 3})


def test_skip_counter_counts_readable_images_and_batches() -> None:
    counter = SkipCounter()
    counter.count({"image": torch.zeros(3, 2), "skipped": [("a.jpg", "empty")]})
    counter.count({"image": torch.empty(0), "skipped": [("b.jpg", "empty")]})
    assert (counter.readable, counter.batches, [s.path for s in counter.items]) == (3, 2, ["a.jpg", "b.jpg"])
    counter.count(object())  # a batch of unknown size
    assert counter.readable == -1
    counter.reset()
    assert (counter.readable, counter.batches, counter.items) == (0, 0, [])


def test_reid_training_skips_are_not_reported_as_validation_skips(tmp_path: Path) -> None:
    from tasks.data.market import MarketConfig
    from tasks.data.reid import ReIDDataModule
    from tasks.reid import ReIDTask

    tiny = MarketConfig(num_train_ids=6, num_test_ids=5, num_cameras=3, min_cameras=2, max_cameras=3,
                        max_per_camera=3, num_distractors=3, num_junk=2, height=32, width=16, seed=3)  # fmt: skip
    root = tmp_path / "market"
    dm = ReIDDataModule(root=str(root), synthetic=tiny, image_size=(32, 16), p=3, k=2, eval_batch_size=8,
                        num_workers=0, random_erasing=0.0)  # fmt: skip
    dm.prepare_data()
    train = sorted((root / "bounding_box_train").glob("*.jpg"))
    for p in train[::2]:
        p.write_bytes(b"")  # half the training crops unreadable
    query = sorted((root / "query").glob("*.jpg"))[0]
    query.write_bytes(b"")
    task = ReIDTask(arch="vgg11_bn", width_mult=0.125, grid_queries=0)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, num_sanity_val_steps=0, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(task, datamodule=dm)
    said = [str(w.message) for w in caught if "skipped" in str(w.message) and "unreadable" in str(w.message)]
    val = [m for m in said if m.startswith("val evaluation")]
    fit = [m for m in said if m.startswith("training epoch 0")]
    assert len(val) == 1 and val[0].startswith(f"val evaluation: skipped 1 unreadable image(s): {query} (")
    assert len(fit) == 1 and "bounding_box_train" in fit[0] and "query" not in fit[0]
