"""VGG architectures as data: the paper's configurations (Table 1) and custom block specs.

Shared by :mod:`vggbackbone.vgg` (which builds the layers) and :mod:`vggbackbone.weights`
(which maps state-dict keys onto them), so neither imports the other's internals.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "ARCHS",
    "FC_LAYERS",
    "PAPER_COLUMN",
    "TAPS",
    "ArchSpec",
    "BlockSpec",
    "VGGConfig",
    "block_layers",
    "get_config",
    "layer_taps",
    "tap_location",
]

#: Block tap names in network order (every layer's own name: :func:`layer_taps`).
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


def block_layers(cfg: VGGConfig, block: int) -> list[str]:
    """Caffe names of block ``block``'s layers (1-based), in order: ``conv{b}_{j}``,
    [``bn{b}_{j}``], ``relu{b}_{j}`` for each conv, and ``lrn1`` after ``relu1_1`` in A-LRN.

    They are the module names inside ``features.conv{b}`` and, block by block with a pool after
    each, the order of torchvision's flat ``features`` Sequential.
    """
    names: list[str] = []
    for j in range(1, len(cfg.blocks[block - 1].kernels) + 1):
        names.append(f"conv{block}_{j}")
        if cfg.batch_norm:
            names.append(f"bn{block}_{j}")
        names.append(f"relu{block}_{j}")
        if cfg.lrn and block == 1 and j == 1:
            names.append(f"lrn{block}")
    return names


#: fc layers that are taps of their own: the module inside ``features.fc6`` / ``features.fc7``.
FC_LAYERS: dict[str, tuple[str, str]] = {"relu6": ("fc6", "relu"), "relu7": ("fc7", "relu")}


def layer_taps(cfg: VGGConfig) -> tuple[str, ...]:
    """Every tap of ``cfg`` in network order: each layer by its Caffe name and the block taps.

    ``conv1_1, relu1_1, ..., relu1_2, conv1, pool1, ..., pool5, relu6, fc6, relu7, fc7``: a block
    tap comes right after its last layer (``conv5`` is the same tensor as ``relu5_3``, ``fc6`` as
    ``relu6``).
    """
    names: list[str] = []
    for b in range(1, len(cfg.blocks) + 1):
        names += [*block_layers(cfg, b), f"conv{b}", f"pool{b}"]
    return (*names, "relu6", "fc6", "relu7", "fc7")


_IN_BLOCK = re.compile(r"(?:conv|bn|relu)(\d+)_\d+|lrn(\d+)")


def tap_location(tap: str) -> tuple[str, str | None]:
    """``(stage, layer)``: the ``features`` stage that computes ``tap`` and the layer inside it,
    ``None`` when the tap is the stage's output (``conv3``, ``pool3``, ``fc6``...)."""
    if tap in FC_LAYERS:
        return FC_LAYERS[tap]
    m = _IN_BLOCK.fullmatch(tap)
    if m:
        return f"conv{m.group(1) or m.group(2)}", tap
    return tap, None
