"""VGGBackbone: configurations, parameter counts, taps, shapes/strides, freezing, in-place safety.

Weight equality with torchvision/timm is in test_backbone_parity.py, weight files in
test_weights.py, tracing/compiling/ONNX in test_export.py.
"""

from __future__ import annotations

import copy
import functools
import math

import pytest
import torch
import torchvision
from backbone_utils import randomize_, tap_slices, tv_features, tv_features_state_dict
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.testing import assert_close
from torchvision.ops.misc import FrozenBatchNorm2d

from vggbackbone import ARCHS, TAPS, VGGBackbone, get_config
from vggbackbone.utils import make_divisible

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


def _n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _with_fc8(arch: str) -> int:
    with torch.device("meta"):  # counting only: no memory, no init
        bb = VGGBackbone(arch, ["fc7"])
        fc8 = nn.Conv2d(bb.out_channels, 1000, 1)
    return _n_params(bb) + _n_params(fc8)


@pytest.mark.parametrize("arch", sorted(PAPER_PARAMS))
def test_paper_parameter_counts(arch: str) -> None:
    n = _with_fc8(arch)
    assert n == PAPER_PARAMS[arch]
    assert round(n / 1e6) == PAPER_MILLIONS[arch]  # C: 133.64M rounds to the paper's "134M"


@pytest.mark.parametrize("arch", [a for a in ARCHS if a in torchvision.models.list_models()])
def test_parameter_counts_equal_torchvision(arch: str) -> None:
    with torch.device("meta"):
        tv = torchvision.models.get_model(arch, weights=None)
    assert _with_fc8(arch) == _n_params(tv)


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


# ------------------------------------------------------------------------------ taps and return_layers
def test_return_layers_dict_and_list() -> None:
    bb_dict = VGGBackbone("vgg11_bn", {"conv5": "c5", "conv3": "c3", "pool4": "p4"}, width_mult=0.125).eval()
    bb_list = VGGBackbone("vgg11_bn", ["pool4", "conv3", "conv5"], width_mult=0.125).eval()
    bb_list.load_state_dict(bb_dict.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        d, li = bb_dict(x), bb_list(x)
    assert list(d) == ["c3", "p4", "c5"]  # network order, whatever order was asked
    assert list(li) == ["conv3", "pool4", "conv5"]
    for (kd, vd), (_, vl) in zip(d.items(), li.items()):
        assert torch.equal(vd, vl), kd
    assert bb_dict.out_channels == 64  # torchvision's convention: the last tap's channels
    assert bb_dict.feature_info.channels() == [32, 64, 64]
    assert bb_dict.feature_info.reduction() == [4, 16, 16]
    assert bb_dict.feature_info.module_name() == ["features.conv3", "features.pool4", "features.conv5"]
    assert bb_dict.feature_info.get("key") == ["c3", "p4", "c5"]
    assert VGGBackbone("vgg11", width_mult=0.125).return_layers == {f"conv{i}": f"conv{i}" for i in range(1, 6)}


def test_bad_return_layers_are_refused() -> None:
    with pytest.raises(ValueError, match=r"unknown tap\(s\) \['conv6'\].*available taps"):
        VGGBackbone("vgg11", ["conv6"])
    with pytest.raises(ValueError, match="same output key"):
        VGGBackbone("vgg11", {"conv3": "x", "conv4": "x"})
    with pytest.raises(ValueError, match="none requested"):
        VGGBackbone("vgg11", [])


def test_layers_past_the_deepest_tap_are_not_built() -> None:
    bb = VGGBackbone("vgg16", ["conv1", "conv3"])
    assert list(bb.features) == ["conv1", "pool1", "conv2", "pool2", "conv3"]
    assert not any(k.startswith(("features.conv4", "features.fc")) for k in bb.state_dict())
    # exactly torchvision's features[:16] (up to relu3_3)
    assert _n_params(bb) == _n_params(tv_features("vgg16")[:16])
    # and nothing deeper runs: a hook on every leaf sees only the built layers
    seen: list[str] = []
    for name, m in bb.named_modules():
        if not list(m.children()):
            m.register_forward_hook(lambda mod, i, o, name=name: seen.append(name))
    bb(torch.randn(1, 3, 32, 32))
    leaves = [m for m in bb.modules() if not list(m.children())]
    assert seen[-1] == "features.conv3.relu3_3" and len(seen) == len(leaves)


def test_module_names_follow_caffe() -> None:
    keys = list(VGGBackbone("vgg16_bn", ["fc7"], width_mult=0.125).state_dict())
    assert "features.conv5.conv5_3.weight" in keys and "features.conv5.bn5_3.running_var" in keys
    assert "features.fc6.conv.weight" in keys and "features.fc7.conv.bias" in keys


# ------------------------------------------------------------------------------ shapes and strides
@functools.cache
def _tiny(ceil_mode: bool, output_stride: int) -> VGGBackbone:
    """All taps of a thin vgg16_bn (cached: hypothesis calls the test many times)."""
    return VGGBackbone(
        "vgg16_bn",
        list(TAPS),
        width_mult=0.125,
        fc_channels=16,
        ceil_mode=ceil_mode,
        output_stride=output_stride,
        fc_padding="same",  # dense fc maps of pool5's size (the valid default is tested on its own)
    ).eval()


def _expected_size(n: int, stride: int, ceil_mode: bool) -> int:
    # 2x2/2 max-pools applied k times: floor(n / 2^k) (torchvision) or ceil(n / 2^k) (Caffe)
    return math.ceil(n / stride) if ceil_mode else n // stride


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 2),
    h=st.integers(32, 150),
    w=st.integers(32, 150),
    ceil_mode=st.booleans(),
    output_stride=st.sampled_from([8, 16, 32]),
)
def test_shapes_match_feature_info(n: int, h: int, w: int, ceil_mode: bool, output_stride: int) -> None:
    bb = _tiny(ceil_mode, output_stride)
    with torch.no_grad():
        out = bb(torch.randn(n, 3, h, w))
    assert list(out) == list(TAPS)
    for (key, t), c, s in zip(out.items(), bb.feature_info.channels(), bb.feature_info.reduction()):
        assert s == min(s, output_stride)
        assert t.shape == (n, c, _expected_size(h, s, ceil_mode), _expected_size(w, s, ceil_mode)), key


