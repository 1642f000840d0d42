"""The former home of ``optimize_for_inference`` and its helpers, kept so imports keep working.

The code lives in :mod:`vggbackbone.deploy` (hardware probing in ``deploy.hardware``, the
precision choice in ``deploy.precision``, BatchNorm folding in ``deploy.batchnorm``, int8 in
``deploy.int8``, the wrapper in ``deploy.inference``); this module re-exports its public names.
The logger keeps this module's name: ``vggbackbone.optimize``.
"""

from .deploy.batchnorm import fold_batchnorm
from .deploy.hardware import (
    CPU_FEATURES,
    INT8_FEATURES,
    cpu_features,
    default_precision,
    fast_reduced_precision,
    int8_dot_product,
    int8_supported,
)
from .deploy.inference import RELATIVE_TOLERANCE, CompileMode, InferenceModule, optimize_for_inference
from .deploy.int8 import INT8_TOLERANCE, QuantizedModule, quantize_int8
from .deploy.precision import Precision, measure_precisions

__all__ = [
    "CPU_FEATURES",
    "INT8_FEATURES",
    "INT8_TOLERANCE",
    "RELATIVE_TOLERANCE",
    "CompileMode",
    "InferenceModule",
    "Precision",
    "QuantizedModule",
    "cpu_features",
    "default_precision",
    "fast_reduced_precision",
    "fold_batchnorm",
    "int8_dot_product",
    "int8_supported",
    "measure_precisions",
    "optimize_for_inference",
    "quantize_int8",
]
