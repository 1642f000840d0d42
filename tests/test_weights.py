"""Weights: torchvision names offline, files of every source, save/load round trips, caffe
normalisation, and bad files (wrong arch, truncated, pickled code, NaN) refused clearly."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
import torchvision
from backbone_utils import randomize_, scratch_dir, tap_slices, tv_features, tv_features_state_dict, tv_model
from torch.testing import assert_close

from vggbackbone import CAFFE, IMAGENET, TAPS, InputNormalization, VGGBackbone, WeightsError, get_config
from vggbackbone.weights import load_vgg_state_dict, reshape_head


@pytest.fixture
def big_tmp(tmp_path):
    with scratch_dir(tmp_path) as d:
        yield d


def _features_file(tmp_path: Path, arch: str, name: str | None = None) -> Path:
    path = tmp_path / (name or f"{arch}_features.pth")
    torch.save(tv_features_state_dict(arch), path)
    return path


def _check_taps_equal_torchvision(bb: VGGBackbone, features: torch.nn.Sequential, x: torch.Tensor) -> None:
    sl = tap_slices(features)
    with torch.no_grad():
        out = bb.eval()(x)
        for tap, t in out.items():
            assert torch.equal(t, features[: sl[tap]](x)), tap


# ------------------------------------------------------------------------------ torchvision names
class _WritesMarker:
    """Unpickling this object writes a file: what a malicious checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code ran"))


def _hub_checkpoint(torch_home: Path, weights) -> Path:
    path = torch_home / "hub" / "checkpoints" / os.path.basename(weights.url)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def test_torchvision_weights_name_resolves_offline_through_the_cache(big_tmp, monkeypatch) -> None:
    from torchvision.models import VGG11_Weights

    monkeypatch.setenv("TORCH_HOME", str(big_tmp))
    tv = tv_model("vgg11")
    torch.save(tv.state_dict(), _hub_checkpoint(big_tmp, VGG11_Weights.IMAGENET1K_V1))

    x = torch.randn(1, 3, 48, 64)
    for name in ("IMAGENET1K_V1", "DEFAULT", "VGG11_Weights.IMAGENET1K_V1", VGG11_Weights.IMAGENET1K_V1):
        bb = VGGBackbone("vgg11", ["conv2", "pool3", "conv5", "pool5"], weights=name, progress=False)
        assert bb.normalization == IMAGENET, name
        _check_taps_equal_torchvision(bb, tv.features, x)

    # the full mapped state dict, classifier included, for heads (e.g. a Faster R-CNN box head)
    sd, unexpected, norm, meta, desc = load_vgg_state_dict("IMAGENET1K_V1", get_config("vgg11"), progress=False)
    assert unexpected == [] and norm == IMAGENET and meta["source"] == "torchvision"
    assert desc == "torchvision VGG11_Weights.IMAGENET1K_V1"
    assert sd["features.fc6.conv.weight"].shape == (4096, 25088)  # still Linear-shaped
    assert "features.conv5.conv5_2.bias" in sd and not any(k.startswith("classifier") for k in sd)
    conv = reshape_head(sd, 512)
    assert conv["features.fc6.conv.weight"].shape == (4096, 512, 7, 7)
    assert conv["features.fc7.conv.weight"].shape == (4096, 4096, 1, 1)
    # the reshape makes the 7x7 conv compute the Linear layer on a 7x7 map
    x = torch.randn(1, 512, 7, 7)
    lin = torch.nn.functional.linear(x.flatten(1), tv.classifier[0].weight, tv.classifier[0].bias)
    fc6 = torch.nn.functional.conv2d(x, conv["features.fc6.conv.weight"], sd["features.fc6.conv.bias"])
    assert_close(fc6.flatten(1), lin, rtol=1e-4, atol=1e-4)

    with pytest.raises(WeightsError, match=r"'IMAGENET1K_V2' is neither an existing file nor .*\['IMAGENET1K_V1'\]"):
        VGGBackbone("vgg11", weights="IMAGENET1K_V2")
    with pytest.raises(WeightsError, match="torchvision has no pretrained weights for vgg16_c"):
        VGGBackbone("vgg16_c", weights="IMAGENET1K_V1")


