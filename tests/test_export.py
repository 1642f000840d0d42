"""torch.fx, TorchScript (script and trace), torch.compile, ONNX and channels_last all equal eager.

torch.compile uses the ``aot_eager`` backend: it runs dynamo and AOTAutograd (the graph capture
that could break) without inductor's C++ codegen, which takes ~13 s for even a tiny VGG on the
2-core CI machine against ~0.7 s for aot_eager.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from backbone_utils import randomize_
from openvino_check import assert_openvino_matches

from vggbackbone import TAPS, VGGBackbone

REPO = Path(__file__).resolve().parents[1]


def _model(**kw) -> VGGBackbone:
    """A thin vgg16_bn with every tap, dilation, ceil mode and non-trivial BN statistics."""
    args = dict(width_mult=0.125, fc_channels=32, output_stride=16, ceil_mode=True, fc_padding="same") | kw
    return randomize_(VGGBackbone("vgg16_bn", list(TAPS), **args)).eval()


def _assert_same(a: dict, b: dict, exact: bool = True) -> None:
    assert list(a) == list(b)
    for k in a:
        if exact:
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


def test_fx_symbolic_trace_and_torchvision_feature_extractor() -> None:
    from torchvision.models.feature_extraction import create_feature_extractor

    bb = _model()
    gm = torch.fx.symbolic_trace(bb)
    x = torch.randn(2, 3, 50, 70)
    with torch.no_grad():
        _assert_same(gm(x), bb(x))
        # torchvision's extractor works on our module names too
        fe = create_feature_extractor(bb, {"features.conv3": "c3", "features.fc7": "f7"})
        out = fe(x)
        ref = bb(x)
    assert torch.equal(out["c3"], ref["conv3"]) and torch.equal(out["f7"], ref["fc7"])


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit is deprecated, still supported
def test_torchscript_script_and_trace() -> None:
    bb = _model()
    x = torch.randn(2, 3, 50, 70)
    with torch.no_grad():
        ref = bb(x)
        scripted = torch.jit.script(bb)
        _assert_same(scripted(x), ref)
        traced = torch.jit.trace(bb, x, strict=False)  # strict=False: the output is a dict
        _assert_same(traced(x), ref)
        y = torch.randn(1, 3, 64, 33)  # other sizes go through the same scripted/traced graph
        _assert_same(scripted(y), bb(y))
        _assert_same(traced(y), bb(y))


def test_torch_compile_fullgraph_forward_and_backward() -> None:
    torch._dynamo.reset()
    bb = _model(output_stride=8)
    compiled = torch.compile(bb, backend="aot_eager", fullgraph=True)  # fullgraph: no graph breaks
    x = torch.randn(2, 3, 48, 64)
    with torch.no_grad():
        _assert_same(compiled(x), bb(x))

    # training (BN batch statistics, autograd): gradients equal eager
    small = randomize_(VGGBackbone("vgg11_bn", ["conv2", "conv4"], width_mult=0.125)).train()
    compiled = torch.compile(small, backend="aot_eager", fullgraph=True)
    grads = []
    for fn in (small, compiled):
        small.zero_grad()
        sum(t.mean() for t in fn(x).values()).backward()
        grads.append([p.grad.clone() for p in small.parameters()])
    for g_eager, g_compiled in zip(*grads):
        torch.testing.assert_close(g_compiled, g_eager, rtol=1e-4, atol=1e-6)
    torch._dynamo.reset()


def test_channels_last() -> None:
    bb = _model()
    x = torch.randn(2, 3, 50, 70)
    with torch.no_grad():
        ref = bb(x)
        bb_cl = bb.to(memory_format=torch.channels_last)
        out = bb_cl(x.to(memory_format=torch.channels_last))
    _assert_same(out, ref, exact=False)
    assert out["conv4"].is_contiguous(memory_format=torch.channels_last)


onnxruntime = pytest.importorskip("onnxruntime")


def test_onnx_export_dynamic_batch_and_size(tmp_path) -> None:
    import onnx

    from vggbackbone.export import export_onnx

    kw = dict(width_mult=0.125, fc_channels=32, output_stride=16, ceil_mode=True, fc_padding="same")
    bb = randomize_(VGGBackbone("vgg11_bn", list(TAPS), **kw))
    path = export_onnx(bb.eval(), tmp_path / "bb.onnx", torch.randn(1, 3, 64, 64))
    assert [p.name for p in tmp_path.iterdir()] == ["bb.onnx"]  # atomic: no temp file left

    model = onnx.load(str(path))
    assert [o.name for o in model.graph.output] == list(TAPS)
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 3, "height", "width"]
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["arch"] == '"vgg11_bn"' and '"reduction": 16' in meta["feature_info"]
    assert '"mean": [0.485, 0.456, 0.406]' in meta["normalization"]

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for shape in [(3, 3, 45, 77), (1, 3, 32, 32), (2, 3, 97, 40)]:  # odd sizes, ceil mode
        x = torch.randn(shape)
        got = session.run(None, {"images": x.numpy()})
        with torch.no_grad():
            ref = bb(x)
        for name, arr in zip(ref, got):
            torch.testing.assert_close(torch.from_numpy(arr), ref[name], rtol=1e-4, atol=1e-4, msg=name)
    assert_openvino_matches(path, x, list(ref.values()))  # OpenVINO reads the same file: fp32 and bf16


def test_onnx_failed_verification_writes_nothing(tmp_path) -> None:
    from vggbackbone.export import ExportVerificationError, export_onnx

    class Drifts(torch.nn.Module):
        """Eager differs from the exported graph (a Python branch): verification must catch it."""

        def __init__(self) -> None:
            super().__init__()
            self.bb = VGGBackbone("vgg11", ["conv2"], width_mult=0.125)

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            out = self.bb(x)
            if torch.compiler.is_compiling():
                return out
            return {k: v + 1 for k, v in out.items()}

    with pytest.raises(ExportVerificationError, match=r"drift.onnx: output 'conv2' differs from PyTorch"):
        export_onnx(Drifts(), tmp_path / "drift.onnx", torch.randn(1, 3, 32, 32), dynamic=False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("scale", "drift", "passes"),
    [
        # small outputs (ReID-embedding scale): rtol is relative to max|y| = 0.01, so a drift of
        # 5e-5 (0.5% of the output) fails; a max(1, max|y|) denominator would have let it pass
        (0.01, 5e-5, False),
        (0.01, 5e-7, True),
        # large outputs: the same rtol allows a proportionally larger absolute drift
        (1000.0, 5e-2, True),
        (1000.0, 5e-1, False),
    ],
)
def test_verify_onnx_tolerance_is_relative_to_each_outputs_max(tmp_path, scale, drift, passes) -> None:
    from vggbackbone.export import ExportVerificationError, export_onnx, verify_onnx

    class Affine(torch.nn.Module):
        def __init__(self, scale: float, shift: float = 0.0) -> None:
            super().__init__()
            self.scale, self.shift = scale, shift

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.tanh(x) * self.scale + self.shift

    x = torch.randn(2, 3, 8, 8) * 10  # tanh saturates: max|y| == scale to float precision
    path = export_onnx(Affine(scale), tmp_path / "m.onnx", x, dynamic=False, verify=False)
    drifted = Affine(scale, shift=drift)  # eager differs from the file by exactly `drift`
    if passes:
        err = verify_onnx(path, drifted, [x])
        assert err == pytest.approx(drift / scale, rel=0.05)
    else:
        allowed = 1e-5 + 1e-4 * scale
        with pytest.raises(ExportVerificationError) as e:
            verify_onnx(path, drifted, [x], name="m.onnx")
        msg = str(e.value)
        assert msg.startswith("m.onnx: output 'output' differs from PyTorch by "), msg
        assert f"its largest magnitude is {scale:.3g}" in msg and f"= {allowed:.3g} (atol=1e-05, rtol=0.0001)" in msg
        reported = re.search(r"differs from PyTorch by (\S+) at most .* relative error (\S+)\)", msg)
        assert reported is not None, msg
        assert float(reported[1]) == pytest.approx(drift, rel=0.05)
        assert float(reported[2]) == pytest.approx(drift / scale, rel=0.05)


def test_export_cli(tmp_path, capsys) -> None:
    src = randomize_(VGGBackbone("vgg11_bn", ["conv5"], width_mult=0.125)).eval()
    weights = src.save_weights(tmp_path / "w.safetensors")
    out = tmp_path / "model.onnx"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    cmd = [
        sys.executable, "-m", "vggbackbone.export", "--arch", "vgg11_bn", "--taps", "conv3", "conv4", "conv5",
        "--weights", str(weights), "--width-mult", "0.125", "--input-size", "64", "64", "--out", str(out),
    ]  # fmt: skip
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "matches PyTorch on 2 input(s)" in res.stderr
    assert "outputs conv3 (C=32, stride 4), conv4 (C=64, stride 8), conv5 (C=64, stride 16)" in res.stdout

    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = torch.randn(2, 3, 40, 56)
    got = session.run(None, {"images": x.numpy()})
    ref = VGGBackbone("vgg11_bn", ["conv3", "conv4", "conv5"], width_mult=0.125, weights=weights).eval()
    with torch.no_grad():
        for arr, t in zip(got, ref(x).values()):
            torch.testing.assert_close(torch.from_numpy(arr), t, rtol=1e-4, atol=1e-4)

    # a wrong weights file is a clear error (exit 2), and nothing is written
    from vggbackbone.export import main

    argv = cmd[cmd.index("--arch") :]
    argv[argv.index("vgg11_bn")] = "vgg13_bn"
    argv[-1] = str(tmp_path / "bad.onnx")
    assert main(argv) == 2
    assert "saved from arch vgg11_bn, but this backbone is vgg13_bn" in capsys.readouterr().err
    assert not (tmp_path / "bad.onnx").exists()
