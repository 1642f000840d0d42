"""VGG architectures as data: the paper's configurations (Table 1) and custom block specs.

Shared by :mod:`vggbackbone.vgg` (which builds the layers) and :mod:`vggbackbone.weights`
(which maps state-dict keys onto them), so neither imports the other's internals.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["ARCHS", "PAPER_COLUMN", "TAPS", "ArchSpec", "BlockSpec", "VGGConfig", "get_config"]

#: Tap names in network order.
TAPS: tuple[str, ...] = (
    "conv1", "pool1", "conv2", "pool2", "conv3", "pool3", "conv4", "pool4", "conv5", "pool5", "fc6", "fc7",
)  # fmt: skip


@dataclass(frozen=True)
class BlockSpec:
    """One VGG block: ``len(kernels)`` convs of ``channels`` outputs, then a 2x2 max-pool."""

    channels: int
    kernels: tuple[int, ...]


@dataclass(frozen=True)
class VGGConfig:
    """An architecture: its blocks and whether it uses BatchNorm / LRN (after conv1_1)."""

    name: str
    blocks: tuple[BlockSpec, ...]
    batch_norm: bool = False
    lrn: bool = False


def _blocks(*spec: tuple[int, tuple[int, ...]]) -> tuple[BlockSpec, ...]:
    return tuple(BlockSpec(c, k) for c, k in spec)


_3, _33, _331, _333, _3333 = (3,), (3, 3), (3, 3, 1), (3, 3, 3), (3, 3, 3, 3)

# Table 1 of the paper. Column letter -> our name.
_PAPER: dict[str, tuple[str, tuple[BlockSpec, ...], bool]] = {
    "vgg11": ("A", _blocks((64, _3), (128, _3), (256, _33), (512, _33), (512, _33)), False),
    "vgg11_lrn": ("A-LRN", _blocks((64, _3), (128, _3), (256, _33), (512, _33), (512, _33)), True),
    "vgg13": ("B", _blocks((64, _33), (128, _33), (256, _33), (512, _33), (512, _33)), False),
    "vgg16_c": ("C", _blocks((64, _33), (128, _33), (256, _331), (512, _331), (512, _331)), False),
    "vgg16": ("D", _blocks((64, _33), (128, _33), (256, _333), (512, _333), (512, _333)), False),
    "vgg19": ("E", _blocks((64, _33), (128, _33), (256, _3333), (512, _3333), (512, _3333)), False),
}

ARCHS: dict[str, VGGConfig] = {}
for _name, (_col, _blk, _lrn) in _PAPER.items():
    ARCHS[_name] = VGGConfig(_name, _blk, batch_norm=False, lrn=_lrn)
    if _name in ("vgg11", "vgg13", "vgg16", "vgg19"):
        ARCHS[f"{_name}_bn"] = VGGConfig(f"{_name}_bn", _blk, batch_norm=True)

#: Paper column letter of each arch (for docs and error messages).
PAPER_COLUMN = {name: col for name, (col, _, _) in _PAPER.items()}

ArchSpec = str | Sequence[Sequence[int]]


def get_config(arch: ArchSpec, batch_norm: bool | None = None) -> VGGConfig:
    """Resolve ``arch`` (a name in :data:`ARCHS` or ``[(num_convs, channels), ...]``)."""
    if isinstance(arch, str):
        if arch not in ARCHS:
            raise ValueError(f"unknown VGG arch {arch!r}; choose one of {sorted(ARCHS)} or a block spec")
        cfg = ARCHS[arch]
        if batch_norm is not None and batch_norm != cfg.batch_norm:
            raise ValueError(f"arch {arch!r} has batch_norm={cfg.batch_norm}; use the matching _bn name instead")
        return cfg
    try:
        spec = [(int(n), int(c)) for n, c in arch]
    except (TypeError, ValueError) as e:
        raise ValueError(f"a custom VGG arch is a list of (num_convs, out_channels) pairs, got {arch!r}") from e
    if not 1 <= len(spec) <= 5 or any(n < 1 or c < 1 for n, c in spec):
        raise ValueError(f"a custom VGG arch needs 1..5 blocks of positive (num_convs, out_channels), got {spec}")
    blocks = tuple(BlockSpec(c, (3,) * n) for n, c in spec)
    name = "custom" + json.dumps(spec).replace(" ", "")
    return VGGConfig(name, blocks, batch_norm=bool(batch_norm))
