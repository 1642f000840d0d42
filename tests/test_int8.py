"""int8 (torchao PT2E + X86InductorQuantizer): tolerance vs fp32 per task model, errors, CPU fallback.

Accuracy is checked on the quantised graphs without compiling (``quantize_int8(compile=False)``:
the reference quantised kernels, same numbers up to rounding as the compiled oneDNN ones), and
the compiled path once end to end through ``optimize_for_inference`` (inductor is slow on 2 cores).
"""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
from torch import nn

from vggbackbone import VGGBackbone, optimize_for_inference
from vggbackbone import optimize as opt
from vggbackbone.deploy import hardware, inference, quantization_targets
from vggbackbone.deploy import precision as precision_choice
from vggbackbone.models import fcn_vgg, reid_vgg
from vggbackbone.optimize import INT8_TOLERANCE, QuantizedModule, quantize_int8

pytest.importorskip("torchao")


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref).abs().max() / ref.abs().max()).item()


def batches(n: int, shape: tuple[int, ...], seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(shape, generator=g) for _ in range(n)]


def test_backbone_int8_within_tolerance_and_really_quantised() -> None:
    torch.manual_seed(0)
    model = VGGBackbone("vgg11", width_mult=0.125).eval()
    x = torch.rand(2, 3, 48, 48)
    with torch.no_grad():
        ref = model(x)
    q = quantize_int8(model, batches(2, (2, 3, 48, 48)), compile=False)
    assert isinstance(q, QuantizedModule) and q.return_layers == model.return_layers
    ops = {str(n.target) for n in q.quantized.graph.nodes if n.op == "call_function"}
    assert any("quantize_per_tensor" in o for o in ops), ops  # int8 activations
    assert any("dequantize_per_channel" in o for o in ops), ops  # per-channel int8 weights
    with torch.no_grad():
        out = q(x)
        other = q(torch.rand(1, 3, 40, 56))  # batch, height and width are dynamic
    assert list(out) == list(ref)
    errs = {k: rel_err(out[k], ref[k]) for k in ref}
    assert max(errs.values()) < INT8_TOLERANCE["relative_error"], errs
    assert max(errs.values()) > 1e-3, errs  # it is not fp32 in disguise
    assert other["conv5"].shape == (1, 64, 2, 3)
    with pytest.raises(ValueError, match=r"expects \(N, 3, H, W\)"):  # the original's input check still runs
        q(torch.rand(1, 4, 32, 32))


def test_reid_embeddings_cosine_to_fp32() -> None:
    torch.manual_seed(0)
    model = reid_vgg("vgg11_bn", num_classes=0, width_mult=0.125).eval()
    x = torch.rand(4, 3, 64, 32)
    with torch.no_grad():
        ref = model(x)
    quantize_int8(model, batches(2, (4, 3, 64, 32)), compile=False)
    assert isinstance(model.backbone, QuantizedModule)
    with torch.no_grad():
        out = model(x)
    cos = torch.nn.functional.cosine_similarity(out, ref, dim=1)
    assert cos.min().item() > INT8_TOLERANCE["embedding_cosine"], cos


def test_fcn_logits_within_tolerance() -> None:
    torch.manual_seed(0)
    model = fcn_vgg("vgg11", num_classes=3, width_mult=0.125, fc_channels=32).eval()
    for name in ("score_fr", "score_pool4", "score_pool3"):  # FCN zero-initialises its score layers
        nn.init.normal_(getattr(model, name).weight, std=0.1)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
    quantize_int8(model, batches(2, (1, 3, 64, 64)), compile=False)
    assert isinstance(model.backbone, QuantizedModule)
    with torch.no_grad():
        out = model(x)
    assert out.shape == ref.shape
    assert rel_err(out, ref) < INT8_TOLERANCE["relative_error"]


def test_int8_needs_calibration_and_a_cpu() -> None:
    model = VGGBackbone("vgg11", ["conv2"], width_mult=0.0625)
    with pytest.raises(ValueError, match="needs calibration="):
        optimize_for_inference(model, precision="int8")
    with pytest.raises(ValueError, match="calibration is only used"):
        optimize_for_inference(model, precision="bf16", calibration=batches(1, (1, 3, 16, 16)))
    with pytest.raises(ValueError, match="no batches"):
        quantize_int8(model.eval(), [])


