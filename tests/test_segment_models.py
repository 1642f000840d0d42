"""FCN-32s/16s/8s, U-Net and the smp encoder on VGGBackbone (tiny widths, CPU)."""

from __future__ import annotations

import pytest
import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F

from vggbackbone import ARCHS, VGGBackbone
from vggbackbone.models import FCN, UNetVGG, VGGSmpEncoder, fcn_vgg, register_smp_encoder, unet_vgg
from vggbackbone.models.fcn import BilinearUpsample, bilinear_kernel

TINY = {"width_mult": 0.125, "fc_channels": 32}
ODD_SIZES = [(1, 1), (17, 23), (33, 65), (101, 31)]


# ---------------------------------------------------------------------------- FCN
def test_bilinear_kernel_matches_fcn_upsample_filt() -> None:
    # FCN's surgery.upsample_filt(4): 1D [0.25, 0.75, 0.75, 0.25], outer product in 2D
    k = bilinear_kernel(2)
    row = torch.tensor([0.25, 0.75, 0.75, 0.25])
    assert torch.equal(k, row[:, None] * row[None, :])


@pytest.mark.parametrize("factor", [2, 8, 16, 32])
@pytest.mark.parametrize("learnable", [True, False])
def test_bilinear_upsample_init_equals_interpolate(factor: int, learnable: bool) -> None:
    up = BilinearUpsample(3, factor, learnable=learnable)
    assert up.deconv.weight.requires_grad == learnable
    x = torch.randn(2, 3, 5, 7)
    expected = F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False)
    out = up(x, (5 * factor, 7 * factor))
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
    # cropping keeps the top-left part, aligned
    torch.testing.assert_close(
        up(x, (5 * factor - 3, 7 * factor - 1)), expected[..., : 5 * factor - 3, : 7 * factor - 1], rtol=0, atol=1e-5
    )


@pytest.mark.parametrize("variant", ["32s", "16s", "8s"])
def test_fcn_output_size_equals_input_size(variant: str) -> None:
    model = fcn_vgg("vgg16", 5, variant, **TINY).eval()
    with torch.no_grad():
        for h, w in ODD_SIZES:
            assert model(torch.randn(2, 3, h, w)).shape == (2, 5, h, w)


def test_fcn_scores_start_at_zero_and_skips_are_scaled() -> None:
    model = fcn_vgg("vgg11", 3, "8s", **TINY).eval()
    x = torch.randn(1, 3, 45, 61)
    with torch.no_grad():
        assert model(x).abs().max() == 0  # every score layer is zero-initialised
        for conv in (model.score_fr, model.score_pool4, model.score_pool3):
            conv.bias.fill_(1.0)
        # bias 1 at stride 32, + bias 1 at 16, + bias 1 at 8: bilinear upsampling of constants is exact
        torch.testing.assert_close(model(x), torch.full((1, 3, 45, 61), 3.0))
    assert (model.pool4_scale, model.pool3_scale) == (0.01, 1e-4)


