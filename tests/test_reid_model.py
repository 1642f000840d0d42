"""ReIDNet: what training and evaluation return, pooling, dilation, BNNeck, normalisation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vggbackbone import InputNormalization
from vggbackbone.models import GeM, ReIDNet, ReIDOutput, reid_vgg


def test_train_returns_logits_and_pre_bn_features_eval_returns_embedding():
    net = reid_vgg("vgg11_bn", num_classes=7, width_mult=0.125, embedding_dim=24)
    x = torch.rand(4, 3, 64, 32)
    out = net.train()(x)
    assert isinstance(out, ReIDOutput) and out.logits.shape == (4, 7) and out.features.shape == (4, 24)
    torch.testing.assert_close(out.features, net.forward_features(x))
    net.eval()
    emb = net(x)
    assert emb.shape == (4, 24)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(4))
    # eval embedding = L2-normalised BNNeck output of the same pre-BN feature
    torch.testing.assert_close(emb, F.normalize(net.neck(net.forward_features(x)), dim=1))
    net.normalize = False
    torch.testing.assert_close(net(x), net.neck(net.forward_features(x)))
    assert not net.neck.bias.requires_grad and net.neck.weight.requires_grad  # BNNeck: no shift


def test_dilated_conv5_doubles_the_map_and_custom_archs():
    x = torch.rand(1, 3, 128, 64)
    plain = reid_vgg("vgg16", width_mult=0.125)
    dilated = reid_vgg("vgg16", width_mult=0.125, output_stride=8)
    assert plain.backbone(x)["conv5"].shape[-2:] == (8, 4)
    assert dilated.backbone(x)["conv5"].shape[-2:] == (16, 8)
    assert dilated.backbone.features["conv5"][0].dilation == (2, 2)
    small = reid_vgg([(1, 8), (1, 16), (2, 16)], num_classes=3)
    assert small.tap == "conv3" and small.embedding_dim == 16
    with pytest.raises(ValueError, match="output_stride must be 16 .* or 8"):
        reid_vgg("vgg16", output_stride=32)


def test_gem_pooling_limits_and_learnable_p():
    x = torch.rand(2, 5, 4, 3) + 0.01
    torch.testing.assert_close(GeM(p=1.0)(x), x.mean(dim=(2, 3)))
    torch.testing.assert_close(GeM(p=60.0)(x), x.amax(dim=(2, 3)), rtol=0.05, atol=0.0)
    g = GeM(3.0)
    g(x).sum().backward()
    assert g.p.grad is not None and g.p.grad.abs() > 0
    for kind, expect in (("avg", x.mean(dim=(2, 3))), ("max", x.amax(dim=(2, 3)))):
        net = reid_vgg("vgg11", width_mult=0.125, pooling=kind)
        torch.testing.assert_close(net.pool(x), expect)


def test_input_normalisation_comes_from_the_backbone():
    net = reid_vgg("vgg11", width_mult=0.125).eval()
    custom = InputNormalization((0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "custom")
    net.backbone.normalization = custom
    other = ReIDNet(net.backbone, 0).eval()
    x = torch.rand(2, 3, 32, 32)
    fmap = other.backbone(custom(x))["conv5"]
    torch.testing.assert_close(other.forward_features(x), other.pool(fmap))


def test_classifier_reset_and_embedding_only():
    net = reid_vgg("vgg11", width_mult=0.125, num_classes=0).train()
    out = net(torch.rand(2, 3, 32, 32))
    assert out.logits is None
    net.reset_classifier(5)
    assert net(torch.rand(2, 3, 32, 32)).logits.shape == (2, 5)
    with pytest.raises(ValueError, match="smaller than 16"):
        net(torch.rand(2, 3, 8, 8))
