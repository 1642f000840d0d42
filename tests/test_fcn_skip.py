"""FCN-8s at once with other weights than the reference's: ``fcn_vgg(skip_rms_reference=...)``
multiplies the pool4/pool3 skip scales by the ratio of activation RMS (reference / this model) on
a fixed probe, measured at build time, and checkpoints keep the factors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vggbackbone import VGGBackbone
from vggbackbone.models import fcn_vgg
from vggbackbone.models.fcn import skip_activation_rms, skip_probe

SMALL = {"width_mult": 0.125}


def _weights(tmp_path: Path, name: str, conv1_gain: float) -> Path:
    """Random VGG16 weights (torchvision's init: zero biases) with conv1_1 multiplied by ``conv1_gain``:
    ReLU and max-pooling are positively homogeneous, so every activation is ``conv1_gain`` times larger."""
    torch.manual_seed(0)
    bb = VGGBackbone("vgg16", ["fc7"], fc_padding="same", **SMALL)
    with torch.no_grad():
        bb.features["conv1"][0].weight.mul_(conv1_gain)
    return bb.save_weights(tmp_path / name)


def test_the_probe_is_fixed() -> None:
    a, b = skip_probe(), skip_probe()
    assert a.shape == (4, 3, 224, 224) and torch.equal(a, b) and float(a.min()) >= 0 and float(a.max()) <= 1


def test_skip_scales_follow_the_reference_activation_rms(tmp_path: Path) -> None:
    ours, ref = _weights(tmp_path, "ours.pth", 1.0), _weights(tmp_path, "ref.pth", 3.0)
    plain = fcn_vgg("vgg16", 21, "8s", weights_backbone=ours, **SMALL)
    assert plain.skip_factors is None and "skip_factors" not in plain.state_dict()  # off by default

    model = fcn_vgg("vgg16", 21, "8s", weights_backbone=ours, skip_rms_reference=str(ref), **SMALL).eval()
    torch.testing.assert_close(model.skip_factors, torch.tensor([3.0, 3.0]), rtol=1e-4, atol=0)
    seen = {}
    for name in ("score_pool4", "score_pool3"):
        getattr(model, name).register_forward_pre_hook(lambda m, args, name=name: seen.__setitem__(name, args[0]))
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        model(x)
        feats = model.backbone(model.input_norm(x))
    torch.testing.assert_close(seen["score_pool4"], feats["pool4"] * 0.01 * model.skip_factors[0])
    torch.testing.assert_close(seen["score_pool3"], feats["pool3"] * 1e-4 * model.skip_factors[1])

    # the RMS values themselves work as the reference, and a checkpoint keeps the measured factors
    rms = skip_activation_rms(plain.backbone)
    doubled = {k: 2 * v for k, v in rms.items()}
    by_value = fcn_vgg("vgg16", 21, "8s", weights_backbone=ours, skip_rms_reference=doubled, **SMALL)
    torch.testing.assert_close(by_value.skip_factors, torch.tensor([2.0, 2.0]), rtol=1e-6, atol=0)
    rebuilt = fcn_vgg("vgg16", 21, "8s", skip_rms_reference=str(ref), **SMALL)  # no weights: a checkpoint's rebuild
    assert torch.equal(rebuilt.skip_factors, torch.ones(2))
    rebuilt.load_state_dict(model.state_dict())
    assert torch.equal(rebuilt.skip_factors, model.skip_factors)


def test_skip_rms_reference_is_refused_where_it_cannot_apply(tmp_path: Path) -> None:
    ours = _weights(tmp_path, "ours.pth", 1.0)
    with pytest.raises(ValueError, match="FCN-32s has none"):
        fcn_vgg("vgg16", 21, "32s", weights_backbone=ours, skip_rms_reference={"pool3": 1.0, "pool4": 1.0}, **SMALL)
    with pytest.raises(ValueError, match="exactly pool3 and pool4"):
        fcn_vgg("vgg16", 21, "8s", weights_backbone=ours, skip_rms_reference={"pool5": 1.0}, **SMALL)
