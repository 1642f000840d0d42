"""optimize_for_inference: BN folding exactness, per-precision tolerance, task-model shaped inputs."""

from __future__ import annotations

import warnings
from collections import OrderedDict

import pytest
import torch
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from vggbackbone import InferenceModule, VGGBackbone, fold_batchnorm, optimize_for_inference
from vggbackbone import optimize as opt
from vggbackbone.deploy import precision as precision_choice
from vggbackbone.deploy.inference import _compile_options
from vggbackbone.optimize import RELATIVE_TOLERANCE, default_precision


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref).abs().max() / ref.abs().max()).item()


def randomize_batchnorm(model: nn.Module) -> nn.Module:
    """Non-trivial running statistics and affine parameters, so folding has something to fold."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, (nn.modules.batchnorm._BatchNorm, FrozenBatchNorm2d)):
            n = m.running_mean.numel()
            m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=g) - 0.5)
    return model


def small_vgg_bn(**kwargs) -> VGGBackbone:
    """VGG-A with BN at 1/8 width (8..64 channels): every block, cheap."""
    return randomize_batchnorm(VGGBackbone("vgg11_bn", width_mult=0.125, **kwargs)).eval()


def count(model: nn.Module, kind: type | tuple[type, ...]) -> int:
    return sum(isinstance(m, kind) for m in model.modules())


@pytest.mark.parametrize("norm_layer", [nn.BatchNorm2d, FrozenBatchNorm2d])
def test_bn_folding_is_exact_in_fp32(norm_layer: type) -> None:
    model = small_vgg_bn(norm_layer=norm_layer)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
    n_bn = count(model, norm_layer)
    assert n_bn == 8
    folded = fold_batchnorm(model)
    assert folded == n_bn
    assert count(model, norm_layer) == 0
    with torch.no_grad():
        out = model(x)
    assert list(out) == list(ref)
    for k in ref:
        assert rel_err(out[k], ref[k]) < 1e-5, k


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_precision_within_documented_tolerance(precision: str) -> None:
    model = small_vgg_bn()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # reduced precision warns on CPUs without AMX/AVX512-BF16
        fast = optimize_for_inference(model, precision=precision)
    assert isinstance(fast, InferenceModule) and not fast.training
    assert fast.precision == precision and fast.folded_batchnorms == 8
    out = fast(x)
    assert list(out) == list(ref)
    errs = {k: rel_err(out[k], ref[k]) for k in ref}
    for k, v in out.items():
        assert v.dtype == torch.float32 and v.shape == ref[k].shape
        assert v.is_contiguous(memory_format=torch.channels_last)
    assert max(errs.values()) < RELATIVE_TOLERANCE[precision], errs
    if precision != "fp32":  # reduced precision really ran: the error is far above fp32 rounding
        assert max(errs.values()) > 1e-5, errs


def test_warns_only_for_a_precision_without_fast_kernels(monkeypatch) -> None:
    model = small_vgg_bn()
    monkeypatch.setattr(precision_choice, "fast_reduced_precision", lambda device: [])
    with pytest.warns(UserWarning, match="no fast kernels"):
        optimize_for_inference(model, precision="bf16")
    monkeypatch.setattr(precision_choice, "fast_reduced_precision", lambda device: ["bf16"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert optimize_for_inference(model, precision="bf16").precision == "bf16"


@pytest.mark.parametrize(
    ("amx", "avx512_bf16", "requested", "has", "auto"),
    [
        # AMX + AVX512-BF16 but no AMX-FP16 (e.g. Sapphire Rapids): fp16 is slow, auto picks bf16
        (True, True, "fp16", "this CPU has AMX, AVX512-BF16 (", "bf16"),
        # AVX512-BF16 only
        (False, True, "fp16", "this CPU has AVX512-BF16 (", "bf16"),
        # AVX2-class CPU: nothing fast, auto stays in fp32
        (False, False, "bf16", "this CPU has none of AMX, AVX512-BF16, AMX-FP16", "fp32"),
    ],
)
def test_slow_precision_warning_tells_the_truth_about_this_cpu(
    monkeypatch, amx: bool, avx512_bf16: bool, requested: str, has: str, auto: str
) -> None:
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_fp16_supported", lambda: False, raising=False)
    with pytest.warns(UserWarning) as record:
        optimize_for_inference(small_vgg_bn(), precision=requested, channels_last=False)
    (msg,) = [str(w.message) for w in record if "no fast kernels" in str(w.message)]
    assert f"precision={requested!r} has no fast kernels on this cpu" in msg
    assert has in msg, msg
    assert "precision='auto' times fp32 and the fast ones here and picks the fastest" in msg, msg
    assert default_precision("cpu") == auto
    fast = [] if auto == "fp32" else [auto]
    assert f"fast reduced precisions here: {fast or 'none'}" in msg, msg


class TinyTaskModel(nn.Module):
    """Mimics a task model: list of (3, H, W) images in, list of dicts out; BNNeck-style head."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = VGGBackbone("vgg11_bn", ["conv4", "conv5"], width_mult=0.125)
        self.head = nn.Sequential(
            OrderedDict(conv=nn.Conv2d(64, 16, 3, padding=1), bn=nn.BatchNorm2d(16), relu=nn.ReLU())
        )
        self.neck = nn.Sequential(nn.Linear(16, 8), nn.BatchNorm1d(8))  # folded with fuse_linear_bn_eval
        self.post = nn.Sequential(nn.Conv2d(64, 4, 1), nn.ReLU(), nn.BatchNorm2d(4))  # BN not next to the conv

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        assert all(im.dim() == 3 for im in images)
        h = max(im.shape[-2] for im in images)
        w = max(im.shape[-1] for im in images)
        batch = images[0].new_zeros(len(images), 3, h, w)
        for b, im in zip(batch, images):
            b[:, : im.shape[-2], : im.shape[-1]].copy_(im)
        feats = self.backbone(batch)
        heat = self.head(feats["conv5"])
        emb = self.neck(heat.mean((2, 3)))
        dense = self.post(feats["conv4"])
        return [{"embedding": e, "dense": d, "label": torch.tensor(i)} for i, (e, d) in enumerate(zip(emb, dense))]


