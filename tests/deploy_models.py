"""Tiny models the deployment tests share: the detectors of the batched export (each with the
input size its own resize leaves unchanged), non-trivial BatchNorm statistics, the relative error."""

from __future__ import annotations

import torch
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from vggbackbone.models import fasterrcnn_vgg, fcos_vgg, retinanet_vgg, ssd_vgg

TINY = {"width_mult": 0.0625}
# score thresholds at 0: an untrained head keeps every candidate, the hardest case for the set check
DETECTORS = {
    "fasterrcnn": (
        lambda: fasterrcnn_vgg("vgg11", 4, min_size=96, max_size=128, box_score_thresh=0.0, **TINY),
        (96, 128),
    ),
    "fasterrcnn_fpn": (
        lambda: fasterrcnn_vgg("vgg11", 4, fpn=True, min_size=96, max_size=128, box_score_thresh=0.0, **TINY),
        (96, 128),
    ),
    "ssd": (lambda: ssd_vgg("vgg11", size=300, num_classes=4, score_thresh=0.0, **TINY), (300, 300)),
    "retinanet": (
        lambda: retinanet_vgg(
            "vgg11", 4, min_size=96, max_size=128, anchor_sizes=[8, 16, 32, 64, 128], score_thresh=0.0, **TINY
        ),
        (96, 128),
    ),
    # FCOS's GroupNorm(32, 32) needs P7 larger than 1 x 1: >= 129 px
    "fcos": (lambda: fcos_vgg("vgg11", 4, min_size=160, max_size=192, score_thresh=0.0, **TINY), (160, 192)),
}


def randomize_batchnorm(model: nn.Module) -> nn.Module:
    """Non-trivial BN statistics, and random weights for zero-initialised layers (FCN's scores)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1 and not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    for m in model.modules():
        if isinstance(m, (nn.modules.batchnorm._BatchNorm, FrozenBatchNorm2d)):
            n = m.running_mean.numel()
            m.running_mean.copy_(torch.rand(n, generator=g) * 0.2 - 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=g) * 0.2 - 0.1)
    return model


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref).abs().max() / ref.abs().max()).item()
