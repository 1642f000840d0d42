"""VGG architectures as data (``vggbackbone/config.py``): the paper's configurations and
their parameter counts, custom block specs.

Layers and taps are in test_layers.py, the backbone built from them in test_vgg.py.
"""

from __future__ import annotations

import pytest
import torch
import torchvision
from backbone_utils import n_params
from torch import nn

from vggbackbone import ARCHS, VGGBackbone, get_config

# ------------------------------------------------------------------------------ configurations
#: Simonyan & Zisserman, Table 2 ("Number of parameters (in millions)": 133, 133, 134, 138, 144),
#: here exact: conv layers + fc6 + fc7 + a 1000-way fc8 (as a 1x1 conv).
PAPER_PARAMS = {
    "vgg11": 132_863_336,  # A
    "vgg11_lrn": 132_863_336,  # A-LRN (LRN has no parameters)
    "vgg13": 133_047_848,  # B
    "vgg16_c": 133_638_952,  # C: 1x1 third convs in blocks 3-5
    "vgg16": 138_357_544,  # D
    "vgg19": 143_667_240,  # E
}
PAPER_MILLIONS = {"vgg11": 133, "vgg11_lrn": 133, "vgg13": 133, "vgg16_c": 134, "vgg16": 138, "vgg19": 144}


def _with_fc8(arch: str) -> int:
    with torch.device("meta"):  # counting only: no memory, no init
        bb = VGGBackbone(arch, ["fc7"])
        fc8 = nn.Conv2d(bb.out_channels, 1000, 1)
    return n_params(bb) + n_params(fc8)


@pytest.mark.parametrize("arch", sorted(PAPER_PARAMS))
def test_paper_parameter_counts(arch: str) -> None:
    n = _with_fc8(arch)
    assert n == PAPER_PARAMS[arch]
    assert round(n / 1e6) == PAPER_MILLIONS[arch]  # C: 133.64M rounds to the paper's "134M"


@pytest.mark.parametrize("arch", [a for a in ARCHS if a in torchvision.models.list_models()])
def test_parameter_counts_equal_torchvision(arch: str) -> None:
    with torch.device("meta"):
        tv = torchvision.models.get_model(arch, weights=None)
    assert _with_fc8(arch) == n_params(tv)


def test_config_c_uses_1x1_convs_and_lrn_sits_after_conv1_1() -> None:
    bb = VGGBackbone("vgg16_c", ["conv5"], width_mult=0.125)
    for b in (3, 4, 5):
        block = bb.features[f"conv{b}"]
        assert [getattr(block, f"conv{b}_{j}").kernel_size for j in (1, 2, 3)] == [(3, 3), (3, 3), (1, 1)]
        assert getattr(block, f"conv{b}_3").padding == (0, 0)
    lrn = VGGBackbone("vgg11_lrn", ["conv1"]).features["conv1"]
    assert list(lrn._modules) == ["conv1_1", "relu1_1", "lrn1"]
    assert isinstance(lrn.lrn1, nn.LocalResponseNorm) and lrn.lrn1.size == 5 and lrn.lrn1.k == 2.0
    with pytest.raises(ValueError, match="unknown VGG arch 'vgg17'"):
        VGGBackbone("vgg17")
    with pytest.raises(ValueError, match="use the matching _bn name"):
        VGGBackbone("vgg16", batch_norm=True)


def test_custom_block_spec_with_other_in_channels() -> None:
    spec = [(1, 16), (2, 24), (3, 40)]
    bb = VGGBackbone(
        spec, list(VGGBackbone.available_taps(get_config(spec))), in_channels=4, batch_norm=True, fc_padding="same"
    )
    assert bb.arch == "custom[[1,16],[2,24],[3,40]]"
    assert bb.output_stride == 8  # three strided pools
    assert list(bb.return_layers) == ["conv1", "pool1", "conv2", "pool2", "conv3", "pool3", "fc6", "fc7"]
    assert bb.feature_info.channels() == [16, 16, 24, 24, 40, 40, 4096, 4096]
    assert bb.feature_info.reduction() == [1, 2, 2, 4, 4, 8, 8, 8]
    convs3 = [n for n, m in bb.features.conv3.named_children() if isinstance(m, nn.Conv2d)]
    assert convs3 == ["conv3_1", "conv3_2", "conv3_3"]
    assert isinstance(bb.features.conv3.bn3_3, nn.BatchNorm2d)
    assert bb.normalization.mean == (0.5,) * 4  # no ImageNet statistics for 4-channel input
    convs = [(4, 16), (16, 24), (24, 24), (24, 40), (40, 40), (40, 40)]
    n_conv = sum(9 * i * o + o + 2 * o for i, o in convs)  # weights, bias, BN affine
    assert n_params(bb) == n_conv + (40 * 49 * 4096 + 4096) + (4096 * 4096 + 4096)
    bb.eval()
    with torch.no_grad():
        out = bb(torch.randn(2, 4, 40, 24))
    assert out["conv3"].shape == (2, 40, 10, 6) and out["fc7"].shape == (2, 4096, 5, 3)
    with pytest.raises(ValueError, match="1..5 blocks"):
        VGGBackbone([(2, 64)] * 6)
    with pytest.raises(ValueError, match="list of \\(num_convs, out_channels\\) pairs"):
        VGGBackbone([64, 128])