def test_strides_and_channels_table() -> None:
    bb = VGGBackbone("vgg16", list(TAPS), width_mult=0.125)
    assert dict(zip(TAPS, bb.feature_info.reduction())) == {
        "conv1": 1, "pool1": 2, "conv2": 2, "pool2": 4, "conv3": 4, "pool3": 8,
        "conv4": 8, "pool4": 16, "conv5": 16, "pool5": 32, "fc6": 32, "fc7": 32,
    }  # fmt: skip
    assert bb.feature_info.channels() == [8, 8, 16, 16, 32, 32, 64, 64, 64, 64, 512, 512]


@settings(max_examples=15, deadline=None)
@given(h=st.integers(1, 40), w=st.integers(1, 40))
def test_ceil_mode_takes_any_size(h: int, w: int) -> None:
    with torch.no_grad():
        out = _tiny(True, 32)(torch.randn(1, 3, h, w))
    assert out["pool5"].shape[-2:] == (math.ceil(h / 32), math.ceil(w / 32))


def test_odd_sizes_floor_vs_ceil() -> None:
    x = torch.randn(1, 3, 225, 127)
    with torch.no_grad():
        floor, ceil = _tiny(False, 32)(x), _tiny(True, 32)(x)
    assert floor["conv5"].shape[-2:] == (14, 7) and ceil["conv5"].shape[-2:] == (15, 8)
    assert floor["pool5"].shape[-2:] == (7, 3) and ceil["pool5"].shape[-2:] == (8, 4)
    # ceil mode keeps a (partial) window for the border: pool5's last row sees the last image rows
    bb = _tiny(True, 32)
    x = torch.randn(1, 3, 225, 127)
    y = x.clone()
    y[..., -1, :] += 10.0
    with torch.no_grad():
        assert not torch.equal(bb(x)["pool5"][..., -1, :], bb(y)["pool5"][..., -1, :])


