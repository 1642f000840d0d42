"""Inference through the task CLIs on real (tiny, 2-step) checkpoints.

* ``python -m tasks.segment export``: the ONNX graph holds the task's input normalisation
  (``[0, 1]`` images in) and has a dynamic batch and image size: onnxruntime on another batch
  size and image size equals the task's ``forward``.
* The off-switches of the inference optimisation (``--inference.enabled false`` on
  ``predict``, ``--optimize false`` on ``python -m tasks.reid extract``) really run the plain
  model (equal to it within 1e-5), and with the optimisation on in fp32 the outputs stay
  within 1e-4 of it.

``reid_run`` (a 2-step ReID checkpoint) is a fixture of conftest.py; what ran is recorded by
:mod:`inference_probe`.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from inference_probe import embed_directly, plain_reid_model, record_arg

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


def _python_m(module: str, *args: str) -> subprocess.CompletedProcess:
    """``python -m <module> args`` from the repository, with this folder importable (for the callback)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), str(TESTS), os.environ.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, (
        f"{module} {args}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-5000:]}"
    )
    return proc


def _max_abs(a: Any, b: Any) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


# ------------------------------------------------------------------------------ segmentation export
def test_segment_export_cli_holds_the_normalisation_and_dynamic_shapes(tmp_path: Path) -> None:
    import onnxruntime as ort
    from cli_configs import run_module, segment_config

    from tasks.segment import SegmentationTask, main

    cfg = segment_config(tmp_path)
    main(["fit", "--config", str(cfg), "--trainer.limit_val_batches", "0"])  # 2 training steps
    ckpt = tmp_path / "runs/seg/version_0/checkpoints/last.ckpt"
    assert ckpt.is_file()

    out = tmp_path / "seg.onnx"
    proc = run_module(
        "tasks.segment", ["export", "--ckpt", str(ckpt), "--out", str(out), "--height", "48", "--width", "64"]
    )
    assert f"-> {out}" in proc.stdout and out.is_file()

    task = SegmentationTask.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True).eval()
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = torch.rand(3, 3, 40, 72)  # [0, 1] images; another batch size and image size than the export's 1x48x64
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        want = task(x)  # the task's forward: the model normalises [0, 1] images itself
        norm, task.model.input_norm = task.model.input_norm, torch.nn.Identity()
        unnormalised = task.model(x)  # the same net without its normalisation
        task.model.input_norm = norm
    assert got.shape == tuple(want.shape) == (3, task.num_classes, 40, 72)
    scale = float(want.abs().max())
    assert _max_abs(got, want) <= 1e-4 * scale, (_max_abs(got, want), scale)
    # the normalisation is inside the graph: without it the net gives clearly other logits
    assert _max_abs(got, unnormalised) > 100 * 1e-4 * scale


# ------------------------------------------------------------------------------ ReID: off-switches
@pytest.mark.parametrize(
    ("switch", "expect_model", "tol"),
    [
        (["--inference.enabled", "false"], "ReIDNet:plain", 1e-5),
        (["--inference.enabled", "true", "--inference.precision", "fp32"], "InferenceModule:fp32", 1e-4),
        pytest.param(
            # auto: OpenVINO where installed (the same module as --inference.runtime openvino)
            ["--inference.runtime", "auto", "--inference.precision", "fp32"],
            "OpenVINOModule:fp32",
            1e-4,
            marks=pytest.mark.skipif(importlib.util.find_spec("openvino") is None, reason="openvino not installed"),
        ),
    ],
    ids=["off", "fp32", "openvino-auto"],
)
def test_reid_predict_inference_switch(
    reid_run: dict[str, Path], switch: list[str], expect_model: str, tol: float
) -> None:
    from tasks.reid import main

    record = reid_run["tmp"] / f"predict_{expect_model.split(':')[1]}.pt"
    main(
        [
            "predict",
            "--config",
            str(reid_run["cfg"]),
            "--ckpt_path",
            str(reid_run["ckpt"]),
            *switch,
            "--writer.output_dir",  # the embeddings file predict writes
            str(reid_run["tmp"] / f"predict_{expect_model.split(':')[1]}"),
            record_arg(record),
        ]
    )
    rec = torch.load(record, weights_only=True)
    assert rec["models"] == [expect_model]  # the switch decided which model ran
    with torch.no_grad():
        want = plain_reid_model(reid_run["ckpt"])(rec["images"])
    assert rec["embeddings"].shape == want.shape and len(want) > 0
    assert _max_abs(rec["embeddings"], want) <= tol


@pytest.mark.parametrize(
    ("switch", "expect_model", "tol"),
    [(["--optimize", "false"], "ReIDNet:plain", 1e-5), (["--precision", "fp32"], "InferenceModule:fp32", 1e-4)],
    ids=["off", "fp32"],
)
def test_reid_extract_cli_optimize_switch(
    reid_run: dict[str, Path], switch: list[str], expect_model: str, tol: float
) -> None:
    from tasks.reid_extract import load_embeddings

    name = expect_model.split(":")[1]
    out, record = reid_run["tmp"] / f"extract_{name}.npz", reid_run["tmp"] / f"extract_{name}.pt"
    _python_m(
        "tasks.reid", "extract", "--ckpt", str(reid_run["ckpt"]), "--images", str(reid_run["images"]),
        "--out", str(out), "--batch_size", "4", "--num_workers", "0", *switch, record_arg(record),
    )  # fmt: skip
    assert torch.load(record, weights_only=True)["models"] == [expect_model]
    d = load_embeddings(out)
    files = [reid_run["images"] / p for p in d["paths"]]
    assert len(files) == len(list(reid_run["images"].glob("*.jpg"))) > 0
    want = embed_directly(plain_reid_model(reid_run["ckpt"]), files)
    assert d["embeddings"].shape == want.shape
    assert _max_abs(d["embeddings"], want) <= tol
