"""The former home of the task-model ONNX export, kept so imports keep working.

The code lives in :mod:`vggbackbone.deploy` (``deploy.task_export`` for
:func:`export_task_onnx`, ``deploy.detector_export`` for the detectors); this module re-exports
its public names.
"""

from ..deploy.detector_export import (
    DETECTION_OUTPUTS,
    DetectorForExport,
    export_detector_onnx,
    torchvision_detector_types,
    verify_detector_onnx,
)
from ..deploy.task_export import export_task_onnx

#: torchvision's detector classes (what :func:`export_detector_onnx` exports).
DETECTORS = torchvision_detector_types()

__all__ = [
    "DETECTION_OUTPUTS",
    "DETECTORS",
    "DetectorForExport",
    "export_detector_onnx",
    "export_task_onnx",
    "verify_detector_onnx",
]
