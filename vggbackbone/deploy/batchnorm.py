"""BatchNorm folding: ``Conv -> BatchNorm`` pairs become one convolution with rescaled weights.

Exact up to fp32 rounding (:func:`torch.nn.utils.fusion.fuse_conv_bn_eval`). Only adjacent
children of an ``nn.Sequential`` are folded, because only there is the conv's output known to be
the BatchNorm's input without tracing the model (detectors are not ``torch.fx``-traceable); VGG
blocks, torchvision's ``Conv2dNormActivation`` and smp's ``Conv2dReLU`` are all ``Sequential``.
"""

from __future__ import annotations

import itertools

from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from .loggers import optimize_log

__all__ = ["fold_batchnorm", "is_batchnorm"]


def is_batchnorm(module: nn.Module) -> bool:
    """A BatchNorm of any dimension, torchvision's ``FrozenBatchNorm2d`` included."""
    # FrozenBatchNorm2d (torchvision.ops.misc) has the same buffers but is not a _BatchNorm.
    return isinstance(module, nn.modules.batchnorm._BatchNorm) or type(module).__name__ == "FrozenBatchNorm2d"


def _fused(prev: nn.Module, bn: nn.Module) -> nn.Module | None:
    """``prev`` with ``bn`` folded in, or ``None`` where ``prev`` is not a layer BN folds into."""
    if isinstance(prev, nn.modules.conv._ConvTransposeNd):
        return fuse_conv_bn_eval(prev, bn, transpose=True)
    if isinstance(prev, nn.modules.conv._ConvNd):
        return fuse_conv_bn_eval(prev, bn)
    if isinstance(prev, nn.Linear) and prev.out_features == bn.num_features:
        return fuse_linear_bn_eval(prev, bn)
    return None


def fold_batchnorm(model: nn.Module) -> int:
    """Fold, in place, every BatchNorm that directly follows a conv/linear in an ``nn.Sequential``.

    ``Conv{1,2,3}d -> BatchNorm`` and ``ConvTranspose{1,2,3}d -> BatchNorm`` are folded with
    :func:`~torch.nn.utils.fusion.fuse_conv_bn_eval`, ``Linear -> BatchNorm1d`` with
    :func:`~torch.nn.utils.fusion.fuse_linear_bn_eval`; the BatchNorm is replaced by
    ``nn.Identity`` (so ``bn5_3`` style names stay, and a tap on them still works). A pair whose
    conv output is itself returned (a :class:`~vggbackbone.VGGBackbone` tap before the BatchNorm,
    such as ``conv3_1`` of a ``_bn`` arch) is left unfolded, and logged: folding would turn the
    returned tensor into the conv + BN value. The model must be in eval mode. Returns the number
    of folded pairs.
    """
    if model.training:
        raise ValueError("fold_batchnorm needs an eval-mode model (BatchNorm folds its running statistics)")
    folded = 0
    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        for prev_name, bn_name in itertools.pairwise(list(seq._modules)):
            prev, bn = seq._modules[prev_name], seq._modules[bn_name]
            if prev is None or bn is None or not is_batchnorm(bn) or getattr(bn, "running_mean", None) is None:
                continue
            if prev_name in (getattr(seq, "taps", None) or {}):  # a returned pre-BN tap (VGGBackbone's _Stage)
                optimize_log.info(
                    "fold_batchnorm: %s -> %s not folded: %s is a returned tap", prev_name, bn_name, prev_name
                )
                continue
            fused = _fused(prev, bn)
            if fused is None:
                continue
            seq._modules[prev_name] = fused
            seq._modules[bn_name] = nn.Identity()
            folded += 1
    return folded
