"""vgg_classifier: torchvision/timm logits exactly, fine-tuning heads, custom block specs, small inputs."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import timm
import torch
from backbone_utils import randomize_, scratch_dir, tv_features_state_dict, tv_model

from vggbackbone import WeightsError
from vggbackbone.models import VGGClassifier, vgg_classifier

D2L_VGG11 = ((1, 64), (1, 128), (2, 256), (2, 512), (2, 512))


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    with scratch_dir(tmp_path_factory.mktemp("classifier")) as d:
        yield d


def _tv_file(scratch: Path, arch: str) -> tuple[torch.nn.Module, Path]:
    tv = tv_model(arch)
    path = scratch / f"tv_{arch}.pth"
    if not path.exists():
        torch.save(tv.state_dict(), path)
    return tv, path


@pytest.mark.parametrize(("arch", "size"), [("vgg11_bn", 224), ("vgg16", 64), ("vgg19", 64)])
def test_torchvision_logits_exact(scratch: Path, arch: str, size: int) -> None:
    tv, path = _tv_file(scratch, arch)
    model = vgg_classifier(arch, weights=path).eval()
    assert model.normalization.name == "imagenet"
    x = torch.rand(2, 3, size, size)
    with torch.no_grad():
        ours, ref = model(x), tv(model.normalization(x))
    assert ours.shape == (2, 1000)
    assert torch.equal(ours, ref)  # 64x64: pool5 is 2x2, replicated to 7x7 by both
    with torch.no_grad():  # fc7's output (pre-logits) is torchvision's classifier minus fc8
        assert torch.equal(
            model.forward_head(model.forward_features(x), pre_logits=True),
            tv.classifier[:-1](torch.flatten(tv.avgpool(tv.features(model.normalization(x))), 1)),
        )


def test_timm_logits_exact(scratch: Path) -> None:
    with torch.random.fork_rng():
        torch.manual_seed(1)
        tm = randomize_(timm.create_model("vgg16", pretrained=False)).eval()
    path = scratch / "timm_vgg16.pth"
    torch.save(tm.state_dict(), path)
    model = vgg_classifier("vgg16", weights=path, head="conv").eval()
    for size in (64, 224, 288):  # pool5 2x2 (brought up to 7x7), 7x7, 9x9 (dense: 3x3 fc6 map averaged)
        x = torch.rand(1, 3, size, size)
        with torch.no_grad():
            ref = tm(model.normalization(x))
            assert torch.equal(model(x), ref), size
            if size == 224:  # the same weights through torchvision's head: equal up to rounding
                model.head = "linear"
                torch.testing.assert_close(model(x), ref, rtol=1e-4, atol=1e-4)
                model.head = "conv"


def test_finetune_new_fc8(scratch: Path) -> None:
    tv, path = _tv_file(scratch, "vgg11_bn")
    with pytest.warns(UserWarning, match=r"fc8\.weight .*another number of classes.*fc8\.bias"):
        model = vgg_classifier("vgg11_bn", num_classes=10, weights=path)
    assert model.fc8.weight.shape == (10, 4096)
    assert torch.equal(model.fc6.weight, tv.classifier[0].weight)
    assert torch.equal(model.fc7.bias, tv.classifier[3].bias)
    assert model.fc8.weight.std() < 0.02 and not model.fc8.bias.any()  # torchvision's fresh init
    # the conv layers loaded too: features equal torchvision's
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model.eval().forward_features(x), tv.features(model.normalization(x)))
    model.reset_classifier(3)
    assert model(x).shape == (1, 3)


def test_features_only_file_gives_fresh_head(tmp_path: Path) -> None:
    path = tmp_path / "features.pth"
    torch.save(tv_features_state_dict("vgg11"), path)
    with pytest.warns(UserWarning, match=r"6 classifier key\(s\) left freshly initialised: fc6\.weight \(not in"):
        model = vgg_classifier("vgg11", num_classes=5, weights=path, fc_channels=64)
    assert model.fc6.weight.shape == (64, 512 * 49) and not model.fc6.weight.is_meta
    assert torch.isfinite(model(torch.rand(1, 3, 32, 32))).all()


def test_wrong_fc_width_refused(scratch: Path) -> None:
    _, path = _tv_file(scratch, "vgg11_bn")
    with pytest.raises(WeightsError, match=r"fc6/fc7 do not fit.*fc6\.weight"):
        vgg_classifier("vgg11_bn", weights=path, fc_channels=1024)


def test_d2l_vgg11_grayscale_small_input_trains() -> None:
    model = vgg_classifier(D2L_VGG11, num_classes=4, in_channels=1, width_mult=0.125, fc_channels=64, dropout=0.0)
    assert isinstance(model, VGGClassifier)
    assert model.normalization.mean == (0.5,) and model.normalization.std == (0.5,)
    assert model.fc6.in_features == 64 * 49
    # four classes told apart by the brightness of one quadrant, 32x32 (pool5 is 1x1)
    g = torch.Generator().manual_seed(0)
    y = torch.arange(4).repeat(4)
    x = torch.rand(16, 1, 32, 32, generator=g) * 0.3
    for i, c in enumerate(y.tolist()):
        r, s = divmod(c, 2)
        x[i, 0, 16 * r : 16 * r + 16, 16 * s : 16 * s + 16] += 0.7
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(15):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_small_pool5_is_replicated_to_7x7() -> None:
    """A 1x1 (or 2x2) pool5 is adaptive-average-pooled *up* to 7x7: every cell repeats."""
    model = vgg_classifier("vgg11", num_classes=3, width_mult=0.125, fc_channels=32).eval()
    for head in ("linear", "conv"):
        model.head = head
        feat = torch.rand(2, 64, 1, 1)
        with torch.no_grad():
            assert torch.equal(model.forward_head(feat), model.forward_head(feat.expand(2, 64, 7, 7).contiguous()))
    with pytest.raises(ValueError, match=r"16x16 is smaller than 32"):
        model(torch.rand(1, 3, 16, 16))


def test_bad_options_refused() -> None:
    with pytest.raises(ValueError, match="head must be"):
        vgg_classifier("vgg11", width_mult=0.125, head="dense")
    with pytest.raises(ValueError, match="return_layers"):
        vgg_classifier("vgg11", width_mult=0.125, return_layers=["conv5"])


def test_short_custom_spec_without_weights_is_silent() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = vgg_classifier([(1, 16), (1, 32)], num_classes=2, fc_channels=16).eval()
    assert model.backbone.return_layers == {"pool2": "pool2"}
    assert model(torch.rand(1, 3, 8, 8)).shape == (1, 2)  # two pools: 4x4 is the smallest input
