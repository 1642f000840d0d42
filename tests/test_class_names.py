"""Class names travel with the model (:mod:`tasks.classes`): a checkpoint's classes are the truth.

Data whose classes are the checkpoint's in another order or numbering is mapped by name (one
printed line says so) and gives the numbers of the correctly numbered data; any other set is
refused, naming the difference. Real CLI runs per task on tiny models: a 1-step ``fit`` makes
the checkpoint, then ``validate``/``predict``/``fit --ckpt_path``/``export`` read re-numbered data.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_configs import REPO, csv_versions, fasterrcnn_fpn_model, quick_trainer, shapes_data, write_config
from PIL import Image

from tasks.checkpoint import read_checkpoint
from tasks.classes import ClassMismatchError, ClassSet, check_classes


def _cli(task: str, *args: str, ok: bool = True) -> subprocess.CompletedProcess:
    """``python -m tasks.<task> args`` from the repository; ``ok``: must exit 0 (else: must fail)."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", f"tasks.{task}", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    tail = f"{list(args)}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-4000:]}"
    assert (proc.returncode == 0) == ok, tail
    return proc


# ---------------------------------------------------------------------------- check_classes
def test_same_names_same_order_need_no_mapping() -> None:
    model = ClassSet(("cat", "dog"), "the checkpoint c.ckpt", category_ids=(1, 2))
    assert check_classes(model, ClassSet(("cat", "dog"), "val.json", category_ids=(1, 2))) is None
    assert check_classes(model, ClassSet(("cat", "dog"), "data.classes")) is None  # no ids on one side: names only


def test_another_order_is_mapped_by_name_and_said() -> None:
    model = ClassSet(("background", "cat", "dog", "fox"), "the checkpoint c.ckpt", ignore_index=255)
    cmap = check_classes(model, ClassSet(("background", "fox", "cat", "dog"), "data.classes", ignore_index=255))
    assert cmap is not None and cmap.index == (0, 3, 1, 2)
    assert cmap.note == (
        "data.classes orders its classes differently from the checkpoint c.ckpt: mapped by name: "
        "fox 1->3, cat 2->1, dog 3->2"
    )
    mask = torch.tensor([[0, 1, 2], [3, 255, 1]])
    assert cmap.apply(mask, ignore_index=255).tolist() == [[0, 3, 1], [2, 255, 3]]  # 255 (ignore) stays
    assert cmap.apply(torch.tensor([1, -1, 3])).tolist() == [3, -1, 2]  # -1 (unlabelled) stays


def test_coco_numbering_is_mapped_by_name_with_category_ids() -> None:
    model = ClassSet(("cat", "dog"), "the checkpoint c.ckpt", category_ids=(1, 2))
    data = ClassSet(("dog", "cat"), "instances_val.json", category_ids=(1, 3))  # labels by sorted id: dog 1, cat 3
    cmap = check_classes(model, data)
    assert cmap is not None and cmap.index == (1, 0) and cmap.category_ids == (3, 1)
    assert cmap.note == (
        "instances_val.json numbers categories differently from the checkpoint c.ckpt: mapped by name: "
        "dog 1->2, cat 3->1"
    )
    assert cmap.apply(torch.tensor([1, 2, 0]), offset=1).tolist() == [2, 1, 0]  # detection: 0 is background
    # same order, other ids: labels stay, the file's ids are what evaluation and predict write
    same = check_classes(model, ClassSet(("cat", "dog"), "v.json", category_ids=(5, 7)))
    assert same is not None and same.is_identity and same.category_ids == (5, 7)


