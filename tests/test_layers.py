"""The layers of VGGBackbone (``vggbackbone/_layers.py``): taps are the values each layer
computed (in-place safety, every layer by its Caffe name, against torchvision layer by layer),
fc6/fc7 as convolutions and their padding, layer taps under fx, TorchScript and compile.
"""

from __future__ import annotations

import copy

import pytest
import torch
from backbone_utils import randomize_, tap_slices, tv_features
from torch import nn
from torch.testing import assert_close

from vggbackbone import TAPS, VGGBackbone, get_config


# ------------------------------------------------------------------------------ in-place safety
@pytest.mark.parametrize("train", [False, True])
def test_returned_taps_are_not_overwritten_by_later_inplace_ops(train: bool) -> None:
    """Every tap returned together with deeper ones equals the tap computed on its own.

    Each block ends in an in-place ReLU; if a returned tensor were the input of a later in-place
    op, it would silently change after being returned (see the torchvision contrast below).
    """
    taps = [t for t in TAPS if not t.startswith("fc")] + (["fc6", "fc7"] if not train else [])
    kw = dict(width_mult=0.125, fc_channels=32, fc_dropout=0.0, fc_padding="same")
    full = randomize_(VGGBackbone("vgg13_bn", taps, **kw)).train(train)
    x = torch.randn(2, 3, 64, 64)
    together = full(x)
    for tap in taps:
        alone = VGGBackbone("vgg13_bn", [tap], **kw).train(train)
        alone.load_state_dict(full.state_dict(), strict=False)
        assert torch.equal(together[tap], alone(x.clone())[tap]), tap


def test_torchvision_feature_extractor_pre_relu_tap_is_corrupted_but_ours_are_not() -> None:
    """Why our taps are post-ReLU block outputs: torchvision's create_feature_extractor on VGG.

    Asking it for a conv node (pre-ReLU) together with a deeper node returns a tensor that the
    in-place ReLU after it has already overwritten: it is silently the post-ReLU value.
    """
    from torchvision.models.feature_extraction import create_feature_extractor

    features = tv_features("vgg11")  # 18: conv5_2, 19: its in-place ReLU, 20: pool5
    net = nn.Sequential()
    net.features = features
    extractor = create_feature_extractor(net, {"features.18": "conv5_2", "features.20": "pool5"})
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        got = extractor(x)["conv5_2"]
        clean = features[:19](x)  # the real conv5_2 output (pre-ReLU)
    assert (clean < 0).any() and (got >= 0).all()
    assert torch.equal(got, clean.relu())  # corrupted: the ReLU ran on the returned tensor

    # Ours, loaded with the same weights, returns the value each tap really has.
    ours = VGGBackbone("vgg11", ["conv4", "pool4", "conv5", "pool5"])
    from vggbackbone.weights import to_canonical

    ours.load_state_dict(to_canonical({f"features.{k}": v for k, v in features.state_dict().items()}, ours.config)[0])
    ours.eval()
    with torch.no_grad():
        out = ours(x)
    sl = tap_slices(features)
    for tap in out:
        assert torch.equal(out[tap], features[: sl[tap]](x)), tap


# ------------------------------------------------------------------------------ fc6 padding
@pytest.mark.parametrize("size", [224, 384])
def test_fc_taps_are_unpadded_by_default(size: int) -> None:
    """fc6 is a valid 7x7 conv on pool5 (the paper's dense evaluation): 1x1 at 224, 6x6 at 384."""
    bb = randomize_(VGGBackbone("vgg11", ["pool5", "fc6", "fc7"], width_mult=0.0625, fc_channels=16)).eval()
    assert bb.fc_padding == "valid" and bb.features.fc6.conv.padding == (0, 0)
    assert bb.feature_info.reduction() == [32, 32, 32] and bb.feature_info.channels() == [32, 16, 16]
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        out = bb(x)
        fc6 = bb.features.fc6.conv
        fc7 = bb.features.fc7.conv
        if size == 224:  # one output cell: fc6/fc7 run as the classifier's Linear layers (torchvision's sums)
            want6 = torch.relu(nn.functional.linear(out["pool5"].flatten(1), fc6.weight.flatten(1), fc6.bias))
            want7 = torch.relu(nn.functional.linear(want6, fc7.weight.flatten(1), fc7.bias))
            want6, want7 = want6[:, :, None, None], want7[:, :, None, None]
        else:
            want6 = torch.relu(nn.functional.conv2d(out["pool5"], fc6.weight, fc6.bias))
            want7 = torch.relu(nn.functional.conv2d(want6, fc7.weight, fc7.bias))
    n = size // 32 - 6
    assert out["fc6"].shape == out["fc7"].shape == (1, 16, n, n)
    assert torch.equal(out["fc6"], want6) and torch.equal(out["fc7"], want7)


