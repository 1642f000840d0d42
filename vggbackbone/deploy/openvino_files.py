"""OpenVINO's package and its model files: :func:`require_openvino` (an ``ImportError`` saying what to
install) and :func:`save_openvino` (``.xml`` + ``.bin``, renamed into place). Imports nothing of
this package, so the exporters and the OpenVINO runtime can both use it."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["require_openvino", "save_openvino"]


def require_openvino() -> Any:
    """``openvino``, or ``ImportError`` saying how to install it."""
    try:
        import openvino
    except ImportError as e:
        raise ImportError("runtime='openvino' needs OpenVINO: pip install 'vggbackbone[openvino]'") from e
    return openvino


def save_openvino(model: object, out: str | os.PathLike[str]) -> Path:
    """``openvino.Model`` saved as ``out`` (``.xml``) and its ``.bin``, weights as they are (no fp16
    compression), through temporary files renamed into place."""
    ov = require_openvino()
    out = Path(out)
    if out.suffix != ".xml":
        raise ValueError(f"{out}: an OpenVINO model is written as a .xml file (and its .bin)")
    with tempfile.TemporaryDirectory(prefix=".ov-", dir=out.parent) as tmp:
        xml = Path(tmp) / out.name
        ov.save_model(model, str(xml), compress_to_fp16=False)
        os.replace(xml.with_suffix(".bin"), out.with_suffix(".bin"))
        os.replace(xml, out)
    return out