def test_too_small_input_is_a_clear_error() -> None:
    bb = VGGBackbone("vgg16", ["conv3"], width_mult=0.125)
    assert bb.min_input_size == 4
    bb(torch.randn(1, 3, 4, 4))
    with pytest.raises(ValueError, match=r"input 3x9 is smaller than 4.*tap 'conv3'"):
        bb(torch.randn(1, 3, 3, 9))
    assert VGGBackbone("vgg16", ["pool5"], width_mult=0.125).min_input_size == 32
    assert VGGBackbone("vgg16", ["pool5"], width_mult=0.125, output_stride=8).min_input_size == 8
    with pytest.raises(ValueError, match=r"expects \(N, 3, H, W\) input, got \(1, 1, 32, 32\)"):
        bb(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match=r"expects \(N, 3, H, W\) input, got \(3, 32, 32\)"):
        bb(torch.randn(3, 32, 32))


# ------------------------------------------------------------------------------ output stride
@pytest.mark.parametrize("output_stride", [8, 16])
def test_output_stride_by_dilation(output_stride: int) -> None:
    dense = VGGBackbone("vgg16", list(TAPS), width_mult=0.125, output_stride=output_stride, fc_padding="same").eval()
    plain = VGGBackbone("vgg16", list(TAPS), width_mult=0.125, fc_padding="same").eval()
    plain.load_state_dict(dense.state_dict())  # same parameters: dilation changes no shapes
    assert dense.features.conv5.conv5_1.dilation == ((2, 2) if output_stride == 8 else (1, 1))
    assert dense.features.fc6.conv.dilation == ((4, 4) if output_stride == 8 else (2, 2))
    assert max(dense.feature_info.reduction()) == output_stride
    assert dense.feature_info.reduction(TAPS.index("conv5")) == min(16, output_stride)

    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        d, p = dense(x), plain(x)
    for tap, s in zip(TAPS, dense.feature_info.reduction()):
        assert d[tap].shape[-2:] == (64 // s, 96 // s), tap
    # everything before the first stride-1 pool is the plain network, exactly
    same = ["conv1", "pool1", "conv2", "pool2", "conv3", "pool3", "conv4"]
    same += ["pool4", "conv5"] if output_stride == 16 else []
    for tap in same:
        assert torch.equal(d[tap], p[tap]), tap
    with pytest.raises(ValueError, match=r"output_stride must be one of \[8, 16, 32\], got 4"):
        VGGBackbone("vgg16", output_stride=4)


# ------------------------------------------------------------------------------ width and custom specs
def test_width_mult() -> None:
    bb = VGGBackbone("vgg16", list(TAPS), width_mult=0.3)
    expected = [make_divisible(c * 0.3) for c in (64, 128, 256, 512, 512)]
    assert expected == [24, 40, 80, 152, 152]
    assert bb.feature_info.channels()[0:10:2] == expected
    assert bb.feature_info.channels()[-1] == make_divisible(4096 * 0.3) == 1232
    assert VGGBackbone("vgg16", ["fc7"], width_mult=0.25, fc_channels=100).out_channels == 100


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
    assert _n_params(bb) == n_conv + (40 * 49 * 4096 + 4096) + (4096 * 4096 + 4096)
    bb.eval()
    with torch.no_grad():
        out = bb(torch.randn(2, 4, 40, 24))
    assert out["conv3"].shape == (2, 40, 10, 6) and out["fc7"].shape == (2, 4096, 5, 3)
    with pytest.raises(ValueError, match="1..5 blocks"):
        VGGBackbone([(2, 64)] * 6)
    with pytest.raises(ValueError, match="list of \\(num_convs, out_channels\\) pairs"):
        VGGBackbone([64, 128])


# ------------------------------------------------------------------------------ freezing
def _bn_layers(m: nn.Module) -> list[nn.Module]:
    return [x for x in m.modules() if isinstance(x, nn.modules.batchnorm._BatchNorm)]


def test_frozen_stages() -> None:
    bb = VGGBackbone("vgg11_bn", ["conv3", "fc7"], width_mult=0.125, frozen_stages=2, fc_padding="same").train()
    assert bb.training
    for name, p in bb.named_parameters():
        assert p.requires_grad == (not name.startswith(("features.conv1.", "features.conv2."))), name
    for name in ("conv1", "pool1", "conv2", "pool2"):
        assert not any(m.training for m in bb.features[name].modules()), name
    assert all(m.training for m in bb.features.conv3.modules()) and bb.features.fc7.drop.training

    frozen_bn, live_bn = bb.features.conv2.bn2_1, bb.features.conv3.bn3_1
    before = frozen_bn.running_mean.clone(), live_bn.running_mean.clone()
    out = bb(torch.randn(2, 3, 32, 32))
    (out["conv3"].sum() + out["fc7"].sum()).backward()
    assert torch.equal(frozen_bn.running_mean, before[0])  # eval mode: statistics untouched
    assert not torch.equal(live_bn.running_mean, before[1])
    assert all(p.grad is None for p in bb.features.conv1.parameters())
    assert bb.features.conv3.conv3_1.weight.grad is not None

    bb.eval().train()  # train() keeps honouring frozen_stages
    assert not bb.features.conv1.training and bb.features.conv3.training

    all_frozen = VGGBackbone("vgg11_bn", ["fc7"], width_mult=0.125, frozen_stages=7).train()
    assert not any(p.requires_grad for p in all_frozen.parameters())
    assert not all_frozen.features.fc7.drop.training
    fc7_live = VGGBackbone("vgg11_bn", ["fc7"], width_mult=0.125, frozen_stages=6)
    assert fc7_live.features.fc7.conv.weight.requires_grad and not fc7_live.features.fc6.conv.weight.requires_grad
    with pytest.raises(ValueError, match=r"frozen_stages must be in 0..7, got 8"):
        VGGBackbone("vgg11_bn", frozen_stages=8)


def test_norm_eval_keeps_batchnorm_statistics() -> None:
    bb = VGGBackbone("vgg11_bn", ["conv5"], width_mult=0.125, norm_eval=True)
    randomize_(bb)
    bb.train()
    assert bb.training and bb.features.conv5.conv5_1.training
    assert not any(m.training for m in _bn_layers(bb))
    stats = [m.running_var.clone() for m in _bn_layers(bb)]
    x = torch.randn(2, 3, 32, 32)
    out_train = bb(x)["conv5"]
    assert all(torch.equal(m.running_var, s) for m, s in zip(_bn_layers(bb), stats))
    with torch.no_grad():
        assert torch.equal(out_train.detach(), bb.eval()(x)["conv5"])  # BN used running statistics
    # parameters still train (norm_eval freezes statistics, not the affine weights)
    assert all(p.requires_grad for p in bb.parameters())


def test_frozen_batchnorm_via_norm_layer(tmp_path) -> None:
    path = tmp_path / "vgg11_bn_features.pth"
    torch.save(tv_features_state_dict("vgg11_bn"), path)  # BN with non-trivial statistics
    bb = VGGBackbone("vgg11_bn", ["conv4"], weights=path, norm_layer=FrozenBatchNorm2d).train()
    assert bb.training
    assert all(isinstance(getattr(bb.features.conv4, f"bn4_{j}"), FrozenBatchNorm2d) for j in (1, 2))
    assert all(not n.split(".")[-2].startswith("bn") for n, _ in bb.named_parameters())  # BN has buffers only
    tv = tv_features("vgg11_bn")
    x = torch.randn(2, 3, 32, 32)
    out = bb(x)["conv4"]  # training mode: a frozen BN still uses the loaded statistics
    with torch.no_grad():
        assert_close(out.detach(), tv[: tap_slices(tv)["conv4"]](x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="has no BatchNorm"):
        VGGBackbone("vgg11", norm_layer=FrozenBatchNorm2d)


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


# ------------------------------------------------------------------------------ detection
def test_torchvision_faster_rcnn_trains_on_vggbackbone() -> None:
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.ops import MultiScaleRoIAlign

    backbone = VGGBackbone("vgg11", {"conv5": "0"}, width_mult=0.125, frozen_stages=1)
    conv1 = backbone.features.conv1.conv1_1.weight.clone()
    model = FasterRCNN(
        backbone,
        num_classes=3,
        min_size=96,
        max_size=128,
        image_mean=list(backbone.normalization.mean),
        image_std=list(backbone.normalization.std),
        rpn_anchor_generator=AnchorGenerator(sizes=((16, 32, 64),), aspect_ratios=((0.5, 1.0, 2.0),)),
        box_roi_pool=MultiScaleRoIAlign(featmap_names=["0"], output_size=7, sampling_ratio=2),
        rpn_pre_nms_top_n_train=200,  # small images: the default 2000 proposals only cost time
        rpn_post_nms_top_n_train=100,
        rpn_batch_size_per_image=64,
        box_batch_size_per_image=32,
        representation_size=128,
    )
    # two images with bright boxes on a dark background
    images, targets = [], []
    boxes_per_image = [[[10, 12, 50, 60], [60, 20, 90, 80]], [[30, 30, 80, 70]]]
    for i, boxes in enumerate(boxes_per_image):
        img = torch.rand(3, 96, 112) * 0.2
        for x0, y0, x1, y1 in boxes:
            img[:, y0:y1, x0:x1] = 0.9
        images.append(img)
        labels = torch.tensor([1 + i, 2][: len(boxes)])
        targets.append({"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": labels})

    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    model.train()
    losses = []
    for _ in range(8):
        loss_dict = model(images, targets)
        loss = sum(loss_dict.values())
        assert set(loss_dict) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-3:]) / 3 < 0.8 * losses[0], losses  # it learns (about -35% in 8 steps)
    assert torch.equal(backbone.features.conv1.conv1_1.weight, conv1)  # frozen stage untouched

    model.eval()
    with torch.no_grad():
        (det,) = model([images[0]])
    assert set(det) == {"boxes", "labels", "scores"}


