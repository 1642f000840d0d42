"""VGGBackbone (``vggbackbone/vgg.py``): taps and return_layers, shapes/strides, output stride,
width, freezing, a torchvision detector on it, the work its forward does.

Configurations and parameter counts are in test_config.py, in-block and fc taps in
test_layers.py, weight equality with torchvision/timm in test_backbone_parity.py, weight files in
test_weights.py, tracing/compiling/ONNX in test_export.py.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
from backbone_utils import n_params, randomize_, tap_slices, tv_features, tv_features_state_dict
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.testing import assert_close
from torchvision.ops.misc import FrozenBatchNorm2d

from vggbackbone import TAPS, VGGBackbone
from vggbackbone.utils import make_divisible


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
    assert n_params(bb) == n_params(tv_features("vgg16")[:16])
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