def test_other_names_are_refused_naming_both_sides() -> None:
    model = ClassSet(("cat", "dog", "fox"), "the checkpoint c.ckpt")
    with pytest.raises(ClassMismatchError) as e:
        check_classes(model, ClassSet(("cat", "dog", "wolf", "owl"), "val.json"))
    msg = str(e.value)
    assert "val.json has other classes than the checkpoint c.ckpt" in msg
    assert "1 missing from the data: [fox]" in msg and "2 unknown to the model: [wolf, owl]" in msg
    with pytest.raises(
        ClassMismatchError, match=r"data.classes: the name\(s\) \[dog\] appear more than once among its classes"
    ):
        check_classes(model, ClassSet(("cat", "dog", "dog"), "data.classes"))
    with pytest.raises(ClassMismatchError, match="marks unlabelled pixels with 0, the checkpoint c.ckpt with 255"):
        check_classes(
            ClassSet(("a", "b"), "the checkpoint c.ckpt", ignore_index=255), ClassSet(("a", "b"), "d", 0, None, 0)
        )
    with pytest.raises(ClassMismatchError, match="has 3 identities, the checkpoint c.ckpt has 4"):
        check_classes(
            ClassSet(None, "the checkpoint c.ckpt", 4, kind="identities"),
            ClassSet(("1", "2", "5"), "x", kind="identities"),
        )


def test_a_mismatch_found_in_setup_is_raised_when_the_stage_starts_unless_a_checkpoint_replaces_the_classes() -> None:
    from types import SimpleNamespace

    from tasks.classes import ClassesMixin, adopt_checkpoint_classes, announce, meet_data

    class Task(ClassesMixin):
        names = ("cat", "dog")

        def class_set(self) -> ClassSet:
            return ClassSet(self.names, self.classes_source("the model"))

        def data_class_set(self, datamodule, name: str) -> ClassSet:
            return ClassSet(datamodule.names, f"{name} data")

        def adopt_class_set(self, classes: ClassSet) -> None:
            self.names = classes.names

    trainer = SimpleNamespace(datamodule=SimpleNamespace(names=("dog", "fox")), is_global_zero=True, ckpt_path=None)
    task = Task()
    task._trainer = trainer
    meet_data(task, "validate", defer=True)  # setup: the model's classes may still be replaced
    with pytest.raises(ClassMismatchError, match=r"val data has other classes than the model \(1 missing"):
        announce(task)

    meet_data(task, "validate", defer=True)
    trainer.state = SimpleNamespace(fn="validate")
    trainer.ckpt_path = "c.ckpt"
    adopt_checkpoint_classes(task, {"classes": {"kind": "classes", "size": 2, "names": ["fox", "dog"]}})
    announce(task)  # the checkpoint's classes fit the data: nothing raised, the mapping is in place
    assert task.names == ("fox", "dog") and task.class_map("val").index == (1, 0)
    assert task.class_set().source == "the checkpoint c.ckpt"


def test_a_checkpoint_written_before_the_record_is_read_from_its_hyper_parameters() -> None:
    from tasks.classify import ClassificationTask

    task = ClassificationTask(num_classes=3, class_names=["b", "c", "a"], arch=[[1, 4]], fc_channels=8)
    old = {"hyper_parameters": {"num_classes": 3, "class_names": ["a", "b", "c"]}, "state_dict": {}}
    task.on_load_checkpoint(old)  # no trainer, no data: the checkpoint's classes become the model's
    assert task.class_names == ["a", "b", "c"] and task.hparams["class_names"] == ["a", "b", "c"]
    assert task.class_set().source == "the checkpoint"
    saved: dict = {"state_dict": {}}
    task.on_save_checkpoint(saved)
    assert saved["classes"] == {"kind": "classes", "size": 3, "names": ["a", "b", "c"]}


# ---------------------------------------------------------------------------- detection
DET_SHAPES = {"num_train": 4, "num_val": 6, "min_image_size": 64, "max_image_size": 64, "max_objects": 3,
              "min_object_size": 20, "max_object_size": 40, "seed": 1}  # fmt: skip


def _renumbered(src: Path, dst: Path, new_id: dict[int, int], rename: dict[str, str] | None = None) -> Path:
    """A copy of the COCO file ``src`` whose categories have other ids (and names), annotations following."""
    data = json.loads(src.read_text())
    data["categories"] = [
        {**c, "id": new_id[c["id"]], "name": (rename or {}).get(c["name"], c["name"])} for c in data["categories"]
    ]
    data["annotations"] = [{**a, "category_id": new_id[a["category_id"]]} for a in data["annotations"]]
    dst.write_text(json.dumps(data))
    return dst


