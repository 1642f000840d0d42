"""The former home of the ONNX exporter, kept so imports and ``python -m vggbackbone.export`` work.

The code lives in :mod:`vggbackbone.deploy` (the exporter and its check in
``deploy.onnx_export``, the command line in ``deploy.backbone_cli``); this module re-exports its
public names and runs the command line::

    python -m vggbackbone.export --arch vgg16 --taps conv3 conv4 conv5 --weights vgg16.pth --out model.onnx
"""

import sys

from .deploy.backbone_cli import build_parser, main
from .deploy.onnx_export import DEFAULT_OPSET, ExportVerificationError, export_onnx, output_names_of, verify_onnx

__all__ = [
    "DEFAULT_OPSET",
    "ExportVerificationError",
    "build_parser",
    "export_onnx",
    "main",
    "output_names_of",
    "verify_onnx",
]

if __name__ == "__main__":
    sys.exit(main())
