"""Everything after training: from a trained model to a fast or exported one.

One module per concern:

============================  ==================================================================
``deploy.hardware``           what the device runs fast: CPU features (AMX, AVX512-BF16, VNNI),
                              int8 kernels, fast reduced precisions
``deploy.precision``          ``precision=`` checked and resolved (``"auto"`` times a probe conv)
``deploy.batchnorm``          BatchNorm folded into the preceding conv/linear
``deploy.calibration``        the inputs int8 calibrates on (``InputRecorder``, submodule inputs)
``deploy.int8``               static int8 of the VGG backbones (torchao PT2E, x86 inductor)
``deploy.inference``          ``optimize_for_inference`` and its ``InferenceModule``
``deploy.onnx_export``        ONNX export of one-batch-in models (backbones, segmentation, ReID),
                              verified with onnxruntime; ``ExportVerificationError``
``deploy.detector_export``    ONNX export of torchvision's detectors, detections checked as a set
``deploy.batched_detector``   a detector as one batched graph (fixed size, NMS inside, padded)
``deploy.batched_nms``        per-image NMS / top-k over a flat batch of candidates
``deploy.batched_export``     its ONNX export, checked at batch 1, 2 and 5
``deploy.openvino_runtime``   OpenVINO as a runtime: compile, NNCF int8, ``OpenVINOModule``
``deploy.openvino_files``     ``require_openvino``, ``save_openvino`` (``.xml`` + ``.bin``)
``deploy.openvino_cli``       ``python -m vggbackbone.deploy.openvino_cli`` (ONNX to OpenVINO)
``deploy.task_export``        ``export_task_onnx``: any task model to the right exporter
``deploy.backbone_cli``       ``python -m vggbackbone.export``
============================  ==================================================================

Nothing here imports torchvision, onnx or onnxruntime before it is used, so ``import
vggbackbone`` stays light. The old homes :mod:`vggbackbone.optimize`,
:mod:`vggbackbone.export` and :mod:`vggbackbone.models.export` re-export these names.
"""

from .batched_detector import BATCHED_OUTPUTS, BatchedDetector, resize_for_graph
from .batched_export import export_batched_detector_onnx, verify_batched_detector
from .batchnorm import fold_batchnorm
from .calibration import InputCaptured, InputRecorder, record_submodule_inputs
from .detector_export import DetectorForExport, export_detector_onnx, verify_detector_onnx
from .hardware import (
    CPU_FEATURES,
    INT8_FEATURES,
    cpu_features,
    default_precision,
    fast_reduced_precision,
    int8_dot_product,
    int8_supported,
)
from .inference import RELATIVE_TOLERANCE, InferenceModule, optimize_for_inference
from .int8 import INT8_TOLERANCE, QuantizedModule, quantization_targets, quantize_int8
from .onnx_export import DEFAULT_OPSET, ExportVerificationError, export_onnx, output_names_of, verify_onnx
from .openvino_runtime import OPENVINO_TOLERANCE, OpenVINOModule, compile_openvino, quantize_openvino
from .precision import measure_precisions
from .task_export import export_task_onnx

__all__ = [
    "BATCHED_OUTPUTS",
    "CPU_FEATURES",
    "DEFAULT_OPSET",
    "INT8_FEATURES",
    "INT8_TOLERANCE",
    "OPENVINO_TOLERANCE",
    "RELATIVE_TOLERANCE",
    "BatchedDetector",
    "DetectorForExport",
    "ExportVerificationError",
    "InferenceModule",
    "InputCaptured",
    "InputRecorder",
    "OpenVINOModule",
    "QuantizedModule",
    "compile_openvino",
    "cpu_features",
    "default_precision",
    "export_batched_detector_onnx",
    "export_detector_onnx",
    "export_onnx",
    "export_task_onnx",
    "fast_reduced_precision",
    "fold_batchnorm",
    "int8_dot_product",
    "int8_supported",
    "measure_precisions",
    "optimize_for_inference",
    "output_names_of",
    "quantization_targets",
    "quantize_int8",
    "quantize_openvino",
    "record_submodule_inputs",
    "resize_for_graph",
    "verify_batched_detector",
    "verify_detector_onnx",
    "verify_onnx",
]
