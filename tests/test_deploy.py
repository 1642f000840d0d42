"""``vggbackbone.deploy``: the old homes still give the same objects, ``import vggbackbone`` stays
light, and the calibration recorder that the task CLIs and benchmarks share."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import vggbackbone
from vggbackbone import deploy
from vggbackbone.deploy import InputCaptured, InputRecorder

REPO = Path(__file__).resolve().parents[1]

#: Public names each old home had before the move (its ``__all__`` then, and the module-level
#: names users imported from it), which must keep working.
OLD_PUBLIC_NAMES = {
    "vggbackbone.optimize": [
        "CPU_FEATURES", "INT8_FEATURES", "INT8_TOLERANCE", "RELATIVE_TOLERANCE", "InferenceModule",
        "QuantizedModule", "cpu_features", "default_precision", "fast_reduced_precision", "fold_batchnorm",
        "int8_dot_product", "int8_supported", "measure_precisions", "optimize_for_inference", "quantize_int8",
    ],
    "vggbackbone.export": [
        "DEFAULT_OPSET", "ExportVerificationError", "build_parser", "export_onnx", "main", "output_names_of",
        "verify_onnx",
    ],
    "vggbackbone.models.export": [
        "DETECTION_OUTPUTS", "DETECTORS", "DetectorForExport", "export_detector_onnx", "export_task_onnx",
        "verify_detector_onnx",
    ],
}  # fmt: skip


@pytest.mark.parametrize("old_home", sorted(OLD_PUBLIC_NAMES))
def test_old_homes_give_the_deploy_objects(old_home: str) -> None:
    face = importlib.import_module(old_home)
    for name in OLD_PUBLIC_NAMES[old_home]:
        obj = getattr(face, name)
        if name in deploy.__all__:
            assert obj is getattr(deploy, name), f"{old_home}.{name} is not vggbackbone.deploy.{name}"
        elif callable(obj) and hasattr(obj, "__module__"):
            assert obj.__module__.startswith("vggbackbone.deploy."), f"{old_home}.{name} lives in {obj.__module__}"
    assert set(OLD_PUBLIC_NAMES[old_home]) <= set(face.__all__)
    for name in ("InferenceModule", "fold_batchnorm", "optimize_for_inference"):
        assert getattr(vggbackbone, name) is getattr(deploy, name)


def test_import_vggbackbone_imports_no_exporter_runtime() -> None:
    # torchvision, onnx, onnxruntime and torchao are imported where a model is exported or
    # quantised, not by ``import vggbackbone`` (the deploy modules all load with it)
    code = (
        "import sys, vggbackbone\n"
        "assert 'vggbackbone.deploy.detector_export' in sys.modules\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torchvision', 'onnx', 'onnxruntime', 'torchao'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_input_recorder_keeps_the_input_and_stops_the_caller() -> None:
    recorder = InputRecorder()
    images = [torch.rand(3, 8, 10), torch.rand(3, 12, 6)]

    def predict_step(model: torch.nn.Module) -> str:
        model(images)
        return "ran past the model"

    with pytest.raises(InputCaptured):
        predict_step(recorder)
    assert recorder.inputs == [images]
    with pytest.raises(TypeError, match=r"model\(batch\), but the task called it with 1 positional and \['mask'\]"):
        recorder(images, mask=None)
    assert len(recorder.inputs) == 1