def test_torchvision_features_weights_nan_classifier_only_matters_for_fc_taps(big_tmp, monkeypatch) -> None:
    """vgg16 IMAGENET1K_FEATURES ships NaN classifier weights and its own normalisation."""
    from torchvision.models import VGG16_Weights

    monkeypatch.setenv("TORCH_HOME", str(big_tmp))
    w = VGG16_Weights.IMAGENET1K_FEATURES
    with torch.device("meta"):  # the layout of torchvision's vgg16, without its random init
        keys = {k: v.shape for k, v in torchvision.models.vgg16().state_dict().items()}
    sd = tv_features_state_dict("vgg16")
    sd.update({k: torch.full(shape, float("nan")) for k, shape in keys.items() if k.startswith("classifier.")})
    assert set(sd) == set(keys)
    torch.save(sd, _hub_checkpoint(big_tmp, w))

    bb = VGGBackbone("vgg16", ["conv5", "pool5"], weights="IMAGENET1K_FEATURES", progress=False)
    assert torch.isfinite(bb(torch.randn(1, 3, 32, 32))["pool5"]).all()
    assert bb.normalization.mean == pytest.approx((0.48235, 0.45882, 0.40784))  # from w.transforms()
    assert bb.normalization.std == pytest.approx((1 / 255,) * 3)
    assert bb.normalization.name == "IMAGENET1K_FEATURES"
    nan_error = r"non-finite values in \['features.fc6.conv.weight'.*request taps up to pool5"
    with pytest.raises(WeightsError, match=nan_error):
        VGGBackbone("vgg16", ["fc7"], weights=w, progress=False)


def test_tampered_torchvision_cache_file_is_never_executed(tmp_path, monkeypatch) -> None:
    from torchvision.models import VGG13_Weights

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    marker = tmp_path / "marker.txt"
    cached = _hub_checkpoint(tmp_path, VGG13_Weights.IMAGENET1K_V1)
    torch.save({"features.0.weight": _WritesMarker(marker)}, cached)
    with pytest.raises(WeightsError, match=rf"{cached}: refused to load"):
        VGGBackbone("vgg13", weights="IMAGENET1K_V1", progress=False)
    assert not marker.exists()


# ------------------------------------------------------------------------------ files
def test_features_only_and_wrapped_state_dicts_load(tmp_path) -> None:
    sd = tv_features_state_dict("vgg13_bn")
    x = torch.randn(2, 3, 32, 32)
    variants = {
        "flat.pth": sd,
        "ddp.pth": {f"module.{k}": v for k, v in sd.items()},  # saved from DistributedDataParallel
        "ckpt.pth": {"epoch": 3, "state_dict": sd},  # a training checkpoint
    }
    for name, obj in variants.items():
        torch.save(obj, tmp_path / name)
        bb = VGGBackbone("vgg13_bn", ["conv1", "conv4", "pool5"], weights=tmp_path / name)
        _check_taps_equal_torchvision(bb, tv_features("vgg13_bn"), x)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_save_weights_round_trip_keeps_arch_and_normalization(tmp_path, suffix: str) -> None:
    taps = list(TAPS)
    kw = dict(width_mult=0.125, fc_channels=64, fc_padding="same")
    src = randomize_(VGGBackbone("vgg16_bn", taps, normalization=CAFFE, **kw)).eval()
    path = src.save_weights(tmp_path / f"w{suffix}")
    assert path == tmp_path / f"w{suffix}"
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"w{suffix}"]  # no temp file left

    dst = VGGBackbone("vgg16_bn", taps, weights=path, **kw).eval()
    assert dst.normalization == CAFFE  # travels with the file, not passed again
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(src(x).values(), dst(x).values()))
    # a file of ours is stored RGB-first: asking for caffe again must not flip conv1_1 twice
    again = VGGBackbone("vgg16_bn", taps, weights=path, normalization="caffe", **kw)
    assert torch.equal(again.features.conv1.conv1_1.weight, src.features.conv1.conv1_1.weight)
    # a shallower backbone reads the same file (deeper layers skipped)
    VGGBackbone("vgg16_bn", ["conv3"], weights=path, **kw)

    with pytest.raises(WeightsError, match=rf"{path}: saved from arch vgg16_bn, but this backbone is vgg13_bn"):
        VGGBackbone("vgg13_bn", ["conv3"], weights=path, **kw)
    shape_error = r"(?s)wrong shape.*features.conv1.conv1_1.weight: file \(8, 3, 3, 3\) vs model \(64, 3, 3, 3\)"
    with pytest.raises(WeightsError, match=shape_error):
        VGGBackbone("vgg16_bn", ["conv3"], weights=path)