def test_task_model_with_list_input_and_dict_outputs() -> None:
    model = randomize_batchnorm(TinyTaskModel()).eval()
    images = [torch.rand(3, 32, 48), torch.rand(3, 40, 32)]
    with torch.no_grad():
        ref = model(images)
    fast = optimize_for_inference(model, precision="fp32")
    # 8 backbone BNs + head conv/BN + neck linear/BN1d; post's BN follows a ReLU and stays.
    assert fast.folded_batchnorms == 10
    assert count(fast.model, nn.modules.batchnorm._BatchNorm) == 1
    out = fast(images)
    assert len(out) == len(ref)
    for o, r in zip(out, ref):
        assert o.keys() == r.keys()
        assert o["label"].dtype == torch.int64 and o["label"] == r["label"]
        for k in ("embedding", "dense"):
            assert rel_err(o[k], r[k]) < RELATIVE_TOLERANCE["fp32"]


def test_original_model_is_untouched_unless_inplace() -> None:
    model = small_vgg_bn().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimize_for_inference(model, precision="fp32")
    assert model.training and count(model, nn.BatchNorm2d) == 8
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    fast = optimize_for_inference(model, precision="fp32", inplace=True)
    assert fast.model is model and count(model, nn.BatchNorm2d) == 0


def test_options_off_keep_the_model_as_is() -> None:
    model = small_vgg_bn()
    fast = optimize_for_inference(model, precision="fp32", fuse_bn=False, channels_last=False)
    assert fast.folded_batchnorms == 0 and count(fast.model, nn.BatchNorm2d) == 8
    x = torch.randn(1, 3, 32, 32)
    out = fast(x)
    assert out["conv5"].is_contiguous()
    with torch.no_grad():
        assert torch.equal(out["conv5"], model(x)["conv5"])


def test_wrapper_behaviour() -> None:
    fast = optimize_for_inference(small_vgg_bn(), precision="fp32")
    assert fast.out_channels == 64 and fast.feature_info.reduction() == [1, 2, 4, 8, 16]
    assert fast.eval() is fast
    with pytest.raises(RuntimeError, match="cannot be trained"):
        fast.train()
    # the weights appear once (the runner is not a second registered copy)
    assert all(k.startswith("model.") for k in fast.state_dict())
    with pytest.raises(ValueError, match="eval-mode"):
        fold_batchnorm(small_vgg_bn().train())
    with pytest.raises(ValueError, match="precision"):
        optimize_for_inference(small_vgg_bn(), precision="int4")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="compile"):
        optimize_for_inference(small_vgg_bn(), compile="fast")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("amx", "avx512_bf16", "expected"),
    [(False, False, "fp32"), (True, False, "bf16"), (False, True, "bf16")],
)
def test_feature_rule_follows_cpu_features(monkeypatch, amx: bool, avx512_bf16: bool, expected: str) -> None:
    # the feature rule (what the slow-precision warning reports); precision="auto" measures
    # instead on a CPU (tests/test_int8.py::test_auto_picks_the_fastest_probe_and_logs_it)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_fp16_supported", lambda: False, raising=False)
    assert default_precision("cpu") == expected
    assert opt.fast_reduced_precision("cpu") == ([] if expected == "fp32" else ["bf16"])


