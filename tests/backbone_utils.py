"""Helpers shared by the backbone tests: reference torchvision models with non-trivial weights."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
import torchvision
from torch import nn
from torchvision.models import vgg as tv_vgg

#: torchvision's VGG archs (all of them have a paper config here too).
TV_ARCHS = ("vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn")
_TV_CFG = {"vgg11": "A", "vgg13": "B", "vgg16": "D", "vgg19": "E"}


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every bias and every BatchNorm affine/running statistic a non-trivial value.

    torchvision initialises biases to 0 and BN to the identity, which would hide a bias or
    BN-buffer mapping error; after this, a wrong mapping changes the outputs.
    """
    g = torch.Generator().manual_seed(seed)

    def rnd(t: torch.Tensor) -> torch.Tensor:
        return torch.rand(t.shape, generator=g, dtype=t.dtype)

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(rnd(m.running_mean) - 0.5)
                m.running_var.copy_(rnd(m.running_var) * 1.5 + 0.5)
                m.weight.copy_(rnd(m.weight) + 0.5)
                m.bias.copy_(rnd(m.bias) - 0.5)
                m.num_batches_tracked.fill_(1000)
            elif isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
                m.bias.copy_((rnd(m.bias) - 0.5) * 0.2)
    return model


def tv_features(arch: str, seed: int = 0) -> nn.Sequential:
    """torchvision's ``vggXX().features`` alone (no 100M-parameter classifier), randomised, eval.

    The same ``(arch, seed)`` always gives the same weights.
    """
    base, bn = arch.removesuffix("_bn"), arch.endswith("_bn")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        features = tv_vgg.make_layers(tv_vgg.cfgs[_TV_CFG[base]], batch_norm=bn)
        for m in features.modules():  # torchvision's VGG init
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return randomize_(features, seed).eval()


def tv_features_state_dict(arch: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """A torchvision-layout state dict (``features.<i>.*``) without the classifier."""
    return {f"features.{k}": v for k, v in tv_features(arch, seed).state_dict().items()}


def tv_model(arch: str, seed: int = 0) -> torchvision.models.VGG:
    """A full torchvision VGG (``weights=None``) with randomised biases and BN, in eval mode."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = torchvision.models.get_model(arch, weights=None)
    return randomize_(model, seed).eval()


def tap_slices(features: nn.Sequential) -> dict[str, int]:
    """``tap -> i`` such that ``features[:i](x)`` is that tap's output in torchvision's VGG."""
    pools = [i for i, m in enumerate(features) if isinstance(m, nn.MaxPool2d)]
    out: dict[str, int] = {}
    for k, p in enumerate(pools, start=1):
        out[f"conv{k}"] = p  # features[:p] ends with the block's last ReLU
        out[f"pool{k}"] = p + 1
    return out


@contextlib.contextmanager
def scratch_dir(fallback: Path) -> Iterator[Path]:
    """A folder for 0.5 GB weights files, removed afterwards (pytest keeps old tmp_paths around).

    RAM-backed ``/dev/shm`` when it has room (no disk write-back), else ``fallback``.
    """
    shm = Path("/dev/shm")
    base = shm if shm.is_dir() and shutil.disk_usage(shm).free > 4 * 2**30 else fallback
    d = Path(tempfile.mkdtemp(prefix="vggbackbone-test-", dir=base))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def n_params(module: nn.Module) -> int:
    """Number of parameters of ``module`` (frozen ones included)."""
    return sum(p.numel() for p in module.parameters())
