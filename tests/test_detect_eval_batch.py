"""Detection metrics do not depend on how evaluation images are grouped: ``eval_batch_size 2`` with
1 and 2 processes gives the same boxes and the same AP (each image is evaluated unpadded)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cli_configs import REPO, detect_config
from cli_configs import csv_versions as _versions

# images of different sizes and aspect ratios: batched, they would be padded to a common size
SIZES = ("--data.shapes.min_image_size", "40", "--data.shapes.max_image_size", "96", "--data.shapes.num_val", "5")


@pytest.mark.slow
def test_eval_batch_size_2_metrics_equal_with_1_and_2_processes(tmp_path: Path) -> None:
    cfg = detect_config(tmp_path, limit_train_batches=1)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    env["OMP_NUM_THREADS"] = "1"  # same threads, same numerics

    def run(*args: str) -> dict:
        proc = subprocess.run(
            [sys.executable, "-m", "tasks.detect", *args, "--config", str(cfg), *SIZES, "--data.eval_batch_size", "2",
             "--model.detections_file", "{stage}_detections.json", "--model.detector.box_score_thresh", "0.0"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
        run_dir = _versions(tmp_path)[-1]
        metrics = json.loads((run_dir / "val_metrics.json").read_text())
        return {"metrics": metrics, "detections": json.loads((run_dir / "val_detections.json").read_text())}

    one = run("fit")  # its validation: one process, batches of 2
    ckpt = _versions(tmp_path)[-1] / "checkpoints" / "last.ckpt"
    two = run("validate", "--ckpt_path", str(ckpt), "--trainer.devices", "2", "--trainer.strategy", "ddp")
    assert one["detections"] and one["detections"] == two["detections"]  # every box, every score
    assert one["metrics"]["images"] == two["metrics"]["images"] == 5
    for key in ("AP", "AP50", "AP75", "AR1", "AR10", "AR100"):
        assert one["metrics"][key] == two["metrics"][key], key


def test_eval_step_predictions_do_not_depend_on_the_batch() -> None:
    """Batched, torchvision pads images to a common size and the padding changes Faster R-CNN's boxes and
    scores; the evaluation step gives each image exactly what it gets alone."""
    import torch

    from tasks.data.detection import DetectionBatch
    from tasks.detect import DetectionTask

    task = DetectionTask(
        classes=["a", "b"], arch="vgg11_bn", width_mult=0.125, fpn=True, min_size=64, max_size=96,
        detector={"box_score_thresh": 0.0},
    ).eval()  # fmt: skip
    images = [torch.rand(3, 40, 96), torch.rand(3, 96, 64), torch.rand(3, 56, 48)]

    def predictions(groups: list[list[int]]) -> dict[int, dict]:
        task.eval_epoch_start("val")
        with torch.no_grad():
            for group in groups:
                targets = [{"image_id": torch.tensor(i), "boxes": torch.zeros(0, 4), "labels": torch.zeros(0)}
                           for i in group]  # fmt: skip
                task.eval_step(DetectionBatch([images[i] for i in group], targets, []))
        return task._predictions

    one_batch, alone = predictions([[0, 1, 2]]), predictions([[0], [1], [2]])
    assert sorted(one_batch) == sorted(alone) == [0, 1, 2]
    for i in range(3):
        for key in ("boxes", "scores", "labels"):
            assert (one_batch[i][key] == alone[i][key]).all(), (i, key)
