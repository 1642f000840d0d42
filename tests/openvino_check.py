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


def check_openvino_detector() -> None:
    """(Run by tests/test_openvino.py in its own process.) A detector keeps its call interface (a
    list of images of any size in, a list of dicts in the images' pixels out): fp32 gives
    PyTorch's detections; int8 runs through NNCF."""
    from deploy_models import DETECTORS

    from vggbackbone import optimize_for_inference
    from vggbackbone.deploy.detector_export import match_detections

    torch.manual_seed(0)
    build, _ = DETECTORS["fasterrcnn"]
    model = build().eval()
    # 120 x 160 and 48 x 64 both resize to 96 x 128 (one graph, batch 2); 96 x 96 to another graph
    images = [torch.rand(3, 120, 160), torch.rand(3, 96, 96), torch.rand(3, 48, 64)]
    fast = optimize_for_inference(model, precision="fp32", runtime="openvino")
    got = fast(images)
    assert sorted(fast._graphs) == [(96, 96), (96, 128)]
    with torch.no_grad():  # one image per call: torchvision pads a batch to its largest image
        ref = [model([image])[0] for image in images]
    keys = ("boxes", "labels", "scores")
    for i, (g, w) in enumerate(zip(got, ref)):
        assert len(w["boxes"]) > 0
        match_detections([w[k].numpy() for k in keys], [g[k].numpy() for k in keys], "openvino fp32", f"image {i}")
    q = optimize_for_inference(model, precision="int8", runtime="openvino", calibration=[images[:2]])
    out = q(images[:1])
    assert len(out) == 1 and set(out[0]) == set(keys) and out[0]["boxes"].shape[1] == 4
    assert (out[0]["boxes"][:, 2] <= 160).all()  # in the image's pixels, not the graph's
