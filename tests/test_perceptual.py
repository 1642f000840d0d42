"""Perceptual losses: LPIPS equals the lpips package, losses equal hand computations on torchvision's VGG,
input ranges are enforced, gradients reach the images only, autocast and torch.compile run."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from backbone_utils import randomize_, tv_features, tv_features_state_dict

from vggbackbone import IMAGENET
from vggbackbone.perceptual import GATYS_STYLE_LAYERS, LPIPS, PerceptualLoss, StyleLoss, gram_matrix

# torchvision vgg16.features[:i] ends at these layers
TV16 = {"relu1_2": 4, "relu2_2": 9, "relu3_3": 16, "relu4_3": 23, "relu5_3": 30}


@pytest.fixture(scope="module")
def vgg16_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("perceptual") / "vgg16_features.pth"
    torch.save(tv_features_state_dict("vgg16"), path)
    return path


@pytest.fixture(scope="module")
def lpips_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    lpips = pytest.importorskip("lpips")
    with warnings.catch_warnings():  # lpips passes torchvision's deprecated `pretrained=False`
        warnings.simplefilter("ignore", UserWarning)
        # pnet_rand: torchvision's VGG16 randomly initialised, not downloaded; the linear layers
        # are the package's shipped v0.1 weights.
        ref = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False)
    randomize_(ref.net)  # non-zero biases, so a mis-mapped bias would show
    ref.eval()
    sd = {f"features.{k}": v for s in range(1, 6) for k, v in getattr(ref.net, f"slice{s}").state_dict().items()}
    path = tmp_path_factory.mktemp("lpips") / "vgg16_lpips_trunk.pth"
    torch.save(sd, path)
    return ref, path


def test_lpips_equals_lpips_package(lpips_pair: tuple[torch.nn.Module, Path]) -> None:
    ref, path = lpips_pair
    ours = LPIPS(net="vgg", input_range=(-1, 1), weights=path)
    ours01 = LPIPS(net="vgg", input_range=(0, 1), weights=path)
    g = torch.Generator().manual_seed(0)
    for shape in ((4, 3, 64, 64), (2, 3, 48, 80)):
        x0 = torch.rand(shape, generator=g) * 2 - 1
        x1 = (x0 + 0.3 * torch.randn(shape, generator=g)).clamp(-1, 1)
        with torch.no_grad():
            expected = ref(x0, x1)
            torch.testing.assert_close(ours(x0, x1), expected, rtol=0, atol=1e-5)
            # [0, 1] images: ours with input_range=(0, 1) == lpips with normalize=True
            a, b = (x0 + 1) / 2, (x1 + 1) / 2
            torch.testing.assert_close(ours01(a, b), ref(a, b, normalize=True), rtol=0, atol=1e-5)
            torch.testing.assert_close(ours01(a, b), expected, rtol=0, atol=1e-5)
        assert expected.shape == (shape[0], 1, 1, 1) and expected.min() > 0
    # the pitfall the package leaves open: [-1, 1] images declared as [0, 1] are refused
    with pytest.raises(
        ValueError, match=r"outside the declared input_range=\(0.0, 1.0\).*declare input_range=\(-1, 1\)"
    ):
        ours01(x0, x1)


def test_lpips_needs_an_explicit_range_and_vgg(lpips_pair: tuple[torch.nn.Module, Path]) -> None:
    _, path = lpips_pair
    with pytest.raises(TypeError, match="input_range"):
        LPIPS(net="vgg", weights=path)  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="net='vgg'"):
        LPIPS(net="alex", input_range=(-1, 1), weights=path)


def _tv_loss(x: torch.Tensor, y: torch.Tensor, layers: dict[str, float], crit) -> torch.Tensor:
    tv = tv_features("vgg16")
    total = torch.zeros(())
    with torch.no_grad():
        for name, w in layers.items():
            f = tv[: TV16[name]]
            total = total + w * crit(f(IMAGENET(x)), f(IMAGENET(y)))
    return total


def test_perceptual_loss_equals_torchvision_features(vgg16_file: Path) -> None:
    layers = {"relu2_2": 1.0, "relu4_3": 0.5}
    x, y = torch.rand(2, 3, 48, 48), torch.rand(2, 3, 48, 48)
    for criterion, crit in (("l1", F.l1_loss), ("mse", F.mse_loss)):
        loss_fn = PerceptualLoss("vgg16", layers, criterion, input_range=(0, 1), weights=vgg16_file)
        with torch.no_grad():
            torch.testing.assert_close(loss_fn(x, y), _tv_loss(x, y, layers, crit), rtol=1e-5, atol=1e-6)
    # the same images given in [-1, 1] with input_range=(-1, 1): the same loss
    same = PerceptualLoss(
        "vgg16", list(layers), "mse", input_range=(-1, 1), layer_weights=[1.0, 0.5], weights=vgg16_file
    )
    with torch.no_grad():
        torch.testing.assert_close(same(2 * x - 1, 2 * y - 1), loss_fn(x, y), rtol=1e-4, atol=1e-6)
        assert loss_fn(x, x) == 0


def test_input_range_enforced(vgg16_file: Path) -> None:
    loss_fn = PerceptualLoss("vgg16", {"relu1_2": 1.0}, input_range=(0, 1), weights=vgg16_file)
    x = torch.rand(1, 3, 32, 32)
    with pytest.raises(ValueError, match=r"values span \[-0\.9.*outside the declared input_range"):
        loss_fn(x * 2 - 1, x)
    with pytest.raises(ValueError, match=r"target: values span"):
        loss_fn(x, x + 0.01)
    nan = x.clone()
    nan[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="outside the declared"):
        loss_fn(nan, x)
    loss_fn(x.clamp(max=1.0) + 5e-4 * (x > 0.99), x)  # float overshoot within 1e-3 is accepted
    with pytest.raises(ValueError, match=r"input_range must be \(0, 1\) or \(-1, 1\)"):
        PerceptualLoss("vgg16", input_range=(0, 255), weights=vgg16_file)
    with pytest.raises(TypeError, match="input_range"):
        PerceptualLoss("vgg16", weights=vgg16_file)  # type: ignore[call-arg]


def test_layers_and_weights_must_agree(vgg16_file: Path) -> None:
    with pytest.raises(ValueError, match="2 layers .* but 3 layer_weights .* counts must agree"):
        PerceptualLoss("vgg16", ["relu1_2", "relu2_2"], input_range=(0, 1), layer_weights=[1, 1, 1], weights=vgg16_file)
    with pytest.raises(ValueError, match=r"unknown VGG layer\(s\) \['relu5_4'\] .*valid names: .*'relu5_3'"):
        PerceptualLoss("vgg16", {"relu5_4": 1.0}, input_range=(0, 1), weights=vgg16_file)
    with pytest.raises(ValueError, match="not both"):
        PerceptualLoss("vgg16", {"relu1_2": 1.0}, input_range=(0, 1), layer_weights=[1.0], weights=vgg16_file)
    with pytest.raises(ValueError, match="criterion"):
        PerceptualLoss("vgg16", criterion="l3", input_range=(0, 1), weights=vgg16_file)


def test_gradients_reach_images_not_vgg(vgg16_file: Path) -> None:
    loss_fn = PerceptualLoss("vgg16", {"relu1_2": 1.0, "relu3_3": 1.0}, input_range=(-1, 1), weights=vgg16_file)
    loss_fn.train()
    assert not loss_fn.vgg.net.training
    assert not any(p.requires_grad for p in loss_fn.parameters())
    x = (torch.rand(2, 3, 32, 32) * 2 - 1).requires_grad_()
    loss = loss_fn(x, torch.rand(2, 3, 32, 32) * 2 - 1)
    loss.backward()
    assert x.grad is not None and x.grad.abs().sum() > 0 and torch.isfinite(x.grad).all()
    assert all(p.grad is None for p in loss_fn.parameters())


def test_autocast_bf16_and_compile(vgg16_file: Path) -> None:
    loss_fn = PerceptualLoss("vgg16", {"relu1_2": 1.0, "relu2_2": 1.0}, input_range=(0, 1), weights=vgg16_file)
    x, y = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        ref = loss_fn(x, y)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = loss_fn(x, y)
        assert low.dtype == torch.float32 and torch.isfinite(low)
        torch.testing.assert_close(low, ref, rtol=0.05, atol=0)
        small = PerceptualLoss("vgg16", {"relu1_2": 1.0}, input_range=(0, 1), weights=vgg16_file)
        ref = small(x, y)
        compiled = torch.compile(small)  # one compile, of the shallowest net (test time)
        torch.testing.assert_close(compiled(x, y), ref, rtol=1e-5, atol=1e-6)
        with pytest.raises(ValueError, match="outside the declared"):
            compiled(x * 2 - 1, y)


def test_style_loss(vgg16_file: Path) -> None:
    feat = torch.rand(2, 8, 5, 6)
    f = feat.reshape(2, 8, 30)
    torch.testing.assert_close(gram_matrix(feat), f @ f.transpose(1, 2) / (8 * 30))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert gram_matrix(feat).dtype == torch.float32

    layers = {"relu1_2": 1.0, "relu2_2": 1.0, "relu3_3": 1.0}
    style = StyleLoss("vgg16", layers, input_range=(0, 1), weights=vgg16_file)
    tv = tv_features("vgg16")
    x, s = torch.rand(1, 3, 32, 32), torch.rand(1, 3, 48, 48)  # a style image of another size
    with torch.no_grad():
        expected = sum(
            F.mse_loss(gram_matrix(tv[: TV16[n]](IMAGENET(x))), gram_matrix(tv[: TV16[n]](IMAGENET(s)))) for n in layers
        )
        torch.testing.assert_close(style(x, s), expected, rtol=1e-4, atol=0)
    # optimising the image lowers the style loss
    img = x.clone().requires_grad_()
    opt = torch.optim.Adam([img], lr=0.02)
    losses = []
    for _ in range(8):
        loss = style(img.clamp(0, 1), s)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_style_loss_defaults_are_gatys() -> None:
    style = StyleLoss(input_range=(0, 1), weights=None)  # random VGG-19: only the layout is checked
    assert style.layer_weights == GATYS_STYLE_LAYERS == {f"relu{i}_1": 0.2 for i in range(1, 6)}
    assert style.vgg.net.arch == "vgg19"
    assert list(style.vgg(torch.rand(1, 3, 32, 32))) == list(GATYS_STYLE_LAYERS)


def test_esrgan_pre_activation_and_gatys_content(tmp_path: Path) -> None:
    """VGG-19 conv5_4 *before* its ReLU (ESRGAN) and relu4_2 (Gatys content) equal torchvision's slices."""
    path = tmp_path / "vgg19_features.pth"
    torch.save(tv_features_state_dict("vgg19"), path)
    tv = tv_features("vgg19")
    x, y = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    esrgan = PerceptualLoss("vgg19", {"conv5_4": 1.0}, "l1", input_range=(0, 1), weights=path)
    gatys = PerceptualLoss("vgg19", {"relu4_2": 1.0}, "mse", input_range=(0, 1), weights=path)
    with torch.no_grad():
        fx, fy = tv[:35](IMAGENET(x)), tv[:35](IMAGENET(y))  # features[34] is conv5_4; its ReLU not run
        assert fx.min() < 0  # pre-activation: negative values survive
        torch.testing.assert_close(esrgan(x, y), F.l1_loss(fx, fy), rtol=1e-5, atol=1e-7)
        gx, gy = tv[:23](IMAGENET(x)), tv[:23](IMAGENET(y))
        torch.testing.assert_close(gatys(x, y), F.mse_loss(gx, gy), rtol=1e-5, atol=1e-7)
