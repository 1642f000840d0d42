"""The original Caffe VGG weights read directly (:mod:`vggbackbone.caffe`).

Each test writes a ``.caffemodel`` with caffe.proto's own message declarations
(:func:`vggbackbone.caffe.caffe_messages`, packed floats as Caffe writes them), random weights, in
the V1 ``layers`` encoding of the 2014 VGG release (4-D ``num/channels/height/width`` shapes,
InnerProduct as ``(1, 1, out, in)``) or the V2 ``layer`` encoding (``BlobShape``), at 1/8 of VGG's
widths so it stays small, and reads it back.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.testing import assert_close
from torchvision.models.vgg import make_layers

from vggbackbone import VGGBackbone, WeightsError
from vggbackbone.caffe import CaffeModelError, caffe_messages, read_caffemodel

#: VGG widths at 1/8 (``width_mult=0.125``): conv blocks, fc6/fc7
WIDTHS = (8, 16, 32, 64, 64)
FC = 512
BLOCKS = {"vgg16": (2, 2, 3, 3, 3), "vgg19": (2, 2, 4, 4, 4)}
#: Caffe's VGG mean pixel, BGR (VGG_ILSVRC_16_layers_deploy.prototxt's data layer)
BGR_MEAN = (103.939, 116.779, 123.68)


def _random_layers(arch: str, seed: int = 0, num_classes: int = 10) -> dict[str, list[np.ndarray]]:
    """``{caffe layer name: [weight, bias]}`` with Caffe's shapes (conv ``(out, in, k, k)``, fc ``(out, in)``)."""
    rng = np.random.default_rng(seed)
    layers: dict[str, list[np.ndarray]] = {}
    in_ch = 3
    for b, (n, width) in enumerate(zip(BLOCKS[arch], WIDTHS), start=1):
        for c in range(1, n + 1):
            std = np.sqrt(2.0 / (in_ch * 9))
            layers[f"conv{b}_{c}"] = [
                (rng.standard_normal((width, in_ch, 3, 3)) * std).astype(np.float32),
                (rng.standard_normal(width) * 0.01).astype(np.float32),
            ]
            in_ch = width
    fc_in = in_ch * 49
    for name, out in (("fc6", FC), ("fc7", FC), ("fc8", num_classes)):
        layers[name] = [
            (rng.standard_normal((out, fc_in)) * np.sqrt(1.0 / fc_in)).astype(np.float32),
            (rng.standard_normal(out) * 0.01).astype(np.float32),
        ]
        fc_in = out
    return layers


def _write(path: Path, layers: dict[str, list[np.ndarray]], encoding: str, messages=None) -> Path:
    """Serialise ``layers`` as a NetParameter, with the ReLU/pool layers between them (no blobs)."""
    m = messages or caffe_messages()
    net = m.NetParameter(name="VGG_ILSVRC_16_layers")
    for name, arrays in layers.items():
        if encoding == "V2":
            layer = net.layer.add(name=name, type="Convolution" if name.startswith("conv") else "InnerProduct")
            for a in arrays:
                layer.blobs.add(shape={"dim": list(a.shape)}, data=a.ravel().tolist())
        else:
            layer = net.layers.add(name=name, type=4 if name.startswith("conv") else 14)
            for j, a in enumerate(arrays):
                if name.startswith("conv") and j == 0:
                    shape4 = a.shape  # (num, channels, height, width) = (out, in, k, k)
                elif j == 0:
                    shape4 = (1, 1, *a.shape)  # V1 InnerProduct weight
                else:
                    shape4 = (1, 1, 1, a.size)  # V1 bias
                layer.blobs.add(
                    num=shape4[0], channels=shape4[1], height=shape4[2], width=shape4[3], data=a.ravel().tolist()
                )
        if encoding == "V2":
            net.layer.add(name=f"relu_{name}", type="ReLU")
        else:
            net.layers.add(name=f"relu_{name}", type=18)  # V1 LayerType RELU
    path.write_bytes(net.SerializeToString())
    return path


