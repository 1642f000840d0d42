"""Every recipe of ``configs/`` runs as shipped on a tiny tree in its real data layout.

Each case builds the recipe's dataset layout (:mod:`tests.recipe_trees`) under a temporary
working directory at the recipe's own ``data.root`` (``configs/`` is linked there, so relative
paths such as FCN's ``configs/segment/lists/seg11valid.txt`` resolve as they do from the
repository root), then runs ``python -m tasks.<task> fit`` on the shipped YAML with overrides
for size only (width, image size, one step, CPU, no workers, no weight download), and ``test``
on the ``last.ckpt`` it wrote, so both the training and the reported split are read. A renamed
key, a wrong path or a reader that cannot read the real layout fails here.

To add a recipe: one :class:`Recipe` entry in :data:`RECIPES` (its YAML, task, tree builder
and size overrides).
"""

from __future__ import annotations

import importlib
import json
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.recipe_trees import (
    make_ade20k_tree,
    make_cityscapes_tree,
    make_coco_tree,
    make_imagefolder_tree,
    make_market_tree,
    make_sbd_tree,
    make_voc_tree,
)

REPO = Path(__file__).resolve().parents[1]

#: Overrides every case takes: CPU, one process, no progress bar, no loader workers.
COMMON: tuple[str, ...] = (
    "--trainer.accelerator=cpu",
    "--trainer.devices=1",
    "--trainer.strategy=auto",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--data.num_workers=0",
)

#: The option naming pretrained weights, set to null in every case: no download in tests.
NO_WEIGHTS: dict[str, str] = {"classify": "--model.weights=null"}  # other tasks: weights_backbone

#: A detector small enough for CPU: 1/16 width, 64-96 px images, few proposals.
DETECT_SIZE: tuple[str, ...] = (
    "--model.width_mult=0.0625",
    "--model.min_size=64",
    "--model.max_size=96",
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=1",
    "--trainer.limit_test_batches=2",
)


#: SSD resizes to its fixed 300 x 300 inside (no min_size): width and steps only.
SSD_SIZE: tuple[str, ...] = (
    "--model.width_mult=0.0625",
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=1",
    "--trainer.limit_test_batches=2",
    "--data.batch_size=2",  # the recipes batch 32 (VOC) or 4 per GPU: more than a tiny tree holds
    "--data.eval_batch_size=2",
)

#: U-Net on a 1/16-width VGG for the 64-128 px trees: small crops, one step, a 64 px window.
SEG_SIZE: tuple[str, ...] = (
    "--model.width_mult=0.0625",
    "--model.decoder_channels=[16, 16, 8, 8, 8]",
    "--model.window=64",
    "--trainer.precision=32-true",
    "--data.crop_size=32",
    "--data.scale_size=64",
    "--data.batch_size=2",
    "--trainer.max_steps=1",
    "--trainer.limit_test_batches=2",
)


@dataclass(frozen=True)
class Recipe:
    """One shipped recipe and how to run it tiny.

    Args:
        config: the YAML, relative to the repository root.
        task: the ``tasks.<task>`` module whose ``main`` is the CLI.
        build: writes the recipe's data tree; called with the working directory (the YAML's
            relative ``data.root`` is under it).
        size: overrides for size only (width, image size, steps, limits).
        metric: the number ``test`` must report (finite) in ``test_metrics.json``; ``None``:
            do not run ``test`` on the ``last.ckpt`` of ``fit``.
    """

    config: str
    task: str
    build: Callable[[Path], object]
    size: Sequence[str]
    metric: str | None = None