def _named(detections: list[dict], ann_file: Path) -> list[tuple]:
    """Detections as ``(image, class name, score, box)`` with the names of ``ann_file``'s category ids."""
    names = {c["id"]: c["name"] for c in json.loads(ann_file.read_text())["categories"]}
    return sorted(
        (d["image_id"], names[d["category_id"]], round(d["score"], 5), *np.round(d["bbox"], 3).tolist())
        for d in detections
    )


@pytest.mark.slow
def test_detection_val_file_numbered_otherwise_is_mapped_or_refused(tmp_path: Path) -> None:
    cfg = {
        "seed_everything": 0,
        "trainer": quick_trainer(tmp_path, devices=1, limit_train_batches=1),
        "model": fasterrcnn_fpn_model(width_mult=0.125, warmup_steps=2) | {"detections_file": "{stage}_det.json"},
        "data": shapes_data(tmp_path / "shapes", DET_SHAPES, eval_batch_size=1),
        "writer": {"output_dir": str(tmp_path / "pred")},
    }
    config = str(write_config(cfg, tmp_path / "detect.yaml"))
    _cli("detect", "fit", "--config", config)
    run = csv_versions(tmp_path)[-1]
    ckpt = run / "checkpoints" / "last.ckpt"
    record = read_checkpoint(ckpt)["classes"]
    assert record["names"] == ["circle", "square", "triangle"] and record["category_ids"] == [1, 2, 3]
    val = tmp_path / "shapes" / "annotations" / "instances_val.json"
    truth = json.loads((run / "val_metrics.json").read_text())
    truth_det = _named(json.loads((run / "val_det.json").read_text()), val)
    assert truth_det  # the model detects something: the names below are checked box by box

    # one fit whose training file numbers the categories otherwise than the validation file (the
    # model's classes): its boxes are mapped by name, and the run trains exactly as on the original
    train = tmp_path / "shapes" / "annotations" / "instances_train.json"
    renum_train = _renumbered(train, tmp_path / "renum_train.json", {1: 3, 2: 1, 3: 2})
    out = _cli("detect", "fit", "--config", config, "--data.train_ann", str(renum_train), "--data.shapes", "null")
    assert f"{renum_train} numbers categories differently from the model (model.classes): mapped by name" in out.stdout
    again = read_checkpoint(csv_versions(tmp_path)[-1] / "checkpoints" / "last.ckpt")["state_dict"]
    for key, value in read_checkpoint(ckpt)["state_dict"].items():
        assert torch.equal(value, again[key]), key

    # the same boxes, categories numbered circle 3, square 1, triangle 2 (labels in another order too)
    renum = _renumbered(val, tmp_path / "renum.json", {1: 3, 2: 1, 3: 2})
    out = _cli("detect", "validate", "--config", config, "--ckpt_path", str(ckpt), "--data.val_ann", str(renum))
    assert f"{renum} numbers categories differently from the checkpoint {ckpt}: mapped by name: " in out.stdout
    assert "square 1->2, triangle 2->3, circle 3->1" in out.stdout
    mapped = json.loads((csv_versions(tmp_path)[-1] / "val_metrics.json").read_text())
    for key in ("AP", "AP50", "AP75", "AR100", "images"):
        assert mapped[key] == pytest.approx(truth[key], rel=1e-9, abs=1e-12), key
    for name, ap in truth["per_class"]["COCO AP"].items():
        assert mapped["per_class"]["COCO AP"][name] == pytest.approx(ap, rel=1e-9, abs=1e-12), name
    # the detections written carry the re-numbered file's ids: by name, the same detections
    assert _named(json.loads((csv_versions(tmp_path)[-1] / "val_det.json").read_text()), renum) == truth_det

    # predict on the validation images writes that file's category ids as well
    _cli("detect", "predict", "--config", config, "--ckpt_path", str(ckpt), "--data.val_ann", str(renum),
         "--inference.enabled", "false", "--writer.draw", "false")  # fmt: skip
    predicted = _named(json.loads((tmp_path / "pred" / "detections.json").read_text()), renum)
    assert {(i, n, s) for i, n, s, *_ in predicted} == {(i, n, s) for i, n, s, *_ in truth_det}

    # export (the detector's own ONNX route, in this process): names and category ids in metadata_props
    import onnx

    from tasks.cli import export_main
    from tasks.detect import DetectionTask

    onnx_file = tmp_path / "detector.onnx"
    export_main(DetectionTask, "detect", ["--ckpt", str(ckpt), "--out", str(onnx_file), "--height", "64",
                                          "--width", "64", "--no-verify"])  # fmt: skip
    props = {p.key: p.value for p in onnx.load(str(onnx_file)).metadata_props}
    assert json.loads(props["classes"])["names"] == ["circle", "square", "triangle"]
    assert json.loads(props["classes"])["category_ids"] == [1, 2, 3]

    # another set of names is refused, naming the file and the difference
    renamed = _renumbered(val, tmp_path / "renamed.json", {1: 1, 2: 2, 3: 3}, {"circle": "disc"})
    bad = _cli("detect", "validate", "--config", config, "--ckpt_path", str(ckpt), "--data.val_ann", str(renamed),
               ok=False)  # fmt: skip
    assert f"{renamed} has other classes than the checkpoint {ckpt}" in bad.stderr
    assert "1 missing from the data: [circle]; 1 unknown to the model: [disc]" in bad.stderr