def test_fallback_without_int8_kernels_warns_and_runs_fp32(monkeypatch) -> None:
    # no VNNI/AMX and no AVX2 (e.g. an old x86 or a non-x86 CPU): oneDNN has no int8 convolutions
    monkeypatch.setattr(hardware, "_cpuinfo_flags", lambda: frozenset({"sse4_2"}))
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
    model = VGGBackbone("vgg11", ["conv2"], width_mult=0.0625).eval()
    x = torch.rand(1, 3, 16, 16)
    with pytest.warns(UserWarning, match="falls back to fp32: this CPU has none of AMX-INT8, AVX512-VNNI, AVX-VNNI"):
        fast = optimize_for_inference(model, precision="int8", calibration=batches(1, (1, 3, 16, 16)))
    assert fast.precision == "fp32" and fast.quantized == ()
    with torch.no_grad():
        assert rel_err(fast(x)["conv2"], model(x)["conv2"]) < 1e-5


def test_avx2_without_vnni_runs_int8_and_says_so(monkeypatch, caplog) -> None:
    # measured on an AVX2-only EPYC: oneDNN's AVX2 int8 kernels beat fp32 (docs/benchmarks.md),
    # so int8 runs there, logged as running without dot-product instructions
    monkeypatch.setattr(hardware, "_cpuinfo_flags", lambda: frozenset({"avx2", "fma"}))
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    monkeypatch.setattr(hardware.platform, "machine", lambda: "x86_64")
    ok, why = opt.int8_supported()
    assert ok and "run on AVX2 multiply-adds" in why and opt.int8_dot_product() == []
    real_quantize = opt.quantize_int8
    monkeypatch.setattr(inference, "quantize_int8", lambda *a, **k: real_quantize(*a, **{**k, "compile": False}))
    model = VGGBackbone("vgg11", ["conv2"], width_mult=0.0625).eval()
    with caplog.at_level("INFO", logger="vggbackbone.optimize"):
        fast = optimize_for_inference(model, precision="int8", calibration=batches(1, (1, 3, 16, 16)))
    assert fast.precision == "int8" and fast.quantized
    assert "AVX2 multiply-adds" in caplog.text


def test_int8_compiled_end_to_end(monkeypatch) -> None:
    # The one compiled int8 test: the real oneDNN kernels through inductor + freezing. The
    # VNNI probe is forced so it also runs on AVX2-only CI machines (the kernels run there, slower).
    monkeypatch.setattr(hardware, "_cpuinfo_flags", lambda: frozenset({"avx512_vnni"}))
    model = VGGBackbone("vgg11", ["conv2"], width_mult=0.125).eval()
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        ref = model(x)["conv2"]
    fast = optimize_for_inference(model, precision="int8", calibration=batches(2, (1, 3, 16, 16)))
    assert fast.precision == "int8" and fast.quantized == ("",)
    assert isinstance(fast.model, QuantizedModule) and fast.model.compiled
    out = fast(x)["conv2"]
    assert rel_err(out, ref) < INT8_TOLERANCE["relative_error"]


def test_auto_picks_the_fastest_probe_and_logs_it(monkeypatch, caplog) -> None:
    model = VGGBackbone("vgg11", ["conv2"], width_mult=0.0625)
    monkeypatch.setattr(precision_choice, "_probe_cache", {})
    monkeypatch.setattr(precision_choice, "_logged_choices", set())
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    fake = {"fp32": 3e-3, "bf16": 1e-3, "int8": 2e-3}
    calls: list[str] = []
    monkeypatch.setattr(precision_choice, "_probe_seconds", lambda p, budget: calls.append(p) or fake[p])
    with caplog.at_level(logging.INFO, logger="vggbackbone.optimize"):
        assert optimize_for_inference(model).precision == "bf16"
        assert optimize_for_inference(model).precision == "bf16"  # cached: probed and logged once
    assert calls == ["fp32", "bf16"]
    (msg,) = [r.getMessage() for r in caplog.records]
    assert msg == (
        "precision='auto' picked bf16 on this CPU (probe conv: fp32 3.00 ms, bf16 1.00 ms; "
        "int8 not tried: no calibration images given)"
    )
    fake["bf16"] = 9e-3  # now fp32 wins
    monkeypatch.setattr(precision_choice, "_probe_cache", {})
    assert optimize_for_inference(model).precision == "fp32"