def test_save_weights_is_atomic(tmp_path, monkeypatch) -> None:
    import safetensors.torch

    bb = VGGBackbone("vgg11", ["conv2"], width_mult=0.125)
    path = bb.save_weights(tmp_path / "w.safetensors")
    before = path.read_bytes()

    def crash(*args, **kwargs):
        Path(args[1]).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        randomize_(VGGBackbone("vgg11", ["conv2"], width_mult=0.125), seed=1).save_weights(path)
    assert path.read_bytes() == before  # the old file is intact
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]  # and no temp file is left


def test_caffe_normalization_flips_conv1_1_channels(tmp_path) -> None:
    """Caffe VGG weights expect BGR 0-255 minus the BGR mean; ours then take [0, 1] RGB."""
    path = _features_file(tmp_path, "vgg11")
    caffe_net = tv_features("vgg11")  # stands for the original network, trained on BGR
    bb = VGGBackbone("vgg11", ["conv3"], weights=path, normalization="caffe").eval()
    assert bb.normalization == CAFFE
    assert torch.equal(bb.features.conv1.conv1_1.weight, caffe_net[0].weight.flip(1))

    rgb = torch.rand(2, 3, 32, 32)  # [0, 1] RGB images
    bgr_mean = torch.tensor([103.939, 116.779, 123.68]).view(1, 3, 1, 1)
    caffe_input = rgb.flip(1) * 255 - bgr_mean
    with torch.no_grad():
        expected = caffe_net[: tap_slices(caffe_net)["conv3"]](caffe_input)
        got = bb(bb.normalization(rgb))["conv3"]
    assert_close(got, expected, rtol=1e-4, atol=1e-3)

    plain = VGGBackbone("vgg11", ["conv1"], weights=path)
    assert plain.normalization == IMAGENET
    assert torch.equal(plain.features.conv1.conv1_1.weight, caffe_net[0].weight)


