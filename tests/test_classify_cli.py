"""``python -m tasks.classify`` end to end: 2-process DDP fit (+ test after fit) vs a 1-process
validation of the same checkpoint, the predict CSV against the metrics, and ONNX export."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from cli_configs import CLASSIFY_CLASSES as CLASSES
from cli_configs import classify_config, classify_tree

REPO = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")  # same threads everywhere: equal sums
    proc = subprocess.run(
        [sys.executable, "-m", "tasks.classify", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, f"{args}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-5000:]}"
    return proc


@pytest.mark.slow
def test_ddp_two_processes_equal_one_process_predict_csv_and_export(tmp_path: Path) -> None:
    classify_tree(tmp_path / "tree")
    cfg = classify_config(tmp_path)
    fit = _run("fit", "--config", str(cfg), "--trainer.strategy", "ddp", "--trainer.devices", "2")
    assert "MEMBER: 2/2" in fit.stdout + fit.stderr  # really two processes
    assert "acc1" in fit.stdout and "skipped 1 unreadable image" in fit.stderr
    run = tmp_path / "runs" / "version_0"
    two = json.loads((run / "val_metrics.json").read_text())
    after = json.loads((run / "test_metrics.json").read_text())  # fit ended with test (on val here)
    assert (run / "val_confusion.png").is_file() and (run / "test_confusion.png").is_file()
    ckpt = run / "checkpoints" / "last.ckpt"

    _run("validate", "--config", str(cfg), "--ckpt_path", str(ckpt), "--trainer.devices", "1")
    one = json.loads((tmp_path / "runs" / "version_1" / "val_metrics.json").read_text())
    conf = np.array(one["confusion_matrix"])
    assert conf.sum() == one["num_images"] == two["num_images"] == 9  # each readable image once
    assert conf.sum(1).tolist() == [2, 1, 2, 1, 2, 1] and one["num_skipped"] == two["num_skipped"] == 1
    assert two["confusion_matrix"] == one["confusion_matrix"] == after["confusion_matrix"]
    for key in ("acc1", "acc5", "mean_class_acc"):
        assert two[key] == one[key] == after[key], key
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-5)
    assert one["acc1"] == pytest.approx(np.trace(conf) / 9)
    per_class = [one["per_class_acc"][c] for c in CLASSES]
    np.testing.assert_allclose(per_class, np.diag(conf) / conf.sum(1))

    _run("predict", "--config", str(cfg), "--ckpt_path", str(ckpt), "--trainer.devices", "1",
         "--inference.precision", "fp32")  # fmt: skip
    rows = list(csv.reader((tmp_path / "pred.csv").open()))
    assert rows[0] == ["path"] + [f"{c}{j}" for j in range(1, 6) for c in ("label", "score")] + ["path_hex"]
    rows = rows[1:]
    assert len(rows) == 9 and all(Path(r[0]).is_file() for r in rows)
    truth = [Path(r[0]).parent.name for r in rows]
    scores = np.array([[float(s) for s in r[2::2]] for r in rows])
    assert (np.diff(scores, axis=1) <= 0).all() and (scores.sum(1) <= 1 + 1e-5).all()
    # the CSV, written from predict, agrees with the metrics computed by validate
    top1 = np.mean([r[1] == t for r, t in zip(rows, truth)])
    top5 = np.mean([t in r[1::2] for r, t in zip(rows, truth)])
    assert top1 == pytest.approx(one["acc1"]) and top5 == pytest.approx(one["acc5"])

    _run("export", "--ckpt", str(ckpt), "--out", str(tmp_path / "model.onnx"), "--height", "16", "--width", "16")
    assert (tmp_path / "model.onnx").stat().st_size > 0  # checked against onnxruntime by the export command


def test_exportable_classifier_pools_like_torch_at_every_size() -> None:
    """The export form of the linear head (the 7x7 adaptive pool as matrix products) gives the
    model's logits at sizes whose pool5 is smaller, equal to or larger than 7x7 and not divisible."""
    import torch
    import torch.nn.functional as F

    from tasks.classify import ExportableClassifier, adaptive_avg_pool_matrix
    from vggbackbone.models import vgg_classifier

    for h, w in ((1, 1), (2, 3), (7, 7), (12, 20), (9, 16)):
        x = torch.randn(2, 3, h, w)
        pooled = torch.einsum(
            "oh,nchw,pw->ncop", adaptive_avg_pool_matrix(h, 7, x), x, adaptive_avg_pool_matrix(w, 7, x)
        )
        torch.testing.assert_close(pooled, F.adaptive_avg_pool2d(x, 7))
    model = vgg_classifier([[1, 8], [1, 16]], 6, in_channels=1, fc_channels=32).eval()
    export = ExportableClassifier(model).eval()
    for size in ((16, 16), (48, 80), (20, 36)):
        x = torch.rand(2, 1, *size)
        torch.testing.assert_close(export(x), model(x))
