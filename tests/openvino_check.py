"""Helpers for the OpenVINO checks: run an exported file with OpenVINO, compare with PyTorch."""

from __future__ import annotations

import numpy as np
import pytest
import torch


def openvino_outputs(path, x: np.ndarray, precision: str = "fp32") -> list[np.ndarray]:
    """The outputs of the ONNX file ``path`` run by OpenVINO on the CPU (the test is skipped where
    openvino is not installed: it is in the dev extra)."""
    pytest.importorskip("openvino")
    from vggbackbone.deploy.openvino_runtime import compile_openvino

    compiled = compile_openvino(path, precision)
    result = compiled(x)
    return [np.asarray(result[o]) for o in compiled.outputs]


def assert_openvino_matches(path, x: torch.Tensor, refs: list[torch.Tensor], precisions=("fp32", "bf16")) -> None:
    """Each output within :data:`~vggbackbone.deploy.openvino_runtime.OPENVINO_TOLERANCE`."""
    from vggbackbone.deploy.openvino_runtime import OPENVINO_TOLERANCE

    for precision in precisions:
        got = openvino_outputs(path, x.numpy(), precision)
        assert len(got) == len(refs)
        for g, r in zip(got, refs):
            assert g.shape == tuple(r.shape)
            err = float(np.abs(g - r.numpy()).max() / r.abs().max())
            assert err < OPENVINO_TOLERANCE[precision], (path, precision, err)