def test_normalization_can_be_given_explicitly() -> None:
    custom = InputNormalization((0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "mine")
    assert VGGBackbone("vgg11", ["conv1"], normalization=custom).normalization == custom
    assert VGGBackbone("vgg11", ["conv1"], normalization=custom.to_dict()).normalization == custom
    x = torch.full((3, 2, 2), 0.75)
    assert torch.equal(custom(x), torch.ones(3, 2, 2))
    with pytest.raises(ValueError, match="has 3 channels, the backbone takes 1"):
        VGGBackbone("vgg11", ["conv1"], in_channels=1, normalization="imagenet")


# ------------------------------------------------------------------------------ bad files
def test_wrong_arch_file_names_the_file_and_the_keys(tmp_path) -> None:
    path = _features_file(tmp_path, "vgg13")
    with pytest.raises(WeightsError) as e:
        VGGBackbone("vgg16", ["conv5"], weights=path)
    assert str(e.value) == (
        f"{path} is a vgg13 state dict (flat layout), but this backbone is vgg16: "
        "build VGGBackbone('vgg13', ...) for this file"
    )
    # vgg16 and vgg16_c (C) share a key layout; the kernel shapes tell them apart
    shape_error = r"(?s)wrong shape.*conv3_3.weight: file \(256, 256, 3, 3\) vs model \(256, 256, 1, 1\)"
    with pytest.raises(WeightsError, match=shape_error):
        VGGBackbone("vgg16_c", ["conv5"], weights=_features_file(tmp_path, "vgg16"))
    # a features file cut short names what is missing
    partial = tmp_path / "partial.pth"
    torch.save({k: v for k, v in tv_features_state_dict("vgg13").items() if not k.startswith("features.22.")}, partial)
    missing = (
        r"does not match VGGBackbone\(vgg13\)\n"
        r"  missing keys \(2\): \['features.conv5.conv5_2.weight', 'features.conv5.conv5_2.bias'\]"
    )
    with pytest.raises(WeightsError, match=missing):
        VGGBackbone("vgg13", ["conv5"], weights=partial)
    VGGBackbone("vgg13", ["conv4"], weights=partial)  # the missing layer is not built

    shape_error = r"features.conv1.conv1_1.weight: file \(64, 3, 3, 3\) vs model \(64, 1, 3, 3\)"
    with pytest.raises(WeightsError, match=shape_error):
        VGGBackbone("vgg13", ["conv2"], weights=path, in_channels=1)
    with pytest.raises(WeightsError, match="is a vgg13_bn state dict .* but this backbone is vgg13"):
        VGGBackbone("vgg13", ["conv2"], weights=_features_file(tmp_path, "vgg13_bn"))


def test_extra_keys_are_refused_naming_each_key_and_the_file(tmp_path) -> None:
    # A full torchvision VGG11 (features + classifier) plus keys no VGG has: an auxiliary head,
    # a features index past the last layer, an unknown parameter on a real layer.
    extra = ["aux_head.weight", "features.99.weight", "features.0.scale"]
    sd = tv_model("vgg11").state_dict()
    assert all(k not in sd for k in extra)
    for k in extra:
        sd[k] = torch.zeros(3)
    path = tmp_path / "vgg11_extra.pth"
    torch.save(sd, path)
    expected = (
        rf"{path} does not match VGGBackbone\(vgg11\)\n"
        r"  missing keys \(0\): \[\]\n"
        r"  unexpected keys \(3\): \['aux_head.weight', 'features.99.weight', 'features.0.scale'\]"
    )
    with pytest.raises(WeightsError, match=expected):
        VGGBackbone("vgg11", ["conv5"], weights=path)
    # the same file without the extra keys loads: the keys, not the rest, were refused
    for k in extra:
        del sd[k]
    torch.save(sd, path)
    VGGBackbone("vgg11", ["conv5"], weights=path)

    # a file saved by this package (native layout) with an extra key is refused the same way
    kw = dict(width_mult=0.125, fc_channels=64)
    native = VGGBackbone("vgg11", ["conv3"], **kw).save_weights(tmp_path / "native.pth")
    obj = torch.load(native, weights_only=True)
    obj["state_dict"]["features.conv9.conv9_1.weight"] = torch.zeros(1)
    torch.save(obj, native)
    with pytest.raises(WeightsError, match=r"unexpected keys \(1\): \['features.conv9.conv9_1.weight'\]"):
        VGGBackbone("vgg11", ["conv3"], weights=native, **kw)


def test_truncated_and_missing_files_are_refused_with_their_name(tmp_path) -> None:
    bb = VGGBackbone("vgg11", ["conv3"], width_mult=0.25)
    for suffix in (".pth", ".safetensors"):
        good = bb.save_weights(tmp_path / f"good{suffix}")
        bad = tmp_path / f"truncated{suffix}"
        bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
        with pytest.raises(WeightsError, match=rf"{bad}: (not a readable|truncated)"):
            VGGBackbone("vgg11", ["conv3"], width_mult=0.25, weights=bad)
        empty = tmp_path / f"empty{suffix}"
        empty.write_bytes(b"")
        with pytest.raises(WeightsError, match=rf"{empty}: empty file \(0 bytes\), not a weights file"):
            VGGBackbone("vgg11", ["conv3"], width_mult=0.25, weights=empty)
    with pytest.raises(FileNotFoundError, match=r"weights file not found: .*nowhere.pth"):
        VGGBackbone("vgg11", weights=tmp_path / "nowhere.pth")
    not_a_dict = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], not_a_dict)
    with pytest.raises(WeightsError, match=rf"{not_a_dict}: expected a non-empty state dict"):
        VGGBackbone("vgg11", weights=not_a_dict)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_a_file_pickling_code_is_refused_and_never_runs(tmp_path, protocol: int) -> None:
    marker = tmp_path / "marker.txt"
    evil = tmp_path / "evil.pth"
    sd = tv_features_state_dict("vgg11")
    sd["features.0.weight"] = _WritesMarker(marker)
    torch.save(sd, evil, pickle_protocol=protocol)

    with pytest.raises(WeightsError, match=rf"{evil}: refused to load: the file pickles Python objects"):
        VGGBackbone("vgg11", ["conv3"], weights=evil)
    assert not marker.exists()

    # the file really is dangerous: an unsafe load runs its code
    torch.load(evil, weights_only=False)
    assert marker.read_text() == "code ran"