def test_fcn8s_skip_is_aligned_with_the_input() -> None:
    """A pool3 skip that passes one input channel through must come back where it was."""
    model = fcn_vgg([(1, 8), (1, 8), (1, 8), (1, 8), (1, 8)], 1, "8s", fc_channels=8, pool3_scale=1.0).eval()
    bb = model.backbone
    with torch.no_grad():
        for m in bb.modules():  # identity-like convs: every block copies channel 0 of its input
            if isinstance(m, torch.nn.Conv2d):
                m.weight.zero_()
                m.bias.zero_()
                m.weight[0, 0, m.kernel_size[0] // 2, m.kernel_size[1] // 2] = 1.0
        model.score_pool3.weight.zero_()
        model.score_pool3.weight[0, 0] = 1.0
    # a bright 8x8 square on the stride-8 grid survives the max-pools as one stride-8 cell
    x = torch.zeros(1, 3, 64, 64)
    x[0, 0, 16:24, 40:48] = 1.0
    with torch.no_grad():
        out = model(x)[0, 0]
    peak = (out == out.max()).nonzero().float().mean(0)
    assert torch.allclose(peak, torch.tensor([19.5, 43.5]), atol=0.5), peak


@pytest.mark.parametrize("head", ["fcn8s", "unet"])
def test_frozen_stages_do_not_train_and_loss_goes_down(head: str) -> None:
    torch.manual_seed(0)
    if head == "fcn8s":
        model = fcn_vgg("vgg11_bn", 3, "8s", frozen_stages=2, pool4_scale=1.0, pool3_scale=1.0, **TINY)
    else:
        model = unet_vgg("vgg11_bn", 3, frozen_stages=2, width_mult=0.125, decoder_channels=[16, 16, 8, 8, 8])
    frozen = {k: v.clone() for k, v in model.backbone.features["conv1"].state_dict().items()}
    assert not any(p.requires_grad for p in model.backbone.features["conv2"].parameters())
    # a learnable toy problem: 8x8 blocks of random colour, class = how many of R, G exceed 0.5
    x = F.interpolate(torch.rand(4, 3, 6, 6), scale_factor=8, mode="nearest")
    y = (x[:, 0] > 0.5).long() + (x[:, 1] > 0.5).long()
    y[:, :2] = 255
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(15):
        loss = F.cross_entropy(model(x), y, ignore_index=255)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
    for k, v in model.backbone.features["conv1"].state_dict().items():
        assert torch.equal(v, frozen[k]), k  # frozen BN statistics and weights unchanged


def test_fcn_rejects_bad_config() -> None:
    with pytest.raises(ValueError, match="variant"):
        fcn_vgg("vgg16", 3, "4s", **TINY)
    with pytest.raises(ValueError, match="5-block"):
        fcn_vgg([(1, 8), (1, 8), (1, 8)], 3, "32s", fc_channels=8)
    bb = VGGBackbone("vgg11", ["fc7"], **TINY)
    with pytest.raises(ValueError, match="pool4"):
        FCN(bb, 3, "16s")
    with pytest.raises(ValueError, match="fc_padding='same'"):  # FCN's skips need aligned fc maps
        FCN(VGGBackbone("vgg11", ["pool4", "fc7"], **TINY), 3, "16s")


# ---------------------------------------------------------------------------- U-Net
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_unet_every_arch_any_size(arch: str) -> None:
    model = unet_vgg(arch, 4, width_mult=0.125, decoder_channels=[16, 16, 8, 8, 8]).eval()
    with torch.no_grad():
        for h, w in ODD_SIZES[1:3]:
            assert model(torch.randn(1, 3, h, w)).shape == (1, 4, h, w)


def test_unet_custom_spec_in_channels_and_conv1_skip() -> None:
    model = unet_vgg([(1, 8), (2, 16), (2, 16)], 2, in_channels=1, decoder_channels=[16, 8, 8]).eval()
    assert isinstance(model, UNetVGG)
    with torch.no_grad():
        assert model(torch.randn(2, 1, 9, 30)).shape == (2, 2, 9, 30)
    # the last decoder block sees conv1 (8 channels) as its skip, unlike smp.Unet("vgg16")
    assert model.decoder.blocks[-1].conv1[0].in_channels == 8 + 8
    with pytest.raises(ValueError, match="decoder_channels"):
        unet_vgg("vgg16", 2, width_mult=0.125, decoder_channels=[8, 8])


def test_unet_loads_backbone_weights_from_torchvision_state_dict(tmp_path) -> None:
    import torchvision

    tv = torchvision.models.vgg11(weights=None)
    # the convolutional part only (what a U-Net uses; the classifier would add 500 MB)
    torch.save({k: v for k, v in tv.state_dict().items() if k.startswith("features.")}, tmp_path / "vgg11.pth")
    model = unet_vgg("vgg11", 3, weights_backbone=tmp_path / "vgg11.pth", decoder_channels=[16, 16, 8, 8, 8]).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        conv5 = model.backbone(x)["conv5"]
        torch.testing.assert_close(conv5, tv.features[:20](x))


# ---------------------------------------------------------------------------- smp encoder
def test_smp_encoder_names_are_registered() -> None:
    for arch in ARCHS:
        assert f"vggbackbone_{arch}" in smp.encoders.get_encoder_names()
    enc = smp.encoders.get_encoder("vggbackbone_vgg16", depth=5)
    assert isinstance(enc, VGGSmpEncoder)
    assert enc.out_channels == [64, 128, 256, 512, 512, 512]


@pytest.mark.parametrize(
    ("decoder", "kwargs", "strides"),
    [
        (smp.Unet, {}, [1, 2, 4, 8, 16, 32]),
        (smp.FPN, {}, [1, 2, 4, 8, 16, 32]),
        (smp.DeepLabV3, {}, [1, 2, 4, 8, 8, 8]),
        (smp.DeepLabV3Plus, {"encoder_output_stride": 16}, [1, 2, 4, 8, 16, 16]),
    ],
)
def test_smp_decoders_run_on_our_encoder(decoder, kwargs, strides) -> None:
    name = register_smp_encoder("vggbackbone_test_tiny_bn", "vgg16_bn", width_mult=0.125)
    model = decoder(name, encoder_weights=None, classes=3, **kwargs).eval()
    # the encoder smp built is our backbone: with the same weights its features are our taps, bit for bit
    bb = model.encoder.backbone
    ref = VGGBackbone("vgg16_bn", list(bb.return_layers), width_mult=0.125, output_stride=bb.output_stride).eval()
    ref.load_state_dict(bb.state_dict())
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        feats = model.encoder(x)
        assert [96 // f.shape[-1] for f in feats] == strides
        for got, want in zip(feats, ref(x).values(), strict=True):
            assert torch.equal(got, want)
        assert model(x).shape == (2, 3, 64, 96)


def test_smp_dilated_encoder_matches_backbone_and_loads_weights(tmp_path) -> None:
    ref = VGGBackbone(
        "vgg11", ["conv1", "conv2", "conv3", "conv4", "conv5", "pool5"], output_stride=8, width_mult=0.125
    )
    path = ref.save_weights(tmp_path / "tiny.safetensors")
    name = register_smp_encoder("vggbackbone_test_tiny", "vgg11", width_mult=0.125)
    model = smp.DeepLabV3(name, encoder_weights=None, classes=2, encoder_output_stride=8).eval()
    model.encoder.load_weights(path)
    x = torch.randn(1, 3, 40, 56)
    with torch.no_grad():
        for got, want in zip(model.encoder(x), ref(x).values(), strict=True):
            assert torch.equal(got, want)
    # smp's own VGG encoder cannot do this
    with pytest.raises(ValueError, match="dilated"):
        smp.DeepLabV3("vgg11", encoder_weights=None, classes=2)


def test_smp_encoder_in_channels() -> None:
    model = smp.Unet(
        "vggbackbone_vgg11", encoder_weights=None, classes=2, in_channels=1, decoder_channels=[16, 16, 8, 8, 8]
    )
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(1, 1, 64, 64)).shape == (1, 2, 64, 64)
    assert model.encoder.backbone.features["conv1"][0].weight.shape == (64, 1, 3, 3)


@pytest.mark.parametrize("in_channels", [1, 2, 5])
def test_set_in_channels_adapts_rgb_weights_by_smps_rule(tmp_path, in_channels: int) -> None:
    """With loaded weights, conv1_1 follows smp's ``patch_first_conv``: 1 channel = the sum over RGB;
    ``n`` channels = RGB repeated cyclically (``w[:, i % 3]``) and scaled by ``3 / n``."""
    src = VGGBackbone("vgg11", ["pool5"], width_mult=0.125)
    path = src.save_weights(tmp_path / "tiny.safetensors")
    rgb = src.features["conv1"][0].weight.detach().clone()
    enc = VGGSmpEncoder("vgg11", width_mult=0.125, weights=path)
    enc.set_in_channels(in_channels)
    got = enc.backbone.features["conv1"][0].weight
    if in_channels == 1:
        want = rgb.sum(1, keepdim=True)
    else:
        want = torch.stack([rgb[:, i % 3] for i in range(in_channels)], dim=1) * (3 / in_channels)
    assert torch.equal(got, want)
    assert enc.backbone.in_channels == in_channels and len(enc.backbone.normalization.mean) == in_channels
    # the other layers keep their weights, and the patched network runs on the new input
    assert torch.equal(enc.backbone.features["conv1"][0].bias, src.features["conv1"][0].bias)
    x = torch.randn(1, in_channels, 32, 32)
    with torch.no_grad():
        conv1 = enc(x)[0]
    assert torch.equal(conv1, torch.relu(F.conv2d(x, want, src.features["conv1"][0].bias, padding=1)))