# ---------------------------------------------------------------------------- segmentation
SEG_SHAPES = {"num_train": 4, "num_val": 4, "min_image_size": 40, "max_image_size": 48, "min_object_size": 12,
              "max_object_size": 24, "seed": 2}  # fmt: skip


def _renumbered_voc(src: Path, dst: Path, lut: dict[int, int]) -> None:
    """A copy of the VOC tree ``src`` whose mask values are changed by ``lut`` (others kept)."""
    shutil.copytree(src, dst)
    table = np.arange(256, dtype=np.uint8)
    for old, new in lut.items():
        table[old] = new
    for png in (dst / "VOCdevkit/VOC2007/SegmentationClass").glob("*.png"):
        mask = Image.open(png)
        out = Image.fromarray(table[np.array(mask)], mode="P")
        out.putpalette(mask.getpalette())
        out.save(png)


@pytest.mark.slow
def test_segmentation_classes_in_another_order_are_mapped_or_refused(tmp_path: Path) -> None:
    cfg = {
        "seed_everything": 0,
        "trainer": quick_trainer(tmp_path, logger="seg", limit_train_batches=1),
        "model": {"head": "unet", "arch": "vgg11_bn", "width_mult": 0.125, "decoder_channels": [16, 16, 8, 8, 8],
                  "predict_dir": str(tmp_path / "predict"), "optim": {"name": "adamw", "lr": 0.001}},
        "data": shapes_data(tmp_path / "shapes", SEG_SHAPES, layout="voc", crop_size=40),
    }  # fmt: skip
    config = str(write_config(cfg, tmp_path / "seg.yaml"))
    _cli("segment", "fit", "--config", config)
    run = csv_versions(tmp_path, "seg")[-1]
    ckpt = run / "checkpoints" / "last.ckpt"
    record = read_checkpoint(ckpt)["classes"]
    assert record["names"] == ["background", "circle", "square", "triangle"] and record["ignore_index"] == 255
    truth = json.loads((run / "val_metrics.json").read_text())
    assert len({truth[f"IoU/{n}"] for n in ("circle", "square", "triangle")}) == 3  # distinct: a swap would show

    # the same masks with circle and square swapped (values 1 <-> 2), declared so in data.classes
    _renumbered_voc(tmp_path / "shapes", tmp_path / "swapped", {1: 2, 2: 1})
    data = ["--data.root", str(tmp_path / "swapped"), "--data.shapes", "null"]
    out = _cli("segment", "validate", "--config", config, "--ckpt_path", str(ckpt), *data,
               "--data.classes", "[background, square, circle, triangle]")  # fmt: skip
    assert f"data.classes orders its classes differently from the checkpoint {ckpt}: mapped by name: " in out.stdout
    mapped = json.loads((csv_versions(tmp_path, "seg")[-1] / "val_metrics.json").read_text())
    assert mapped["confusion_matrix"] == truth["confusion_matrix"]  # rows and columns: the checkpoint's classes
    for key in ("mIoU", "pixel_acc", "IoU/circle", "IoU/square", "IoU/triangle"):
        assert mapped[key] == truth[key], key

    bad = _cli("segment", "validate", "--config", config, "--ckpt_path", str(ckpt), *data,
               "--data.classes", "[background, square, circle, star]", ok=False)  # fmt: skip
    assert f"data.classes has other classes than the checkpoint {ckpt}" in bad.stderr
    assert "missing from the data: [triangle]; 1 unknown to the model: [star]" in bad.stderr


