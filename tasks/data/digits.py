"""scikit-learn's bundled handwritten digits written as an ImageFolder tree: real data, no download.

``sklearn.datasets.load_digits`` holds 1,797 8x8 grayscale images of the digits 0-9 (values
0-16, shipped inside scikit-learn). They are split once, stratified by class, with a fixed seed,
and written as 8-bit grayscale PNGs (value ``round(v * 255 / 16)``) in the ImageFolder layout::

    <root>/train/<class>/<index>.png    (60 %)
    <root>/val/<class>/<index>.png      (20 %)
    <root>/test/<class>/<index>.png     (20 %)
    <root>/digits.json                  the config that made it

``<class>`` is ``0`` ... ``9``; ``<index>`` is the image's position in ``load_digits`` (4 digits).
Deterministic from the config and atomic (built in a temporary folder, renamed into place).
``python -m tasks.data digits --out data/digits``; data modules call :func:`ensure_digits`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ._build import building, ensure_dataset

__all__ = ["DigitsConfig", "ensure_digits", "generate_digits"]

SPEC_FILE = "digits.json"


@dataclass(frozen=True)
class DigitsConfig:
    """How the digits are split (stored in ``digits.json`` beside the data).

    Args:
        val_fraction: fraction of the images in ``val``.
        test_fraction: fraction of the images in ``test``; the rest is ``train``.
        seed: seed of the stratified split; the same config always gives the same files.
    """

    val_fraction: float = 0.2
    test_fraction: float = 0.2
    seed: int = 0


def generate_digits(root: str | Path, cfg: DigitsConfig = DigitsConfig(), *, progress: bool = True) -> Path:
    """Write the digits into ``root`` (replaced) as ``train``/``val``/``test`` ImageFolder splits."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if not (cfg.val_fraction > 0 and cfg.test_fraction > 0 and cfg.val_fraction + cfg.test_fraction < 1):
        raise ValueError(f"val_fraction and test_fraction must be > 0 and sum to < 1, got {cfg}")
    root = Path(root)
    digits = load_digits()
    images, labels = digits.images, digits.target  # (1797, 8, 8) float 0..16, (1797,)
    index = np.arange(len(labels))
    rest, test = train_test_split(
        index, test_size=cfg.test_fraction, stratify=labels, random_state=cfg.seed, shuffle=True
    )
    train, val = train_test_split(
        rest,
        test_size=cfg.val_fraction / (1 - cfg.test_fraction),
        stratify=labels[rest],
        random_state=cfg.seed,
        shuffle=True,
    )
    pixels = np.rint(images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    with building(root) as tmp:
        counts: dict[str, int] = {}
        for split, members in (("train", train), ("val", val), ("test", test)):
            for k in range(10):
                (tmp / split / str(k)).mkdir(parents=True)
            for i in sorted(members.tolist()):
                Image.fromarray(pixels[i], mode="L").save(tmp / split / str(labels[i]) / f"{i:04d}.png")
            counts[split] = len(members)
        (tmp / SPEC_FILE).write_text(json.dumps(asdict(cfg) | {"counts": counts}, indent=2))
    if progress:
        print(f"digits: wrote {counts} images to {root}")
    return root


def ensure_digits(root: str | Path, cfg: DigitsConfig = DigitsConfig(), *, progress: bool = True) -> Path:
    """Write the digits unless ``root`` already holds them split with the same ``cfg``."""
    return ensure_dataset(root, cfg, SPEC_FILE, generate_digits, progress=progress, option="data.synthetic")
