"""OpenVINO as a tested target: every exported model read by ``openvino.Core`` gives our outputs
within the stated tolerances (here: the classifier; the backbone, segmentation and ReID files in
tests/test_export.py and tests/test_optimize_tasks.py, the one-image Faster R-CNN files there too,
the batched detectors in tests/test_batched_export.py, the one-image SSD below), and
``optimize_for_inference(..., runtime="openvino")`` keeps the model's call interface."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ov = pytest.importorskip("openvino")  # the openvino extra (in dev): skipped only where it is not installed

from deploy_models import DETECTORS, randomize_batchnorm, rel_err  # noqa: E402
from openvino_check import assert_openvino_matches  # noqa: E402

from vggbackbone import VGGBackbone, optimize_for_inference  # noqa: E402
from vggbackbone.deploy import export_batched_detector_onnx, export_task_onnx  # noqa: E402
from vggbackbone.deploy.batched_export import verify_batched_detector  # noqa: E402
from vggbackbone.deploy.detector_export import match_detections  # noqa: E402
from vggbackbone.deploy.openvino_runtime import OPENVINO_TOLERANCE, compile_openvino, openvino_config  # noqa: E402
from vggbackbone.models import vgg_classifier  # noqa: E402


def _outputs(compiled, x: np.ndarray) -> list[np.ndarray]:
    result = compiled(x)
    return [np.asarray(result[o]) for o in compiled.outputs]


def test_classifier_read_by_openvino(tmp_path) -> None:
    """The backbone, segmentation and ReID files are read by OpenVINO in tests/test_export.py and
    tests/test_optimize_tasks.py, beside their onnxruntime checks."""
    torch.manual_seed(0)
    model = vgg_classifier("vgg11", num_classes=5, width_mult=0.125, fc_channels=32).eval()
    path = export_task_onnx(model, tmp_path / "classifier.onnx", torch.rand(1, 3, 64, 64), verify=False)
    x = torch.rand(3, 3, 80, 64)
    with torch.no_grad():
        ref = model(x)
    assert_openvino_matches(path, x, [ref])


def test_openvino_config_hints() -> None:
    assert openvino_config("fp32", 2) == {"INFERENCE_NUM_THREADS": 2, "INFERENCE_PRECISION_HINT": "f32"}
    assert openvino_config("bf16", 1)["INFERENCE_PRECISION_HINT"] == "bf16"
    assert "INFERENCE_PRECISION_HINT" not in openvino_config("default", 1)
    with pytest.raises(ValueError, match="must be one of"):
        openvino_config("fp16")


def test_optimize_for_inference_openvino_keeps_the_call_interface(caplog) -> None:
    torch.manual_seed(0)
    backbone = randomize_batchnorm(VGGBackbone("vgg11_bn", ["conv3", "conv5"], width_mult=0.125)).eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        ref = backbone(x)
    calibration = [torch.rand(2, 3, 64, 64) for _ in range(3)]
    with caplog.at_level(logging.INFO, logger="vggbackbone.optimize"):
        fast = optimize_for_inference(backbone, precision="auto", runtime="openvino", calibration=calibration)
    assert fast.precision == "int8" and "picked int8 (calibration given" in caplog.text
    fast(torch.rand(1, 3, 96, 64))  # converted here: dynamic batch and size after
    out = fast(x)
    assert list(out) == ["conv3", "conv5"] and fast.out_channels == backbone.out_channels
    for k in out:
        assert out[k].dtype == torch.float32 and out[k].shape == ref[k].shape
        assert rel_err(out[k], ref[k]) < OPENVINO_TOLERANCE["int8"]
    with pytest.raises(RuntimeError, match="cannot be trained"):
        fast.train()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="vggbackbone.optimize"):
        assert optimize_for_inference(backbone, runtime="openvino").precision == "default"
    assert "picked default (no calibration given" in caplog.text
    with pytest.raises(ValueError, match="'auto', 'fp32', 'bf16', 'default', 'int8'"):
        optimize_for_inference(backbone, precision="fp16", runtime="openvino")
    with pytest.raises(ValueError, match="needs runtime='openvino'"):
        optimize_for_inference(backbone, precision="default")


def test_optimize_for_inference_openvino_detector() -> None:
    """A detector keeps its call interface through OpenVINO, fp32 and int8
    (:func:`openvino_check.check_openvino_detector`), run in a fresh process so that OpenVINO's
    threads and state stay out of the pytest worker (where a signal stack OpenVINO left behind
    once crashed the in-process signal tests: vggbackbone/deploy/signal_stack.py)."""
    tests = Path(__file__).resolve().parent
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(tests.parent), str(tests), os.environ.get("PYTHONPATH", "")]),
    }
    code = "from openvino_check import check_openvino_detector; check_openvino_detector()"
    done = subprocess.run([sys.executable, "-c", code], cwd=tests.parent, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


def test_openvino_cli_fp32_and_int8_from_an_exported_file(tmp_path, capsys) -> None:
    from PIL import Image

    from vggbackbone.deploy.openvino_cli import main

    torch.manual_seed(0)
    build, size = DETECTORS["fasterrcnn"]
    model = build().eval()
    onnx_path = export_batched_detector_onnx(model, tmp_path / "det.onnx", size, verify_batch_sizes=())
    xml = main([str(onnx_path), "--out", str(tmp_path / "det.xml")])
    assert xml.is_file() and xml.with_suffix(".bin").is_file() and "(fp32)" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["det.bin", "det.onnx", "det.xml"]  # no temporary left
    images = torch.rand(2, 3, *size)
    verify_batched_detector(lambda a: _outputs(compile_openvino(xml), a), model, images, runtime="openvino IR")
    folder = tmp_path / "calib"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    q = main([str(onnx_path), "--out", str(tmp_path / "q.xml"), "--calibration-images", str(folder)])
    assert "(int8)" in capsys.readouterr().out
    types = {op.get_type_name() for op in ov.Core().read_model(str(q)).get_ops()}
    assert "FakeQuantize" in types  # NNCF's int8 quantisation nodes
    boxes, _, _, count = _outputs(compile_openvino(q), images.numpy())
    assert boxes.shape[0] == 2 and count.shape == (2,)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        main([str(onnx_path), "--out", str(tmp_path / "x.xml"), "--calibration-images", str(tmp_path / "empty")])


def test_task_export_to_openvino_xml(tmp_path) -> None:
    """``export_task_onnx(..., "model.xml")`` (``python -m tasks.<task> export --out model.xml``)."""
    torch.manual_seed(0)
    build, size = DETECTORS["ssd"]
    model = build().eval()
    xml = export_task_onnx(model, tmp_path / "ssd.xml", torch.rand(3, *size))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ssd.bin", "ssd.xml"]
    image = torch.rand(3, *size)
    with torch.no_grad():
        ref = model([image])[0]
    want = [ref[k].numpy() for k in ("boxes", "labels", "scores")]
    match_detections(want, _outputs(compile_openvino(xml), image.numpy()), xml, "one image", runtime="openvino")


def test_runtime_auto_picks_openvino_where_it_applies_and_says_why(caplog, monkeypatch) -> None:
    """``runtime="auto"``: OpenVINO (the fastest route measured, docs/benchmarks.md) on the CPU when
    installed; torch where it does not apply, each reason logged."""
    import importlib.util

    from tasks.callbacks import InferenceOptimization
    from vggbackbone.deploy.openvino_runtime import OpenVINOModule
    from vggbackbone.deploy.precision import resolve_runtime

    torch.manual_seed(0)
    backbone = randomize_batchnorm(VGGBackbone("vgg11_bn", ["conv5"], width_mult=0.125)).eval()
    x = torch.rand(2, 3, 64, 64)
    cpu = torch.device("cpu")
    with caplog.at_level(logging.INFO, logger="vggbackbone.optimize"):
        fast = optimize_for_inference(backbone, precision="fp32", runtime="auto")
    assert isinstance(fast, OpenVINOModule) and "runtime='auto' picked openvino" in caplog.text
    with torch.no_grad():
        assert rel_err(fast(x)["conv5"], backbone(x)["conv5"]) < OPENVINO_TOLERANCE["fp32"]
    cases = [
        ((torch.device("cuda"), "auto", False), "the model is on cuda"),
        ((cpu, "auto", True), "compile= was asked for"),
        ((cpu, "fp16", False), "precision='fp16'"),
    ]
    for args, why in cases:
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="vggbackbone.optimize"):
            assert resolve_runtime("auto", *args) == "torch"
        assert why in caplog.text
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "openvino" else find_spec(name))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="vggbackbone.optimize"):
        assert resolve_runtime("auto", cpu, "auto", False) == "torch"
    assert "openvino package is not installed" in caplog.text
    assert resolve_runtime("openvino", cpu, "auto", False) == "openvino"  # explicit choices stand
    with pytest.raises(ValueError, match="runtime must be 'auto', 'torch' or 'openvino'"):
        resolve_runtime("onnxruntime", cpu, "auto", False)
    with pytest.raises(ValueError, match="inference.runtime must be torch, openvino or auto"):
        InferenceOptimization(runtime="onnxruntime")  # type: ignore[arg-type]


def test_openvino_leaves_the_thread_its_signal_stack(tmp_path) -> None:
    """OpenVINO's compile_model (and NNCF, which compiles) install an alternate signal stack on the
    calling thread that they later unmap; a signal handled there then crashed the process. Our
    compile and quantise calls give the thread its own stack back (vggbackbone/deploy/signal_stack.py)."""
    from vggbackbone.deploy.openvino_runtime import quantize_openvino
    from vggbackbone.deploy.signal_stack import signal_stack

    before = signal_stack()
    if before is None:
        pytest.skip("sigaltstack is read on Linux only")
    torch.manual_seed(0)
    model = VGGBackbone("vgg11", ["conv2"], width_mult=0.125).eval()
    path = export_task_onnx(model, tmp_path / "b.onnx", torch.rand(1, 3, 32, 32))
    compiled = compile_openvino(path, "fp32")
    compiled(np.random.rand(1, 3, 32, 32).astype(np.float32))
    assert signal_stack() == before
    quantized = quantize_openvino(ov.Core().read_model(str(path)), [np.random.rand(1, 3, 32, 32).astype(np.float32)])
    compile_openvino(quantized, "int8")
    assert signal_stack() == before