def test_auto_precision_runs_the_measured_choice() -> None:
    # No mocks: the real probe picks a precision on this CPU, and the model really runs in it.
    precision_choice._probe_cache.clear()
    times = opt.measure_precisions(("fp32", "bf16") if torch.ops.mkldnn._is_mkldnn_bf16_supported() else ("fp32",))
    fastest = min(times, key=times.__getitem__)
    model = small_vgg_bn()
    fast = optimize_for_inference(model)  # cached: the same measurement
    assert fast.precision == fastest
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)["conv5"]
    err = rel_err(fast(x)["conv5"], ref)
    assert err < RELATIVE_TOLERANCE[fastest]
    if fastest == "bf16":
        assert err > 1e-5  # really ran in bf16


def test_compile_options_per_device() -> None:
    # Real calls (the old CUDA test mocked torch.cuda.is_bf16_supported and called only the rule
    # reading it). reduce-overhead means CUDA graphs on CUDA; on a CPU that option is dropped.
    cuda = _compile_options("reduce-overhead", torch.device("cuda"))
    cpu = _compile_options("reduce-overhead", torch.device("cpu"))
    assert cuda["triton.cudagraphs"] is True and cuda["freezing"] is True
    assert "triton.cudagraphs" not in cpu and cpu["freezing"] is True


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_auto_precision_on_cuda() -> None:
    expected = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    assert default_precision("cuda") == expected
    model = small_vgg_bn().cuda()
    fast = optimize_for_inference(model)
    assert fast.precision == expected
    x = torch.randn(1, 3, 32, 32, device="cuda")
    with torch.no_grad():
        ref = model(x)["conv5"]
    assert rel_err(fast(x)["conv5"], ref) < RELATIVE_TOLERANCE[expected]


def test_compile_with_freezing_matches_eager() -> None:
    # The one compile test (inductor on 2 cores is slow): tiny model, fp32, BN folded.
    model = randomize_batchnorm(VGGBackbone("vgg11_bn", ["conv2"], width_mult=0.125)).eval()
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        ref = model(x)["conv2"]
    fast = optimize_for_inference(model, precision="fp32", compile=True)
    out = fast(x)["conv2"]
    assert rel_err(out, ref) < RELATIVE_TOLERANCE["fp32"]
    assert _compile_options(True, torch.device("cpu")) == {"freezing": True}


def test_torchvision_faster_rcnn_on_vgg_backbone() -> None:
    # The detector's shape (list of images in, list of {boxes, labels, scores} out) before the
    # task model lands: torchvision's FasterRCNN on a small VGG-A-BN conv5.
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.ops import MultiScaleRoIAlign

    backbone = VGGBackbone("vgg11_bn", ["conv5"], width_mult=0.125)
    det = FasterRCNN(
        backbone,
        num_classes=3,
        min_size=64,
        max_size=64,
        rpn_anchor_generator=AnchorGenerator(((16, 32),), ((0.5, 1.0, 2.0),)),
        box_roi_pool=MultiScaleRoIAlign(["conv5"], 7, 2),
        rpn_pre_nms_top_n_test=50,
        rpn_post_nms_top_n_test=20,
        box_score_thresh=0.0,
        box_detections_per_img=10,
    )
    det = randomize_batchnorm(det).eval()
    images = [torch.rand(3, 64, 80), torch.rand(3, 72, 64)]
    with torch.no_grad():
        ref = det(images)
    fast = optimize_for_inference(det, precision="fp32")
    assert fast.folded_batchnorms == 8
    out = fast(images)
    for o, r in zip(out, ref):
        assert len(o["boxes"]) == len(r["boxes"]) == 10
        assert torch.equal(o["labels"], r["labels"])
        torch.testing.assert_close(o["boxes"], r["boxes"], rtol=0, atol=1e-3)
        torch.testing.assert_close(o["scores"], r["scores"], rtol=0, atol=1e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out16 = optimize_for_inference(det, precision="bf16")(images)
    # bf16 reorders near-tied detections of a random model, so only the structure is compared
    assert [sorted(o) for o in out16] == [sorted(r) for r in ref]
    assert all(o["boxes"].dtype == torch.float32 and o["boxes"].shape == (10, 4) for o in out16)
