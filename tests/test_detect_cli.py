"""``python -m tasks.detect``: fit, resume, validate, predict, and 2-process DDP on CPU."""

from __future__ import annotations

import json

import pytest
import torch
from cli_configs import (
    DETECT_SHAPES,
    csv_versions,
    detect_config,
    run_module,
)


def test_fit_resume_validate_predict(tmp_path) -> None:
    from tasks.detect import main

    cfg = detect_config(tmp_path)
    main(["fit", "--config", str(cfg)])
    run0 = csv_versions(tmp_path)[-1]
    last = run0 / "checkpoints" / "last.ckpt"
    fit_metrics = json.loads((run0 / "val_metrics.json").read_text())
    assert fit_metrics["images"] == DETECT_SHAPES["num_val"] and 0.0 <= fit_metrics["AP50"] <= 1.0
    ckpt = torch.load(last, map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 2 and ckpt["hyper_parameters"]["classes"] == ["circle", "square", "triangle"]

    # resume: continues at step 2 and trains one more epoch
    main(["fit", "--config", str(cfg), "--trainer.max_epochs", "2", "--ckpt_path", str(last)])
    run1 = csv_versions(tmp_path)[-1]
    resumed = torch.load(run1 / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert resumed["global_step"] == 4 and resumed["epoch"] == 1
    assert resumed["lr_schedulers"][0]["last_epoch"] == 4  # the LR schedule went on, not restarted

    # validate the checkpoint: same numbers as the validation at the end of fit
    main(["validate", "--config", str(cfg), "--ckpt_path", str(last)])
    val_metrics = json.loads((csv_versions(tmp_path)[-1] / "val_metrics.json").read_text())
    for key in ("AP", "AP50", "AP75", "AR100", "images"):
        assert val_metrics[key] == fit_metrics[key], key

    # the same data through the VOC reader adds the VOC07 numbers
    main(["validate", "--config", str(cfg), "--ckpt_path", str(last), "--data.format", "voc"])
    voc_metrics = json.loads((csv_versions(tmp_path)[-1] / "val_metrics.json").read_text())
    assert 0.0 <= voc_metrics["VOC07_mAP"] <= 1.0 and 0.0 <= voc_metrics["VOC_mAP"] <= 1.0

    # predict: COCO results JSON over the validation images and drawn pictures
    main(["predict", "--config", str(cfg), "--ckpt_path", str(last), "--writer.score_threshold", "0.0"])
    out = tmp_path / "pred"
    results = json.loads((out / "detections.json").read_text())
    images = json.loads((out / "images.json").read_text())
    gt = json.loads((tmp_path / "shapes" / "annotations" / "instances_val.json").read_text())
    assert sorted(i["id"] for i in images) == sorted(i["id"] for i in gt["images"])
    assert all(r["image_id"] in {i["id"] for i in images} and r["category_id"] in (1, 2, 3) for r in results)
    assert all(len(r["bbox"]) == 4 and 0.0 <= r["score"] <= 1.0 for r in results)
    assert len(list((out / "images").glob("*.jpg"))) == DETECT_SHAPES["num_val"]
    assert (out / "grid.jpg").stat().st_size > 0
    assert not list(out.rglob("*.tmp"))  # atomic writes leave no temp files


def test_unreadable_images_are_skipped_by_fit_and_left_out_of_the_metrics(tmp_path) -> None:
    from tasks.data.shapes import ShapesConfig, generate_shapes
    from tasks.detect import main

    root = generate_shapes(tmp_path / "shapes", ShapesConfig(**DETECT_SHAPES), progress=False)
    (root / "images" / "train" / "000001.jpg").write_bytes(b"not a jpeg")
    (root / "images" / "val" / f"{DETECT_SHAPES['num_train'] + 1:06d}.jpg").unlink()
    cfg = detect_config(tmp_path, limit_train_batches=None)  # one whole epoch: every training image is read
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable image\(s\)"):
        main(["fit", "--config", str(cfg)])
    metrics = json.loads((csv_versions(tmp_path)[-1] / "val_metrics.json").read_text())
    assert metrics["images"] == DETECT_SHAPES["num_val"] - 1


@pytest.mark.slow
def test_two_process_ddp_metrics_equal_one_process(tmp_path) -> None:
    """fit with 2 CPU processes (gloo); its final validation must equal a 1-process validate.

    (``trainer.sync_batchnorm`` is a GPU feature: PyTorch's DDP refuses SyncBatchNorm on CPU.)
    """
    cfg = detect_config(tmp_path, max_epochs=1)

    def run(*args: str) -> None:
        run_module("tasks.detect", [*args, "--config", str(cfg)])

    save = ("--model.detections_file", "{stage}_detections.json")
    run("fit", "--trainer.devices", "2", "--trainer.strategy", "ddp", *save)
    run0 = csv_versions(tmp_path)[-1]
    ddp = json.loads((run0 / "val_metrics.json").read_text())
    ddp_detections = json.loads((run0 / "val_detections.json").read_text())
    ckpt = torch.load(run0 / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 2  # 2 steps per process, gradients averaged
    run("validate", "--ckpt_path", str(run0 / "checkpoints" / "last.ckpt"), *save)
    run1 = csv_versions(tmp_path)[-1]
    single = json.loads((run1 / "val_metrics.json").read_text())
    assert ddp_detections == json.loads((run1 / "val_detections.json").read_text())  # every box, every score
    val_ids = set(range(DETECT_SHAPES["num_train"] + 1, DETECT_SHAPES["num_train"] + DETECT_SHAPES["num_val"] + 1))
    assert ddp_detections and {d["image_id"] for d in ddp_detections} <= val_ids
    assert ddp["images"] == single["images"] == DETECT_SHAPES["num_val"]  # 3 + 2 images on the two ranks, none twice
    for key in ("AP", "AP50", "AP75", "APs", "APm", "AR1", "AR10", "AR100"):
        assert ddp[key] == single[key], key