# ---------------------------------------------------------------------------- classification
def _folders(root: Path) -> None:
    """An ImageFolder tree, classes a, b, c with 1, 2, 3 validation images (a relabelling changes accuracy)."""
    rng = np.random.default_rng(0)
    for split, counts in (("train", (3, 3, 3)), ("val", (1, 2, 3))):
        for k, (cls, n) in enumerate(zip("abc", counts)):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                pixels = np.full((16, 16), 70 * k, np.uint8) + rng.integers(0, 40, (16, 16), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / cls / f"{i}.png")


@pytest.mark.slow
def test_classification_classes_in_another_order_are_mapped_or_refused(tmp_path: Path) -> None:
    _folders(tmp_path / "tree")
    cfg = {
        "seed_everything": 0,
        "trainer": quick_trainer(tmp_path, limit_train_batches=1),
        "model": {"arch": [[1, 8], [1, 16]], "fc_channels": 32, "dropout": 0.0, "top_k": 1,
                  "predict_file": str(tmp_path / "pred.csv"),
                  "optim": {"name": "adamw", "lr": 0.01, "scheduler": "none"}},
        "data": {"root": str(tmp_path / "tree"), "test_split": "val", "in_channels": 1, "image_size": 16,
                 "resize_size": 16, "train_crop": "resize_crop", "hflip": 0.0, "batch_size": 3, "num_workers": 0},
        "test_after_fit": {"enabled": False},
    }  # fmt: skip
    config = str(write_config(cfg, tmp_path / "classify.yaml"))
    _cli("classify", "fit", "--config", config)
    run = csv_versions(tmp_path)[-1]
    ckpt = run / "checkpoints" / "last.ckpt"
    assert read_checkpoint(ckpt)["classes"]["names"] == ["a", "b", "c"]
    truth = json.loads((run / "val_metrics.json").read_text())
    cycled = ["--data.classes", "[b, c, a]"]  # no class keeps its index

    out = _cli("classify", "validate", "--config", config, "--ckpt_path", str(ckpt), *cycled)
    assert f"data.classes orders its classes differently from the checkpoint {ckpt}: mapped by name: " in out.stdout
    assert "b 0->1, c 1->2, a 2->0" in out.stdout
    mapped = json.loads((csv_versions(tmp_path)[-1] / "val_metrics.json").read_text())
    assert mapped["class_names"] == ["a", "b", "c"] and mapped["confusion_matrix"] == truth["confusion_matrix"]
    assert mapped["per_class_acc"] == truth["per_class_acc"] and mapped["acc1"] == truth["acc1"]

    # predict: the CSV's labels are the checkpoint's names, whatever order data.classes lists
    _cli("classify", "predict", "--config", config, "--ckpt_path", str(ckpt), *cycled, "--inference.enabled", "false")
    rows = list(csv.reader((tmp_path / "pred.csv").open()))[1:]
    assert len(rows) == 6
    top1 = np.mean([r[1] == Path(r[0]).parent.name for r in rows])
    assert top1 == pytest.approx(truth["acc1"])

    # fit from the checkpoint on the re-ordered data trains exactly as on the data in the checkpoint's order
    more = ["--trainer.max_epochs", "2", "--ckpt_path", str(ckpt)]
    _cli("classify", "fit", "--config", config, *more)
    _cli("classify", "fit", "--config", config, *more, *cycled)
    plain, reordered = (read_checkpoint(v / "checkpoints" / "last.ckpt") for v in csv_versions(tmp_path)[-2:])
    assert reordered["classes"]["names"] == ["a", "b", "c"]
    assert reordered["hyper_parameters"]["class_names"] == ["a", "b", "c"]
    for key, value in plain["state_dict"].items():
        assert torch.equal(value, reordered["state_dict"][key]), key

    bad = _cli("classify", "validate", "--config", config, "--ckpt_path", str(ckpt), "--data.classes", "[a, b, c, d]",
               ok=False)  # fmt: skip
    assert f"data.classes has other classes than the checkpoint {ckpt} (1 unknown to the model: [d])" in bad.stderr

    # export (python -m tasks.classify export, in this process): the ONNX file says what its outputs are
    import onnx

    from tasks.classify import ClassificationTask
    from tasks.cli import export_main

    onnx_file = tmp_path / "model.onnx"
    export_main(ClassificationTask, "classify", ["--ckpt", str(ckpt), "--out", str(onnx_file), "--height", "16",
                                                 "--width", "16", "--no-verify"])  # fmt: skip
    props = {p.key: p.value for p in onnx.load(str(onnx_file)).metadata_props}
    assert json.loads(props["classes"]) == {"kind": "classes", "size": 3, "names": ["a", "b", "c"]}