# ------------------------------------------------------------------------------ no extra work
def test_forward_runs_exactly_torchvisions_aten_ops() -> None:
    """Ours does the same work as torchvision's extractor: no copies, no layout changes.

    (Speed is measured in benchmarks/backbone.py, never asserted; this is the structural reason
    the ratio there is 1.0 within noise.)
    """
    from collections import Counter

    from torch.profiler import ProfilerActivity, profile
    from torchvision.models.feature_extraction import create_feature_extractor

    net = nn.Sequential()
    net.features = tv_features("vgg16")
    tv = create_feature_extractor(net, {"features.15": "conv3", "features.22": "conv4", "features.29": "conv5"})
    ours = VGGBackbone("vgg16", ["conv3", "conv4", "conv5"]).eval()
    x = torch.randn(1, 3, 32, 32)

    def aten_ops(model: nn.Module) -> Counter:
        with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
            model(x)
        return Counter({e.key: e.count for e in prof.key_averages() if e.key.startswith("aten::")})

    ops = aten_ops(ours)
    assert ops == aten_ops(tv)
    assert ops["aten::conv2d"] == 13 and ops["aten::relu_"] == 13 and ops["aten::max_pool2d"] == 4


# ------------------------------------------------------------------------------ package structure
def _import_graph(package_dir, package: str) -> dict[str, set[str]]:
    """``module -> modules of the package it imports``, from every import statement (also ones inside
    functions and ``if TYPE_CHECKING`` blocks: a lazy import must not hide a cycle)."""
    import ast

    graph: dict[str, set[str]] = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = path.relative_to(package_dir.parent).with_suffix("").parts
        is_pkg = parts[-1] == "__init__"
        mod = ".".join(parts[:-1] if is_pkg else parts)
        here = mod.split(".") if is_pkg else mod.split(".")[:-1]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = ".".join(here[: len(here) - node.level + 1]) if node.level else ""
                target = f"{base}.{node.module}" if base and node.module else (node.module or base)
                deps.add(target)
                deps |= {f"{target}.{a.name}" for a in node.names}  # `from . import x` imports module x
        graph[mod] = {d for d in deps if d.split(".")[0] == package}
    return {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}


def test_vggbackbone_import_graph_has_no_cycle() -> None:
    import graphlib
    from pathlib import Path

    import vggbackbone

    pkg = Path(vggbackbone.__file__).parent
    graph = _import_graph(pkg, "vggbackbone")
    assert {"vggbackbone.vgg", "vggbackbone.weights", "vggbackbone.config"} <= set(graph)
    assert "vggbackbone.config" in graph["vggbackbone.weights"] and "vggbackbone.weights" in graph["vggbackbone.vgg"]
    list(graphlib.TopologicalSorter(graph).static_order())  # raises CycleError naming the cycle


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