def test_fc_padding_same_keeps_pool5_size_and_valid_refuses_small_inputs() -> None:
    kw = dict(width_mult=0.0625, fc_channels=16)
    valid = VGGBackbone("vgg11", ["pool5", "fc7"], **kw).eval()
    same = VGGBackbone("vgg11", ["pool5", "fc7"], fc_padding="same", **kw).eval()
    same.load_state_dict(valid.state_dict())  # same parameters, only the padding differs
    assert same.features.fc6.conv.padding == (3, 3)
    x = torch.randn(1, 3, 288, 256)
    with torch.no_grad():
        v, s = valid(x), same(x)
    assert v["fc7"].shape[-2:] == (3, 2) and s["fc7"].shape[-2:] == (9, 8) == s["pool5"].shape[-2:]
    # cells far enough from the border see no padding: the valid map is the inside of the same one
    assert_close(s["fc7"][..., 3:-3, 3:-3], v["fc7"], rtol=1e-5, atol=1e-6)
    # the smallest input with a 7x7 pool5 map: 224 (floor pools), 193 (ceil pools); dilated fc6
    # (output stride 16, dilation 2) needs a 13x13 map: 208
    for kwargs, smallest in (({}, 224), ({"ceil_mode": True}, 193), ({"output_stride": 16}, 208)):
        bb = VGGBackbone("vgg11", ["fc7"], **kw, **kwargs).eval()
        assert bb.min_input_size == smallest
        with torch.no_grad():
            assert bb(torch.randn(1, 3, smallest, smallest))["fc7"].shape[-2:] == (1, 1)
        with pytest.raises(ValueError, match=rf"smaller than {smallest}, .*fc6's unpadded .*fc_padding='same'"):
            bb(torch.randn(1, 3, smallest - 1, smallest))
    with pytest.raises(ValueError, match="fc_padding must be 'valid' or 'same', got 'full'"):
        VGGBackbone("vgg11", ["fc7"], fc_padding="full")


