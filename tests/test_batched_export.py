"""Batched detector export: one graph, dynamic batch, post-processing inside, padded outputs;
checked with onnxruntime at batch 1, 2 and 5 against the torchvision model, image by image."""

from __future__ import annotations

import numpy as np
import onnxruntime
import pytest
import torch
from deploy_models import DETECTORS
from openvino_check import openvino_outputs

from vggbackbone.deploy import BatchedDetector, ExportVerificationError, export_batched_detector_onnx
from vggbackbone.deploy.batched_export import onnxruntime_runner, verify_batched_detector


@pytest.mark.parametrize("family", list(DETECTORS))
def test_batched_export_matches_torchvision_at_batch_1_2_5(tmp_path, family) -> None:
    torch.manual_seed(0)
    build, size = DETECTORS[family]
    model = build().eval()
    path = export_batched_detector_onnx(model, tmp_path / f"{family}.onnx", size)  # checked at 1, 2, 5 inside
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.shape for i in session.get_inputs()] == [["batch", 3, *size]]
    meta = session.get_modelmeta().custom_metadata_map
    assert meta["input_size"] == f"{size[0]}x{size[1]}"
    images = torch.rand(3, 3, *size)
    boxes, labels, scores, count = session.run(None, {"images": images.numpy()})
    slots = model.roi_heads.detections_per_img if family.startswith("fasterrcnn") else model.detections_per_img
    assert boxes.shape == (3, slots, 4) and labels.shape == scores.shape == (3, slots) and count.dtype == np.int64
    with torch.no_grad():
        want = model(list(images))
    assert count.tolist() == [len(w["boxes"]) for w in want] and count.min() > 0
    for i, w in enumerate(want):  # best first, same scores, padding zero
        k = int(count[i])
        np.testing.assert_allclose(scores[i, :k], w["scores"].numpy(), rtol=1e-4, atol=1e-5)
        assert (np.diff(scores[i, :k]) <= 1e-6).all() and not scores[i, k:].any() and not boxes[i, k:].any()
    # OpenVINO reads the same file and gives the same detections (fp32), at two batch sizes
    for batch in (2, 5):
        run = lambda a: openvino_outputs(path, a)  # noqa: E731
        verify_batched_detector(run, model, torch.rand(batch, 3, *size), name=path, runtime="openvino")


def test_batched_check_fails_on_another_model(tmp_path) -> None:
    torch.manual_seed(0)
    build, size = DETECTORS["fasterrcnn"]
    path = export_batched_detector_onnx(build().eval(), tmp_path / "a.onnx", size, verify_batch_sizes=(2,))
    torch.manual_seed(1)
    with pytest.raises(ExportVerificationError, match="no onnxruntime match|detections in onnxruntime"):
        verify_batched_detector(onnxruntime_runner(path), build().eval(), torch.rand(2, 3, *size), name=path)


def test_batched_detector_refuses_a_size_the_model_resizes() -> None:
    build, _ = DETECTORS["fasterrcnn"]
    with pytest.raises(ValueError, match="resizes a 100x100 image to 96x96"):
        BatchedDetector(build().eval(), (100, 100))
    with pytest.raises(TypeError, match="FasterRCNN, SSD, RetinaNet or FCOS"):
        BatchedDetector(torch.nn.Linear(2, 2), (96, 128))


def test_max_detections_cuts_each_image_to_its_best() -> None:
    torch.manual_seed(0)
    build, size = DETECTORS["retinanet"]
    model = build().eval()
    images = torch.rand(2, 3, *size)
    with torch.no_grad():
        boxes, _, scores, count = BatchedDetector(model, size, max_detections=5)(images)
        want = model(list(images))
    assert boxes.shape == (2, 5, 4) and count.tolist() == [5, 5]
    for i in range(2):
        torch.testing.assert_close(scores[i], want[i]["scores"][:5])