RECIPES: list[Recipe] = [
    Recipe(
        "configs/detect/voc07_vgg16.yaml", "detect", lambda cwd: make_voc_tree(cwd / "data"), DETECT_SIZE, "VOC07_mAP"
    ),
    Recipe(
        "configs/detect/coco_vgg16.yaml", "detect", lambda cwd: make_coco_tree(cwd / "data/coco"), DETECT_SIZE, "AP"
    ),
    Recipe(
        "configs/detect/ssd300_voc0712.yaml", "detect", lambda cwd: make_voc_tree(cwd / "data"), SSD_SIZE, "VOC07_mAP"
    ),
    Recipe("configs/detect/ssd300_coco.yaml", "detect", lambda cwd: make_coco_tree(cwd / "data/coco"), SSD_SIZE, "AP"),
    Recipe(
        "configs/segment/voc_fcn8s.yaml",
        "segment",
        lambda cwd: make_sbd_tree(cwd / "data"),
        ("--model.width_mult=0.0625", "--trainer.max_steps=1", "--trainer.limit_test_batches=2"),
        "mIoU",
    ),
    Recipe(
        "configs/segment/cityscapes.yaml",
        "segment",
        lambda cwd: make_cityscapes_tree(cwd / "data/cityscapes"),
        SEG_SIZE,
        "mIoU",
    ),
    Recipe("configs/segment/ade20k.yaml", "segment", lambda cwd: make_ade20k_tree(cwd / "data/ade"), SEG_SIZE, "mIoU"),
    Recipe(
        "configs/reid/market1501_vgg16.yaml",
        "reid",
        lambda cwd: make_market_tree(cwd / "data/market1501"),
        (
            "--model.width_mult=0.0625",
            "--data.image_size=[64, 32]",
            "--data.p=2",
            "--data.k=2",
            "--data.eval_batch_size=8",
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=1",
        ),
        "mAP",
    ),
    Recipe(
        "configs/classify/d2l_vgg11.yaml",
        "classify",
        lambda cwd: make_imagefolder_tree(
            cwd / "data/fashion_mnist", ("train", "test"), ("0_T-shirt-top", "1_Trouser", "9_Ankle-boot"), 2, (28, 28)
        ),
        (
            "--model.width_mult=0.0625",
            "--model.fc_channels=64",
            "--data.image_size=32",
            "--data.resize_size=32",
            "--data.batch_size=4",
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=1",
        ),
        "acc1",
    ),
    Recipe(
        "configs/classify/imagenet_vgg16.yaml",
        "classify",
        lambda cwd: make_imagefolder_tree(cwd / "data/imagenet", ("train", "val"), per_class=3, size=(48, 64)),
        (
            "--model.width_mult=0.0625",
            "--data.image_size=32",
            "--data.resize_size=36",
            "--data.jitter_range=[36, 48]",
            "--data.batch_size=4",
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=1",
        ),
        "acc1",
    ),
]


def _run(task: str, args: list[str]) -> None:
    importlib.import_module(f"tasks.{task}").main(args)


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.config.removeprefix("configs/") for r in RECIPES])
def test_recipe_runs_on_its_layout(recipe: Recipe, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shipped = yaml.safe_load((REPO / recipe.config).read_text())
    (tmp_path / "configs").symlink_to(REPO / "configs", target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    recipe.build(tmp_path)

    overrides = [*COMMON, NO_WEIGHTS.get(recipe.task, "--model.weights_backbone=null"), *recipe.size]
    _run(recipe.task, ["fit", "--config", recipe.config, *overrides])

    root = tmp_path / shipped["trainer"]["default_root_dir"]  # the recipe's own run folder
    last = sorted(root.rglob("last.ckpt"))
    assert len(last) == 1, f"fit wrote {last} under {root}"
    if shipped.get("checkpoint", {}).get("save_top_k") == 0:  # no "best" checkpoint chosen on the reported split
        assert not list(root.rglob("best-*.ckpt"))
    if recipe.metric is None:
        return
    _run(recipe.task, ["test", "--config", recipe.config, *overrides, "--ckpt_path", str(last[0])])
    reports = sorted(root.rglob("test_metrics.json"))
    assert reports, f"test wrote no test_metrics.json under {root}"
    metrics = json.loads(reports[-1].read_text())
    value = metrics.get(recipe.metric)
    assert isinstance(value, float) and math.isfinite(value), f"test reported {recipe.metric}={value!r}: {metrics}"


@pytest.mark.parametrize(
    "config", sorted((REPO / "configs").glob("*/*.yaml")), ids=lambda p: f"{p.parent.name}/{p.stem}"
)
def test_every_shipped_config_parses(config: Path, capsys, monkeypatch) -> None:
    """Each config is valid for its task's CLI as shipped (the paper recipes need real data and GPUs to run)."""
    import importlib

    import yaml

    monkeypatch.setattr(sys, "argv", ["python -m tasks"])  # the CLI reads args=, not pytest's argv
    main = importlib.import_module(f"tasks.{config.parent.name}").main  # configs/<task>/
    with pytest.raises(SystemExit) as done:
        main(["fit", "--config", str(config), "--print_config"])
    assert done.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    shipped = yaml.safe_load(config.read_text())
    assert printed["model"]["arch"] == shipped.get("model", {}).get("arch", printed["model"]["arch"])
    for section in ("model", "data", "trainer"):  # what the file sets is what the CLI got
        for key, value in (shipped.get(section) or {}).items():
            if not isinstance(value, (dict, list)):
                assert printed[section][key] == value, f"{section}.{key}"
