"""One model contract (``vggbackbone.models``): the registry, the builder core, self-normalising
models, and nothing changed for existing models and their state dicts.

``tests/fixtures/models/`` was written by ``make_models.py`` at dbf3658, before the builders
shared one core: every key and shape of each builder at several widths, and tiny state dicts.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

import vggbackbone.models as models
from vggbackbone import VGGBackbone
from vggbackbone.models import core, create_model, list_models, register_model
from vggbackbone.utils import make_divisible, scale_width
from vggbackbone.weights import ReadWeights

FIXTURES = Path(__file__).parent / "fixtures" / "models"
_spec = importlib.util.spec_from_file_location("make_models", FIXTURES / "make_models.py")
make_models = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_models)


# ----------------------------------------------------------------------------- registry
def test_every_builder_is_listed_under_its_task() -> None:
    assert list_models("detect") == ["fasterrcnn", "ssd", "retinanet", "fcos"]
    assert list_models("segment") == ["fcn32s", "fcn16s", "fcn8s", "unet"]
    assert list_models("reid") == ["reid_vgg"]
    assert list_models("classify") == ["vgg"]
    assert list_models() == [n for t in models.TASKS for n in list_models(t)]
    builders = {models.model_entry(n).builder for n in list_models()}
    for fn in (models.fasterrcnn_vgg, models.ssd_vgg, models.retinanet_vgg, models.fcos_vgg):
        assert fn in builders
    assert models.unet_vgg in builders and models.reid_vgg in builders and models.vgg_classifier in builders
    variants = [models.model_entry(f"fcn{v}").builder for v in ("32s", "16s", "8s")]
    assert [(b.func, b.keywords) for b in variants] == [(models.fcn_vgg, {"variant": v}) for v in ("32s", "16s", "8s")]


@pytest.mark.parametrize(
    ("name", "builder", "kwargs"),
    [
        ("fcn16s", lambda **kw: models.fcn_vgg(variant="16s", **kw), {}),
        ("unet", models.unet_vgg, {"decoder_channels": [8] * 5}),
        ("ssd", models.ssd_vgg, {}),
        ("vgg", models.vgg_classifier, {"fc_channels": 16}),
    ],
)
def test_create_model_equals_the_builder(name, builder, kwargs) -> None:
    kwargs = {"arch": "vgg11", "num_classes": 3, "width_mult": 0.0625, **kwargs}
    torch.manual_seed(3)
    made = create_model(name, **kwargs)
    torch.manual_seed(3)
    direct = builder(**kwargs)
    assert type(made) is type(direct)
    a, b = made.state_dict(), direct.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_unknown_names_are_refused_naming_the_choices() -> None:
    with pytest.raises(ValueError, match=r"unknown model 'yolo'; registered: fasterrcnn, ssd, retinanet, fcos, fcn32s"):
        create_model("yolo", num_classes=3)
    with pytest.raises(ValueError, match=r"unknown model 'unet' for task 'detect'; registered: fasterrcnn, ssd,"):
        models.model_entry("unet", "detect")
    with pytest.raises(ValueError, match=r"no model registered for task 'detection'; tasks: detect, segment, reid"):
        list_models("detection")


def test_register_model_as_decorator_and_twice(monkeypatch) -> None:
    from vggbackbone.models import registry

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))

    @register_model("tiny_reid", task="reid")
    def tiny_reid(**kw):
        return models.reid_vgg(arch=[(1, 8), (1, 8), (1, 8)], **kw)

    assert list_models("reid") == ["reid_vgg", "tiny_reid"]
    assert isinstance(create_model("tiny_reid", num_classes=2), models.ReIDNet)
    register_model("tiny_reid", tiny_reid, task="reid")  # the same again: no change
    with pytest.raises(ValueError, match="'tiny_reid' is already registered"):
        register_model("tiny_reid", models.reid_vgg, task="reid")


# ----------------------------------------------------------------------------- nothing changed
@pytest.mark.parametrize("name", list(make_models.BUILDS))
def test_channel_counts_at_every_width_are_unchanged(name: str) -> None:
    """Every key and shape of each builder at widths 0.1, 0.3 and 1 (the width rounding, written
    once now, and once with FCOS's divisor 32) equals what the code wrote before."""
    before = json.loads((FIXTURES / "shapes.json").read_text())[name]
    assert make_models.shapes_of(name) == before


def test_scale_width_is_the_rounding_every_model_had() -> None:
    for channels in (64, 256, 512, 1024, 4096):
        for w in (0.0625, 0.1, 0.125, 0.3, 0.5, 0.75, 2.0):
            assert scale_width(channels, w) == make_divisible(channels * w)
            assert scale_width(channels, w, 32) == make_divisible(channels * w, 32)
        assert scale_width(channels, 1.0) == channels == scale_width(channels, 1.0, 32)
    assert scale_width(256, 0.3, 32) == 96  # FCOS's head: 76.8 -> a multiple of 32, not below 90%


@pytest.mark.parametrize("name", list(make_models.BUILDS))
def test_state_dicts_written_by_the_earlier_code_load_strictly(name: str) -> None:
    builder, kwargs = make_models.BUILDS[name]
    model = builder(**kwargs, **make_models.SMALL[name], width_mult=make_models.TINY)
    old = torch.load(FIXTURES / "state_dicts" / f"{name}.pt", map_location="cpu", weights_only=True)
    assert list(model.state_dict()) == list(old)  # the same keys, in the same order
    model.load_state_dict(old, strict=True)
    assert all(torch.equal(v, old[k]) for k, v in model.state_dict().items())


# ----------------------------------------------------------------------------- one normalisation
@pytest.mark.parametrize("name", ["fcn8s", "unet", "reid", "classifier"])
def test_self_normalising_models_share_one_base(name: str) -> None:
    builder, kwargs = make_models.BUILDS[name]
    model = builder(**kwargs, **make_models.SMALL[name], width_mult=make_models.TINY, normalization="caffe")
    assert isinstance(model, core.NormalizingModel)
    assert model.normalization.name == "caffe" and model.normalization == model.backbone.normalization
    assert torch.equal(model.mean.flatten(), torch.tensor(model.normalization.mean))
    # the statistics are not state: they come with the weights and the options, as before
    assert not any("input_norm" in k or k in ("mean", "std") for k in model.state_dict())
    x = torch.rand(1, 3, 64, 64)
    torch.testing.assert_close(model.normalize_input(x), model.normalization(x))


# ----------------------------------------------------------------------------- weights read once
def _count_reads(monkeypatch) -> list[str]:
    import vggbackbone.weights as weights

    reads: list[str] = []
    real = weights.load_state_dict_file

    def counted(path):
        reads.append(str(path))
        return real(path)

    monkeypatch.setattr(weights, "load_state_dict_file", counted)
    return reads


@pytest.mark.parametrize(
    ("builder", "kwargs", "key"),
    [
        (models.ssd_vgg, {"weights_backbone": None, "fc_channels": 16}, "weights_backbone"),
        (models.fasterrcnn_vgg, {"weights_backbone": None, "representation_size": 64}, "weights_backbone"),
        (models.vgg_classifier, {"weights": None, "fc_channels": 64}, "weights"),
    ],
)
def test_a_weights_file_is_read_once(builder, kwargs, key, tmp_path, monkeypatch) -> None:
    """Before, SSD read the backbone file three times (backbone, classifier check, fc7 backbone),
    Faster R-CNN and the classifier twice; the heads now take fc6/fc7 (fc8) from the one read."""
    full = VGGBackbone("vgg11", ["fc7"], width_mult=0.0625, fc_channels=64)
    path = tmp_path / "vgg11.pth"
    full.save_weights(path)
    reads = _count_reads(monkeypatch)
    model = builder("vgg11", num_classes=3, width_mult=0.0625, **{**kwargs, key: str(path)})
    assert reads == [str(path)]
    fc6 = full.features.fc6.conv.weight
    if builder is models.ssd_vgg:  # the paper's subsampling of fc6
        torch.testing.assert_close(model.backbone.fc.fc6.weight, fc6[::4, :, ::3, ::3])
    elif builder is models.fasterrcnn_vgg:
        torch.testing.assert_close(model.roi_heads.box_head.fc6.weight, fc6.flatten(1))
    else:
        torch.testing.assert_close(model.fc6.weight, fc6.flatten(1))


def test_build_trunk_returns_what_it_read(tmp_path) -> None:
    VGGBackbone("vgg11", ["fc7"], width_mult=0.0625).save_weights(tmp_path / "w.safetensors")
    body, read = core.build_trunk("vgg11", ["conv5"], tmp_path / "w.safetensors", width_mult=0.0625)
    assert isinstance(read, ReadWeights) and "features.fc6.conv.weight" in read.state_dict
    assert body.return_layers == {"conv5": "conv5"} and read.description.endswith("w.safetensors")
    with pytest.raises(ValueError, match="was read for vgg11, this backbone is vgg13"):
        VGGBackbone("vgg13", weights=read)
    assert core.build_trunk("vgg11", ["conv5"], width_mult=0.0625)[1] is None


# ----------------------------------------------------------------------------- the pretrained rule
def test_pretrained_structure_is_decided_from_the_flag_not_from_loaded_weights() -> None:
    """pretrained=True without weights (a checkpoint's rebuild) is the pretrained structure."""
    for builder, frozen in ((models.fasterrcnn_vgg, 2), (models.ssd_vgg, 1), (models.fcos_vgg, 2)):
        made = builder("vgg11_bn", num_classes=3, width_mult=0.0625, pretrained=True)
        body = made.backbone if isinstance(made.backbone, VGGBackbone) else made.backbone.body
        assert body.frozen_stages == frozen, builder.__name__
        assert any(isinstance(m, FrozenBatchNorm2d) for m in body.modules())
        assert not any(isinstance(m, nn.BatchNorm2d) for m in body.modules())
        scratch = builder("vgg11_bn", num_classes=3, width_mult=0.0625)
        body = scratch.backbone if isinstance(scratch.backbone, VGGBackbone) else scratch.backbone.body
        assert body.frozen_stages == 0 and not any(isinstance(m, FrozenBatchNorm2d) for m in body.modules())
    assert "pretrained" in inspect.signature(models.retinanet_vgg).parameters
    with pytest.raises(TypeError, match="pretrained must be True, False or None"):
        models.fasterrcnn_vgg("vgg11", num_classes=3, width_mult=0.0625, pretrained="yes")


def test_checks_made_once() -> None:
    with pytest.raises(ValueError, match=r"fasterrcnn_vgg: num_classes must be >= 2 \(it counts the background"):
        models.fasterrcnn_vgg("vgg11", num_classes=1, width_mult=0.0625)
    with pytest.raises(ValueError, match="UNetVGG: num_classes must be >= 1, got 0"):
        models.unet_vgg("vgg11", num_classes=0, width_mult=0.0625)
    with pytest.raises(ValueError, match="ReIDNet: num_classes must be a whole number, got 2.5"):
        models.reid_vgg("vgg11", num_classes=2.5, width_mult=0.0625)
    with pytest.raises(ValueError, match=r"ssd_vgg: frozen_stages must be in 0..5"):
        models.ssd_vgg("vgg11", num_classes=3, width_mult=0.0625, frozen_stages=6)
    with pytest.raises(ValueError, match="ssd_vgg needs a 5-block VGG"):
        models.ssd_vgg([(1, 8), (1, 8), (1, 8), (1, 8)], num_classes=3)


# ----------------------------------------------------------------------------- moved, old names kept
def test_plain_pytorch_parts_live_in_the_library_and_keep_their_old_names() -> None:
    import tasks.classify
    import tasks.reid
    import tasks.segment

    assert tasks.reid.CenterLoss is models.CenterLoss
    assert tasks.segment.sliding_window_logits is models.sliding_window_logits
    assert tasks.classify.ExportableClassifier is models.ExportableClassifier
    for module in (models.reid, models.sliding_window, models.classifier):
        assert "lightning" not in inspect.getsource(module).lower()
