"""VGGBackbone reproduces torchvision's and timm's VGG exactly, loaded from saved state dict files.

Full-width models are needed (the files must be the libraries' own layouts), so inputs are small
(64x48) except for fc6/fc7, whose unpadded 7x7 kernel needs the 7x7 pool5 of a 224x224 image.
"""

from __future__ import annotations

import pytest
import torch
from backbone_utils import TV_ARCHS, randomize_, scratch_dir, tap_slices, tv_model
from torch.testing import assert_close

from vggbackbone import IMAGENET, TAPS, VGGBackbone

CONV_AND_POOL_TAPS = [t for t in TAPS if not t.startswith("fc")]
#: timm's layouts are torchvision's plus ``pre_logits``/``head``: every depth, with and without BN
TIMM_ARCHS = ("vgg11", "vgg13_bn", "vgg16", "vgg19_bn")


@pytest.fixture
def big_tmp(tmp_path):
    with scratch_dir(tmp_path) as d:
        yield d


@pytest.mark.parametrize("arch", TV_ARCHS)
def test_every_tap_equals_torchvision_features_slice(arch: str, big_tmp) -> None:
    tv = tv_model(arch)  # BN (for _bn archs) with non-trivial running statistics, eval mode
    path = big_tmp / f"{arch}.pth"
    torch.save(tv.state_dict(), path)

    bb = VGGBackbone(arch, CONV_AND_POOL_TAPS, weights=path).eval()
    assert bb.normalization == IMAGENET

    slices = tap_slices(tv.features)
    assert set(slices) == set(CONV_AND_POOL_TAPS)
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        ours = bb(x)
        for tap in CONV_AND_POOL_TAPS:
            # the same ops in the same order on the same weights: bit-identical
            assert_close(ours[tap], tv.features[: slices[tap]](x), rtol=0, atol=0, msg=f"{arch} {tap}")


@pytest.mark.parametrize("arch", ["vgg16", "vgg11_bn"])
def test_fc_taps_are_torchvisions_classifier(arch: str, big_tmp) -> None:
    """fc6/fc7 from the classifier's Linear layers as a valid 7x7 and a 1x1 conv (the default).

    At 224x224 pool5 is 7x7, so fc7 is ``(N, 4096, 1, 1)``: torchvision's ``classifier[:5]`` (eval:
    dropout off), bit for bit: where fc6/fc7 cover their whole input they run as the Linear layer.
    The padded form's centre cell is the same sum as a convolution: equal to float32 rounding.
    """
    tv = tv_model(arch)
    path = big_tmp / f"{arch}.pth"
    torch.save(tv.state_dict(), path)  # classifier included
    valid = VGGBackbone(arch, ["pool5", "fc6", "fc7"], weights=path).eval()
    same = VGGBackbone(arch, ["fc6", "fc7"], weights=path, fc_padding="same").eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        ours, dense = valid(x), same(x)
        assert torch.equal(ours["pool5"], tv.features(x))
        pooled = torch.flatten(tv.avgpool(tv.features(x)), 1)  # avgpool is the identity on 7x7
        assert ours["fc6"].shape == ours["fc7"].shape == (2, 4096, 1, 1)
        assert torch.equal(ours["fc6"].flatten(1), tv.classifier[:2](pooled))
        assert torch.equal(ours["fc7"].flatten(1), tv.classifier[:5](pooled))
        # "same": 7x7 maps whose centre cell sees exactly the classifier's input (borders see zeros)
        assert dense["fc7"].shape == (2, 4096, 7, 7)
        assert_close(dense["fc7"][:, :, 3:4, 3:4], ours["fc7"], rtol=1e-4, atol=1e-5)


timm = pytest.importorskip("timm")


@pytest.mark.parametrize("arch", TIMM_ARCHS)
def test_timm_state_dict_gives_timm_features_only_outputs(arch: str, big_tmp) -> None:
    from safetensors.torch import save_file

    net = randomize_(timm.create_model(arch, pretrained=False)).eval()
    path = big_tmp / f"{arch}.safetensors"
    save_file(net.state_dict(), str(path))
    # timm's own loader reads the same file into its features_only wrapper (offline)
    feats = timm.create_model(
        arch, pretrained=True, features_only=True, pretrained_cfg_overlay={"file": str(path)}
    ).eval()

    taps = ["conv1", "conv2", "conv3", "conv4", "conv5", "pool5"]
    bb = VGGBackbone(arch, taps, weights=path).eval()
    assert bb.feature_info.channels()[:6] == feats.feature_info.channels()
    assert bb.feature_info.reduction()[:6] == feats.feature_info.reduction()

    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        theirs = feats(x)
        ours = bb(x)
    assert len(theirs) == len(taps)
    for tap, t in zip(taps, theirs):
        assert_close(ours[tap], t, rtol=0, atol=0, msg=f"{arch} {tap}")

    if arch in ("vgg11", "vgg13_bn"):  # timm's pre_logits (fc1 7x7 conv, fc2 1x1) -> fc6/fc7
        fc = VGGBackbone(arch, ["fc7"], weights=path).eval()
        x = torch.randn(1, 3, 224, 224)
        with torch.no_grad():
            pre_logits = net.pre_logits(net.forward_features(x))  # (1, 4096, 1, 1): unpadded 7x7
            ours = fc(x)
        # timm's is an unpadded 7x7 conv then a 1x1 conv; ours, covering its whole 7x7 input, is
        # the Linear layer's product (torchvision's classifier bit for bit): the same sums in
        # another order, equal to float32 rounding
        assert_close(ours["fc7"], pre_logits, rtol=1e-4, atol=1e-5)