@pytest.mark.parametrize("encoding", ["V1", "V2"])
@pytest.mark.parametrize("arch", ["vgg16", "vgg19"])
def test_caffemodel_reads_back_exactly_in_torchvision_layout(tmp_path: Path, arch: str, encoding: str) -> None:
    layers = _random_layers(arch)
    path = _write(tmp_path / "VGG_ILSVRC.caffemodel", layers, encoding)
    sd, info = read_caffemodel(path)
    assert info["caffe_encoding"] == encoding and info["blocks"] == list(BLOCKS[arch])
    # torchvision's layout: conv b_c at the flat index of its conv; fc6/7/8 at classifier.0/3/6
    tv = make_layers([w for n, w in zip(BLOCKS[arch], WIDTHS) for w in [w] * n + ["M"]])
    convs = [i for i, m in enumerate(tv) if isinstance(m, torch.nn.Conv2d)]
    names = [name for name in layers if name.startswith("conv")]
    expected = {
        f"features.{i}.{p}": layers[n][j] for i, n in zip(convs, names) for j, p in enumerate(("weight", "bias"))
    }
    for fc, key in (("fc6", "classifier.0"), ("fc7", "classifier.3"), ("fc8", "classifier.6")):
        expected[f"{key}.weight"], expected[f"{key}.bias"] = layers[fc]
    assert sorted(sd) == sorted(expected)
    for k, v in expected.items():
        assert sd[k].dtype == torch.float32 and torch.equal(sd[k], torch.from_numpy(v)), k


@pytest.mark.parametrize("encoding", ["V1", "V2"])
def test_caffemodel_backbone_equals_caffe_preprocessing_on_torchvision_vgg(tmp_path: Path, encoding: str) -> None:
    """``weights=<.caffemodel>``: the backbone takes RGB ``[0, 1]`` images, Caffe's normalisation
    implied, and every tap equals a torchvision VGG holding the file's (BGR) weights fed the way
    Caffe feeds it: BGR, 0-255, minus the mean pixel. fc6 is the 25088 -> 512x7x7 reshape."""
    layers = _random_layers("vgg16", seed=1)
    path = _write(tmp_path / "VGG_ILSVRC_16_layers.caffemodel", layers, encoding)
    taps = ["conv1", "pool1", "conv3", "pool4", "pool5", "fc6", "fc7"]
    bb = VGGBackbone("vgg16", taps, weights=path, width_mult=0.125).eval()
    assert bb.normalization.name == "caffe"

    sd, _ = read_caffemodel(path)
    tv = make_layers([w for n, w in zip(BLOCKS["vgg16"], WIDTHS) for w in [w] * n + ["M"]]).eval()
    tv.load_state_dict({k.removeprefix("features."): v for k, v in sd.items() if k.startswith("features.")})
    x = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    caffe_in = x[:, [2, 1, 0]] * 255 - torch.tensor(BGR_MEAN).view(1, 3, 1, 1)
    with torch.no_grad():
        ours = bb(bb.normalization(x))
        ends = {"conv1": 4, "pool1": 5, "conv3": 16, "pool4": 24, "pool5": 31}
        for tap, end in ends.items():
            assert_close(ours[tap], tv[:end](caffe_in), rtol=1e-4, atol=1e-3, msg=tap)
        pool5 = tv(caffe_in).flatten(1)
        fc6 = torch.relu(pool5 @ sd["classifier.0.weight"].T + sd["classifier.0.bias"])
        fc7 = torch.relu(fc6 @ sd["classifier.3.weight"].T + sd["classifier.3.bias"])
    assert_close(ours["fc6"].flatten(1), fc6, rtol=1e-4, atol=1e-3)
    assert_close(ours["fc7"].flatten(1), fc7, rtol=1e-4, atol=1e-3)


def test_unpacked_floats_are_read_too(tmp_path: Path) -> None:
    """Caffe writes floats packed; a file with unpacked ones (valid protobuf) reads the same."""
    from google.protobuf import descriptor_pool, message_factory

    from vggbackbone.caffe import _file_descriptor

    fdp = _file_descriptor(False)
    blob = next(m for m in fdp.message_type if m.name == "BlobProto")
    next(f for f in blob.field if f.name == "data").options.packed = False
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    unpacked = type(caffe_messages())(
        **{
            n: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"caffe.{n}"))
            for n in ("NetParameter", "BlobShape")
        }
    )
    layers = _random_layers("vgg16", seed=2)
    a = _write(tmp_path / "packed.caffemodel", layers, "V2")
    b = _write(tmp_path / "unpacked.caffemodel", layers, "V2", messages=unpacked)
    assert a.read_bytes() != b.read_bytes()
    sd_a, sd_b = read_caffemodel(a)[0], read_caffemodel(b)[0]
    assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)