# ---------------------------------------------------------------------------- ReID
def _market(seed: int) -> dict[str, object]:
    return {"num_train_ids": 4, "num_test_ids": 3, "num_cameras": 2, "min_cameras": 2, "max_cameras": 2,
            "max_per_camera": 2, "num_distractors": 1, "num_junk": 1, "height": 32, "width": 16,
            "seed": seed}  # fmt: skip


@pytest.mark.slow
def test_reid_fit_from_a_checkpoint_needs_its_training_identities(tmp_path: Path) -> None:
    cfg = {
        "seed_everything": 0,
        "trainer": quick_trainer(tmp_path, limit_train_batches=1, limit_val_batches=0),
        # optim given (a fit --ckpt_path whose config leaves model.optim to the checkpoint fails to parse it today)
        "model": {"arch": "vgg11_bn", "width_mult": 0.125, "grid_queries": 0, "optim": {"name": "adam", "lr": 1e-3}},
        "data": {"root": str(tmp_path / "market"), "synthetic": _market(3), "image_size": [32, 16], "p": 2, "k": 2,
                 "num_workers": 0, "random_erasing": 0.0, "pad": 0},
    }  # fmt: skip
    config = str(write_config(cfg, tmp_path / "reid.yaml"))
    _cli("reid", "fit", "--config", config)
    ckpt = csv_versions(tmp_path)[-1] / "checkpoints" / "last.ckpt"
    record = read_checkpoint(ckpt)["classes"]
    spec = json.loads((tmp_path / "market" / "market.json").read_text())
    assert record["kind"] == "identities" and record["names"] == [str(p) for p in spec["train_pids"]]

    more = ["--trainer.max_epochs", "2", "--ckpt_path", str(ckpt)]
    _cli("reid", "fit", "--config", config, *more)  # the same identities: training goes on

    # as many identities, other people: the classifier's rows would mean someone else
    other = ["--data.root", str(tmp_path / "other"), "--data.synthetic", json.dumps(_market(4))]
    bad = _cli("reid", "fit", "--config", config, *more, *other, ok=False)
    assert f"the training identities of {tmp_path / 'other' / 'bounding_box_train'} has other identities than " in (
        bad.stderr
    )
    assert f"the checkpoint {ckpt}" in bad.stderr and "missing from the data" in bad.stderr