def test_auto_tries_int8_only_with_calibration_and_int8_kernels(monkeypatch, caplog) -> None:
    monkeypatch.setattr(precision_choice, "_probe_cache", {})
    monkeypatch.setattr(precision_choice, "_logged_choices", set())
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    monkeypatch.setattr(precision_choice, "_probe_seconds", lambda p, budget: {"fp32": 3e-3, "int8": 1e-3}[p])
    monkeypatch.setattr(hardware, "_cpuinfo_flags", lambda: frozenset({"sse4_2"}))
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
    with caplog.at_level(logging.INFO, logger="vggbackbone.optimize"):
        assert precision_choice.auto_precision(torch.device("cpu"), calibrated=True) == "fp32"
    assert "int8 not tried: this CPU has none of AMX-INT8" in caplog.text
    assert "bf16 not tried: oneDNN has no bf16 kernels here (needs AMX or AVX512-BF16)" in caplog.text
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    monkeypatch.setattr(hardware.platform, "machine", lambda: "x86_64")
    # AVX2 kernels, measured faster
    assert precision_choice.auto_precision(torch.device("cpu"), calibrated=True) == "int8"
    monkeypatch.setattr(hardware, "_cpuinfo_flags", lambda: frozenset({"avx_vnni"}))
    assert precision_choice.auto_precision(torch.device("cpu"), calibrated=True) == "int8"
    assert precision_choice.auto_precision(torch.device("cpu"), calibrated=False) == "fp32"


def test_probe_runs_every_precision_kernel_fast_enough() -> None:
    # The real probe (no mocks): each precision's kernel runs and gives a finite positive time.
    precision_choice._probe_cache.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        times = opt.measure_precisions(("fp32", "int8"))
    assert set(times) == {"fp32", "int8"} and all(0 < t < 5 for t in times.values())
    out = precision_choice._probe_call("int8")()
    assert out.shape == precision_choice._PROBE_SHAPE and out.dtype == torch.uint8


def test_auto_with_calibration_picks_the_real_probes_fastest_and_says_why(monkeypatch, caplog) -> None:
    """No mocks: on this CPU, ``auto`` with calibration is the fastest of the candidates it timed
    (int8 among them where the CPU has int8 kernels), and the log gives every time."""
    monkeypatch.setattr(precision_choice, "_probe_cache", {})
    monkeypatch.setattr(precision_choice, "_logged_choices", set())
    with caplog.at_level(logging.INFO, logger="vggbackbone.optimize"):
        choice = precision_choice.auto_precision(torch.device("cpu"), calibrated=True)
    ((candidates, times),) = precision_choice._probe_cache.items()
    assert choice == min(times, key=times.__getitem__)
    assert ("int8" in candidates) == opt.int8_supported()[0]
    assert ("bf16" in candidates) == torch.ops.mkldnn._is_mkldnn_bf16_supported()
    (msg,) = [r.getMessage() for r in caplog.records]
    assert msg.startswith(f"precision='auto' picked {choice} on this CPU (probe conv: fp32 ")
    assert all(f"{p} " in msg for p in candidates)


def test_quantized_module_keeps_state_once() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()).eval()
    q = quantize_int8(model, batches(1, (2, 3, 12, 12)), compile=False)
    assert isinstance(q, QuantizedModule)
    assert all(k.startswith("quantized.") for k in q.state_dict())


def test_detector_backbone_is_what_gets_quantised() -> None:
    from vggbackbone.models import fasterrcnn_vgg, unet_vgg

    torch.manual_seed(0)
    fpn = fasterrcnn_vgg("vgg11", num_classes=3, fpn=True, width_mult=0.125)
    assert quantization_targets(fpn) == ["backbone.body"]  # the FPN itself stays fp32
    assert quantization_targets(unet_vgg("vgg11", num_classes=3, width_mult=0.125)) == ["backbone"]
    det = fasterrcnn_vgg("vgg11", num_classes=3, width_mult=0.125, min_size=64, max_size=96).eval()
    images = [torch.rand(3, 64, 80), torch.rand(3, 72, 64)]
    with torch.no_grad():
        ref = det(images)
    quantize_int8(det, [images, [torch.rand(3, 64, 64)]], compile=False)  # lists of images, as forward takes
    assert isinstance(det.backbone, QuantizedModule)
    assert not any(isinstance(m, QuantizedModule) for m in (det.rpn, det.roi_heads))
    with torch.no_grad():
        out = det(images)
    for o, r in zip(out, ref):
        assert o.keys() == r.keys() and o["boxes"].dtype == torch.float32
        assert len(o["boxes"]) > 0 and len(r["boxes"]) > 0