def test_caffe_weights_refuse_another_normalisation(tmp_path: Path) -> None:
    path = _write(tmp_path / "vgg.caffemodel", _random_layers("vgg16"), "V1")
    with pytest.raises(WeightsError, match=r"normalization 'caffe'.*got normalization 'imagenet'"):
        VGGBackbone("vgg16", ["pool5"], weights=path, width_mult=0.125, normalization="imagenet")
    # Caffe statistics written another way (py-faster-rcnn's PIXEL_MEANS, BGR) are fine
    pixel_means = {"mean": [102.9801, 115.9465, 122.7717], "std": [1, 1, 1], "space": "bgr255"}
    bb = VGGBackbone("vgg16", ["pool5"], weights=path, width_mult=0.125, normalization=pixel_means)
    assert bb.normalization.name == "caffe"


def test_bad_caffemodels_are_refused_by_name(tmp_path: Path) -> None:
    layers = _random_layers("vgg16")
    wrong = dict(layers, conv2_1=[np.zeros((16, 5, 3, 3), np.float32), np.zeros(16, np.float32)])
    with pytest.raises(CaffeModelError, match=r"conv2_1 weight has shape \(16, 5, 3, 3\)"):
        read_caffemodel(_write(tmp_path / "a.caffemodel", wrong, "V2"))
    fc6 = dict(layers, fc6=[np.zeros((FC, 64 * 36), np.float32), np.zeros(FC, np.float32)])
    with pytest.raises(CaffeModelError, match=r"fc6 .* expected 512 outputs x 64x7x7 = 3136 inputs"):
        read_caffemodel(_write(tmp_path / "b.caffemodel", fc6, "V1"))
    extra = dict(layers, score_fr=[np.zeros((21, FC, 1, 1), np.float32), np.zeros(21, np.float32)])
    with pytest.raises(CaffeModelError, match=r"\['score_fr'\] are not part of a VGG"):
        read_caffemodel(_write(tmp_path / "c.caffemodel", extra, "V2"))
    gap = {k: v for k, v in layers.items() if k != "conv3_2"}
    with pytest.raises(CaffeModelError, match="block 3"):
        read_caffemodel(_write(tmp_path / "d.caffemodel", gap, "V2"))
    good = _write(tmp_path / "e.caffemodel", layers, "V2").read_bytes()
    (tmp_path / "truncated.caffemodel").write_bytes(good[: len(good) // 2])
    with pytest.raises(WeightsError, match="truncated.caffemodel"):
        VGGBackbone("vgg16", ["pool5"], weights=tmp_path / "truncated.caffemodel", width_mult=0.125)
    # a VGG-19 file for a VGG-16 backbone: the strict loader names the arch
    v19 = _write(tmp_path / "v19.caffemodel", _random_layers("vgg19"), "V1")
    with pytest.raises(WeightsError, match="vgg19"):
        VGGBackbone("vgg16", ["pool5"], weights=v19, width_mult=0.125)


def test_the_faster_rcnn_and_fcn_builders_start_from_a_caffemodel(tmp_path: Path) -> None:
    """What the Faster R-CNN and FCN recipes do by default: backbone, fc6/fc7 and normalisation from the file."""
    from vggbackbone.models import fasterrcnn_vgg, fcn_vgg

    layers = _random_layers("vgg16", seed=3)
    path = _write(tmp_path / "VGG_ILSVRC_16_layers.caffemodel", layers, "V1")
    det = fasterrcnn_vgg("vgg16", 3, weights_backbone=path, width_mult=0.125, min_size=64, max_size=64)
    assert det.normalization.name == "caffe" and det.transform.image_std == [1 / 255] * 3
    assert torch.equal(det.roi_heads.box_head.fc6.weight, torch.from_numpy(layers["fc6"][0]))
    bgr_first = det.backbone.features["conv1"][0].weight.flip(1)  # turned to take RGB
    assert torch.equal(bgr_first, torch.from_numpy(layers["conv1_1"][0]))
    seg = fcn_vgg("vgg16", 21, "8s", weights_backbone=path, width_mult=0.125)
    assert seg.normalization.name == "caffe"
    fc7 = next(m for n, m in seg.backbone.named_modules() if isinstance(m, torch.nn.Conv2d) and "fc7" in n)
    assert torch.equal(fc7.weight.flatten(1), torch.from_numpy(layers["fc7"][0]))