# ------------------------------------------------------------------------------ every layer by name
def _torchvision_layer_outputs(features: nn.Sequential, names: list[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each layer of torchvision's flat ``features`` run one by one, with in-place ops disabled,
    under our Caffe name (``names[i]`` is ``features[i]``)."""
    assert len(names) == len(features)
    outs: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, layer in zip(names, features):
            if isinstance(layer, nn.ReLU):
                layer = nn.ReLU(inplace=False)
            x = layer(x)
            outs[name] = x
    return outs


@pytest.mark.parametrize("arch", ["vgg16", "vgg19_bn"])
def test_every_layer_tap_equals_torchvision_layer_by_layer(arch: str) -> None:
    """conv3_1 (pre-BN/ReLU), bn3_1, relu3_1, ..., pool5, all requested at once, each bit-identical
    to that layer's output in torchvision's VGG run without in-place ops."""
    from vggbackbone.config import block_layers, layer_taps
    from vggbackbone.weights import to_canonical

    features = tv_features(arch)
    cfg = get_config(arch)
    names = [n for b in range(1, 6) for n in (*block_layers(cfg, b), f"pool{b}")]
    taps = [t for t in layer_taps(cfg) if t in names or t in TAPS[:10]]
    assert len(taps) == len(features) + 5  # every layer, plus the block taps conv1..conv5
    bb = VGGBackbone(arch, taps)
    bb.load_state_dict(to_canonical({f"features.{k}": v for k, v in features.state_dict().items()}, cfg)[0])
    bb.eval()
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        out = bb(x)
    ref = _torchvision_layer_outputs(features, names, x)
    last_relu = {f"conv{b}": block_layers(cfg, b)[-1] for b in range(1, 6)}
    assert list(out) == taps  # network order
    for tap in taps:
        assert torch.equal(out[tap], ref[last_relu.get(tap, tap)]), tap
    # a pre-activation tap really is before the ReLU (negative values survive)
    assert (out["conv3_1"] < 0).any() and (out["relu3_1"] >= 0).all()
    if arch.endswith("_bn"):
        assert (out["bn5_4"] < 0).any() and not torch.equal(out["conv5_4"], out["bn5_4"])
    info = {f["key"]: f for f in bb.feature_info.get_dicts()}
    assert info["conv3_1"] == {"num_chs": 256, "reduction": 4, "module": "features.conv3.conv3_1", "key": "conv3_1"}
    assert info["conv3"]["module"] == "features.conv3" and info["pool5"]["reduction"] == 32


def test_esrgan_conv5_4_before_relu_alone_builds_nothing_after_it() -> None:
    """ESRGAN's perceptual layer: VGG19 conv5_4 before its ReLU, the deepest thing built."""
    features = tv_features("vgg19")
    from vggbackbone.weights import to_canonical

    bb = VGGBackbone("vgg19", {"conv5_4": "feat"})
    sd = to_canonical({f"features.{k}": v for k, v in features.state_dict().items()}, bb.config)[0]
    bb.load_state_dict({k: v for k, v in sd.items() if k in bb.state_dict()})
    bb.eval()
    assert list(bb.features) == ["conv1", "pool1", "conv2", "pool2", "conv3", "pool3", "conv4", "pool4", "conv5"]
    assert list(bb.features.conv5._modules)[-1] == "conv5_4"  # relu5_4 and pool5 are not built
    assert bb.out_channels == 512 and bb.feature_info.module_name() == ["features.conv5.conv5_4"]
    x = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        assert torch.equal(bb(x)["feat"], features[:35](x))  # features[34] is conv5_4
        assert (bb(x)["feat"] < 0).any()


def test_layer_taps_keep_the_default_path_in_place_and_values_unchanged() -> None:
    """Only a ReLU right after a returned pre-activation runs out of place; returned tensors are
    the values each layer computed whatever else is returned (alone == together)."""
    kw = dict(width_mult=0.125, fc_channels=16, fc_dropout=0.0)
    plain = VGGBackbone("vgg13_bn", ["conv5"], **kw)
    assert all(m.inplace for m in plain.modules() if isinstance(m, nn.ReLU))
    taps = ["conv1_1", "relu1_1", "bn2_2", "conv3", "conv4_1", "bn4_1", "relu4_2", "pool4", "relu6", "fc7"]
    full = randomize_(VGGBackbone("vgg13_bn", taps, fc_padding="same", **kw)).eval()
    out_of_place = {n for n, m in full.named_modules() if isinstance(m, nn.ReLU) and not m.inplace}
    # the ReLU ending each conv-bn group with a returned pre-activation (also conv1_1's, though a
    # BatchNorm sits between them: folding it into the conv would make it an nn.Identity)
    assert out_of_place == {"features.conv1.relu1_1", "features.conv2.relu2_2", "features.conv4.relu4_1"}
    assert full.feature_info.module_name()[-2:] == ["features.fc6.relu", "features.fc7"]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        together = full(x)
        assert list(together) == taps
        for tap in taps:
            alone = VGGBackbone("vgg13_bn", [tap], fc_padding="same", **kw).eval()
            alone.load_state_dict({k: v for k, v in full.state_dict().items() if k in alone.state_dict()})
            assert torch.equal(together[tap], alone(x)[tap]), tap
        # BatchNorm folded into its conv (vggbackbone.fold_batchnorm): the pairs whose conv output is
        # returned (conv1_1, conv4_1) stay unfolded, so every tap keeps its value (10 convs, 8 folded)
        from vggbackbone import fold_batchnorm

        assert fold_batchnorm(full) == 8
        assert isinstance(full.features.conv1.bn1_1, nn.BatchNorm2d)
        assert isinstance(full.features.conv4.bn4_1, nn.BatchNorm2d)
        assert isinstance(full.features.conv4.bn4_2, nn.Identity)
        folded = full(x)
    for tap in taps:
        torch.testing.assert_close(folded[tap], together[tap], rtol=1e-4, atol=1e-4 * together[tap].abs().max().item())
    assert (folded["conv1_1"] < 0).any()  # not overwritten by relu1_1
    with pytest.raises(ValueError, match=r"unknown tap\(s\) \['conv3_4', 'bn3_1'\].*every layer by its Caffe name"):
        VGGBackbone("vgg13", ["conv3_4", "bn3_1"])  # vgg13 has two convs in block 3 and no BN


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit is deprecated, still supported
def test_layer_taps_under_fx_script_and_compile() -> None:
    from torchvision.models.feature_extraction import create_feature_extractor

    bb = randomize_(
        VGGBackbone(
            "vgg11_bn",
            ["conv2_1", "bn3_1", "relu3_1", "conv4", "relu6"],
            width_mult=0.125,
            fc_channels=16,
            fc_padding="same",
        )
    ).eval()
    x = torch.randn(2, 3, 48, 64)
    with torch.no_grad():
        ref = bb(x)
        outs = {  # each on its own copy (fx tracing leaves marks that scripting then trips on)
            "fx": torch.fx.symbolic_trace(copy.deepcopy(bb))(x),
            "script": torch.jit.script(copy.deepcopy(bb))(x),
            "compile": torch.compile(copy.deepcopy(bb), backend="aot_eager", fullgraph=True)(x),
        }
        # torchvision's extractor names a module "conv3_1" "conv3" (it strips _N suffixes to number
        # repeated calls), so only block paths are safe there; our return_layers needs none of it
        fe = create_feature_extractor(bb, {"features.conv3.bn3": "b", "features.conv4": "c4"})(x)
    for how, out in outs.items():
        assert list(out) == list(ref), how
        for k in ref:
            assert torch.equal(out[k], ref[k]), (how, k)
    assert torch.equal(fe["b"], ref["bn3_1"]) and torch.equal(fe["c4"], ref["conv4"])
    torch._dynamo.reset()
