"""Classification data: the digits ImageFolder tree, the ImageFolder reader with skipped images,
grayscale reading, the transforms, and the plateau schedule."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from tasks.data.classify import (
    ClassificationDataModule,
    ImageFolderDataset,
    collate_classify,
    eval_transforms,
    train_transforms,
)
from tasks.images import SkippedSample
from tasks.optim import OptimConfig, build_optimizer, lr_scheduler_config


def _tree(root: Path, split: str, counts: dict[str, int], size: int = 20, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for cls, n in counts.items():
        (root / split / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            pixels = rng.integers(0, 256, (size, size + 4, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / split / cls / f"{cls}_{i}.png")


def test_digits_tree_is_the_sklearn_digits_split_stratified(tmp_path: Path) -> None:
    from sklearn.datasets import load_digits

    from tasks.data.digits import DigitsConfig, ensure_digits

    root = ensure_digits(tmp_path / "digits", DigitsConfig(), progress=False)
    files = {s: sorted((root / s).glob("*/*.png")) for s in ("train", "val", "test")}
    assert {s: len(f) for s, f in files.items()} == {"train": 1077, "val": 360, "test": 360}
    indices = [int(p.stem) for f in files.values() for p in f]
    assert sorted(indices) == list(range(1797))  # every image once
    digits = load_digits()
    for split in ("val", "test"):  # stratified: 36 (+-1) images of each digit
        per_class = [len(list((root / split / str(k)).glob("*.png"))) for k in range(10)]
        assert max(per_class) - min(per_class) <= 2, per_class
    for p in files["test"][:20]:  # labels are the folders, pixels the 0..16 values scaled to 0..255
        i = int(p.stem)
        assert int(p.parent.name) == digits.target[i]
        pixels = np.array(Image.open(p))
        assert Image.open(p).mode == "L" and pixels.shape == (8, 8)
        np.testing.assert_array_equal(pixels, np.rint(digits.images[i] * 255 / 16).astype(np.uint8))
    stamp = (root / "digits.json").stat().st_mtime_ns
    ensure_digits(root, DigitsConfig(), progress=False)  # same config: not written again
    assert (root / "digits.json").stat().st_mtime_ns == stamp
    assert json.loads((root / "digits.json").read_text())["counts"]["train"] == 1077


def test_image_folder_reads_grayscale_skips_bad_images_and_keeps_train_class_indices(tmp_path: Path) -> None:
    _tree(tmp_path, "train", {"cat": 3, "dog": 2, "owl": 2})
    _tree(tmp_path, "val", {"dog": 2, "owl": 1})  # no "cat" in val: allowed for evaluation
    (tmp_path / "val" / "owl" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    (tmp_path / "val" / "owl" / "notes.txt").write_text("not an image")  # not listed
    data = ClassificationDataModule(str(tmp_path), in_channels=1, image_size=16, resize_size=20, num_workers=0)
    assert data.class_names == ["cat", "dog", "owl"] and data.num_classes == 3
    data.setup("fit")
    val = data.val_set
    assert [(Path(p).name, y) for p, y in val.samples] == [
        ("dog_0.png", 1), ("dog_1.png", 1), ("broken.jpg", 2), ("owl_0.png", 2)
    ]  # fmt: skip
    items = [val[i] for i in range(len(val))]
    assert isinstance(items[2], SkippedSample) and "cannot decode" in items[2].reason
    first = items[0]
    assert first["image"].shape == (1, 16, 16) and first["image"].dtype == torch.float32
    # grayscale exactly as PIL's L conversion, then torchvision's resize + centre crop
    gray = torch.from_numpy(np.array(Image.open(tmp_path / "val/dog/dog_0.png").convert("L")))[None]
    expected = TF.center_crop(TF.resize(gray, 20, antialias=True), 16).float() / 255
    torch.testing.assert_close(first["image"], expected, rtol=0, atol=1e-6)
    batch = collate_classify(items)
    assert batch["image"].shape == (3, 1, 16, 16) and batch["label"].tolist() == [1, 1, 2]
    assert batch["skipped"] == [(str(tmp_path / "val/owl/broken.jpg"), items[2].reason)]
    assert data.train_set[0]["image"].shape == (1, 16, 16)

    _tree(tmp_path, "test", {"cat": 1, "emu": 1})
    with pytest.raises(ValueError, match=r"emu.*not among the classes"):
        ImageFolderDataset(tmp_path / "test", data.classes)
    _tree(tmp_path, "train2", {"cat": 1})
    (tmp_path / "train2" / "dog").mkdir()
    with pytest.raises(FileNotFoundError, match="dog"):  # a training class without images: torchvision's error
        ImageFolderDataset(tmp_path / "train2", ["cat", "dog"])
    with pytest.raises(ValueError, match="in_channels"):
        ClassificationDataModule(str(tmp_path), in_channels=2)


def test_transforms_sizes_and_scale_jitter_range() -> None:
    image = torch.randint(0, 256, (3, 60, 80), dtype=torch.uint8)
    torch.manual_seed(0)
    for crop in ("random_resized", "resize_crop", "scale_jitter"):
        out = train_transforms(24, crop, resize_size=28, jitter_range=(24, 40), hflip=0.5)(image)
        assert out.shape == (3, 24, 24) and out.dtype == torch.float32 and out.min() >= 0 and out.max() <= 1
    jitter = train_transforms(24, "scale_jitter", jitter_range=(24, 40), hflip=0.0).transforms[0]
    assert isinstance(jitter, v2.RandomShortestSize) and list(jitter.min_size) == list(range(24, 41))
    with pytest.raises(ValueError, match="jitter_range"):
        train_transforms(224, "scale_jitter", jitter_range=(128, 512))
    out = eval_transforms(24, 30)(image)
    torch.testing.assert_close(out, TF.center_crop(TF.resize(image, 30, antialias=True), 24).float() / 255)


def test_plateau_schedule_divides_the_lr_when_the_metric_stalls() -> None:
    model = torch.nn.Linear(2, 2)
    cfg = OptimConfig(name="sgd", lr=0.01, scheduler="plateau", plateau_monitor="val/acc1", plateau_mode="max",
                      plateau_patience=1, gamma=0.1)  # fmt: skip
    opt, sched = build_optimizer(model, cfg, total_steps=100)
    assert isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau)
    assert lr_scheduler_config(sched, cfg) == {"scheduler": sched, "interval": "epoch", "frequency": 1,
                                               "monitor": "val/acc1"}  # fmt: skip
    lrs = []
    for acc in (0.5, 0.6, 0.6, 0.6, 0.6, 0.6):
        sched.step(acc)
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs == pytest.approx([0.01, 0.01, 0.01, 0.001, 0.001, 0.0001])
    with pytest.raises(ValueError, match="warm-up"):
        build_optimizer(model, OptimConfig(scheduler="plateau", warmup_steps=5), 100)
