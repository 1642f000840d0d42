"""optimize_for_inference and ONNX export on the task models (small widths, small images)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from deploy_models import randomize_batchnorm, rel_err
from openvino_check import assert_openvino_matches, openvino_outputs
from torch import nn

from vggbackbone import optimize_for_inference
from vggbackbone.deploy.detector_export import match_detections
from vggbackbone.models import fasterrcnn_vgg, fcn_vgg, reid_vgg, unet_vgg
from vggbackbone.models.export import export_task_onnx
from vggbackbone.optimize import RELATIVE_TOLERANCE


def dense_models() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    models = {
        "fcn8s": fcn_vgg("vgg11_bn", num_classes=3, variant="8s", width_mult=0.125, fc_channels=32),
        "unet": unet_vgg("vgg11_bn", num_classes=3, width_mult=0.125, decoder_channels=(32, 16, 16, 8, 8)),
        "reid": reid_vgg("vgg11_bn", num_classes=5, width_mult=0.125),
    }
    return {k: randomize_batchnorm(m).eval() for k, m in models.items()}


def detector(fpn: bool) -> nn.Module:
    torch.manual_seed(0)
    det = fasterrcnn_vgg(
        "vgg11_bn", num_classes=3, width_mult=0.125, fpn=fpn, min_size=64, max_size=96, box_detections_per_img=10
    )
    return randomize_batchnorm(det).eval()


@pytest.mark.parametrize("name", ["fcn8s", "unet", "reid"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_dense_task_models_within_tolerance(name: str, precision: str) -> None:
    model = dense_models()[name]
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bf16 warns on CPUs without AMX/AVX512-BF16
        fast = optimize_for_inference(model, precision=precision)
    out = fast(x)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert fast.folded_batchnorms >= 8  # every backbone BN (and smp's decoder BNs for the U-Net)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.model.modules())
    assert rel_err(out, ref) < RELATIVE_TOLERANCE[precision]


@pytest.mark.parametrize("fpn", [False, True])
def test_detector_fp32_same_detections(fpn: bool) -> None:
    det = detector(fpn)
    images = [torch.rand(3, 64, 80), torch.rand(3, 72, 64)]
    with torch.no_grad():
        ref = det(images)
    fast = optimize_for_inference(det, precision="fp32")
    assert fast.folded_batchnorms == 8
    out = fast(images)
    assert any(len(r["boxes"]) for r in ref)  # the comparison compares something
    for o, r in zip(out, ref):
        assert torch.equal(o["labels"], r["labels"])
        torch.testing.assert_close(o["boxes"], r["boxes"], rtol=0, atol=1e-3)
        torch.testing.assert_close(o["scores"], r["scores"], rtol=0, atol=1e-4)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("name", ["fcn8s", "unet", "reid"])
def test_dense_task_models_export_to_onnx(tmp_path: Path, name: str) -> None:
    import onnxruntime as ort

    model = dense_models()[name]
    path = export_task_onnx(model, tmp_path / f"{name}.onnx", torch.rand(1, 3, 64, 64))  # verified inside
    x = torch.rand(2, 3, 96, 64)  # another batch, size and aspect ratio than the example
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"images": x.numpy()})[0]
    with torch.no_grad():
        want = model(x)
    assert got.shape == tuple(want.shape)
    assert rel_err(torch.from_numpy(got), want) < 1e-4
    assert_openvino_matches(path, x, [want])  # OpenVINO reads the same file: fp32 and bf16


@pytest.mark.parametrize("fpn", [False, True], ids=["classic", "fpn"])
def test_detector_exports_to_onnx(tmp_path: Path, fpn: bool) -> None:
    import onnxruntime as ort

    det = detector(fpn=fpn)
    path = export_task_onnx(det, tmp_path / "det.onnx", torch.rand(3, 64, 80))  # verified on 2 sizes inside
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["boxes", "labels", "scores"]
    (inp,) = session.get_inputs()
    assert inp.name == "image" and len(inp.shape) == 3 and inp.shape[0] == 3  # one image per call
    assert all(isinstance(d, str) for d in inp.shape[1:]), inp.shape  # dynamic H, W
    for image in [torch.rand(3, 100, 70), torch.rand(3, 64, 120)]:  # sizes other than the example
        boxes, labels, scores = session.run(None, {"image": image.numpy()})
        with torch.no_grad():
            ref = det([image])[0]
        assert len(boxes) == len(ref["boxes"]) > 0
        assert (labels == ref["labels"].numpy()).all()
        torch.testing.assert_close(torch.from_numpy(boxes), ref["boxes"], rtol=0, atol=1e-3)
        torch.testing.assert_close(torch.from_numpy(scores), ref["scores"], rtol=0, atol=1e-4)
        want = (ref["boxes"].numpy(), ref["labels"].numpy(), ref["scores"].numpy())
        match_detections(want, openvino_outputs(path, image.numpy()), path, "image", runtime="openvino")
    assert det.training is False and not (tmp_path / "det.onnx.tmp").exists()
    if fpn:  # the FPN graph really holds the pyramid (several RoIAlign levels), not the classic head
        import onnx

        ops = [n.op_type for n in onnx.load(str(path)).graph.node]
        assert ops.count("RoiAlign") >= 3, ops.count("RoiAlign")
