"""``timm.create_model("vggbackbone_<arch>", features_only=True)`` after ``import vggbackbone``:
timm's features_only contract, offline weights through ``pretrained_cfg_overlay=dict(file=...)``,
smp's ``tu-`` encoders, and registration that never imports timm by itself."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from cli_configs import REPO

import vggbackbone  # registers the entry points when timm is imported

timm = pytest.importorskip("timm")
smp = pytest.importorskip("segmentation_models_pytorch")


def test_registered_without_importing_timm_and_guarded_when_timm_is_absent():
    """One subprocess: timm blocked -> ``import vggbackbone`` works; then ``import timm`` registers."""
    script = """
import sys
sys.modules["timm"] = None  # timm "not installed"
import vggbackbone
from vggbackbone._timm_hook import register_with_timm
del sys.modules["timm"]      # now installed, not imported
register_with_timm()
assert "timm" not in sys.modules, "registration imported timm"
import timm
print(sorted(n for n in timm.list_models("vggbackbone_*")))
"""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == str(sorted(f"vggbackbone_{a}" for a in vggbackbone.ARCHS))


def test_a_failed_registration_warns_and_timm_still_imports():
    script = """
import sys, warnings
import vggbackbone
sys.modules["vggbackbone.timm_models"] = None  # the registration fails
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import timm
print(timm.list_models("vggbackbone_*"), [str(w.message) for w in caught if "vggbackbone" in str(w.message)])
"""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("[] ['vggbackbone: the timm models vggbackbone_<arch> are not registered: ")


def test_features_only_contract():
    """Channels and reductions of ``feature_info`` are those of the outputs, for any ``out_indices``."""
    x = torch.rand(2, 1, 64, 96)
    m = timm.create_model("vggbackbone_vgg11_bn", features_only=True, in_chans=1, width_mult=0.125).eval()
    assert m.feature_info.channels() == [8, 16, 32, 64, 64, 64]
    assert m.feature_info.reduction() == [1, 2, 4, 8, 16, 32]
    outs = m(x)
    assert isinstance(outs, list) and len(outs) == len(m.feature_info)
    for o, c, r in zip(outs, m.feature_info.channels(), m.feature_info.reduction()):
        assert o.shape == (2, c, 64 // r, 96 // r)
    sub = timm.create_model("vggbackbone_vgg11_bn", features_only=True, out_indices=(2, -2), output_stride=16,
                            width_mult=0.125, in_chans=1)  # fmt: skip
    assert sub.feature_info.channels() == [32, 64] and sub.feature_info.reduction() == [4, 16]
    assert [o.shape[-2:] for o in sub(x)] == [(16, 24), (4, 6)]
    with pytest.raises(ValueError, match=r"out_indices must pick among the 6 features"):
        timm.create_model("vggbackbone_vgg11", features_only=True, out_indices=(6,))
    with pytest.raises(ValueError, match="vggbackbone_vgg11 is a feature backbone: create it with features_only=True"):
        timm.create_model("vggbackbone_vgg11")


def test_offline_torchvision_weights_through_timm_and_smp(tmp_path):
    """A torchvision ``vgg11`` features file given as ``pretrained_cfg_overlay=dict(file=...)``: the timm
    model computes torchvision's features exactly, and smp's ``tu-`` encoder loads the same weights."""
    import torchvision

    tv = torchvision.models.vgg11().features.eval()
    path = tmp_path / "vgg11_features.pth"
    torch.save({f"features.{k}": v for k, v in tv.state_dict().items()}, path)
    m = timm.create_model(
        "vggbackbone_vgg11", features_only=True, out_indices=(1, 5), pretrained=True,
        pretrained_cfg_overlay=dict(file=str(path)),
    ).eval()  # fmt: skip
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        conv2, pool5 = m(x)
        torch.testing.assert_close(conv2, tv[:5](x), rtol=0, atol=0)  # conv2 = relu after the 2nd conv
        torch.testing.assert_close(pool5, tv(x), rtol=0, atol=0)
    assert m.pretrained_cfg["file"] == str(path)
    unet = smp.Unet("tu-vggbackbone_vgg11", encoder_weights=True, classes=2,
                    pretrained_cfg_overlay=dict(file=str(path)))  # fmt: skip
    torch.testing.assert_close(unet.encoder.model.backbone.features.conv1.conv1_1.weight, tv[0].weight)


def test_smp_unet_with_a_tu_encoder_runs():
    unet = smp.Unet("tu-vggbackbone_vgg11_bn", encoder_weights=None, classes=3, width_mult=0.125).eval()
    assert unet.encoder.out_channels == [8, 16, 32, 64, 64, 64]
    with torch.no_grad():
        assert unet(torch.rand(1, 3, 64, 64)).shape == (1, 3, 64, 64)
