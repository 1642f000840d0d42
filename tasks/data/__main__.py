"""``python -m tasks.data <generator> --out DIR [--field value ...]`` and
``python -m tasks.data check --config CONFIG.yaml [--decode] [--json]``.

Every generator is a (config dataclass, function) pair; its dataclass fields become flags.
``check`` reads a task config's dataset before a long run (:mod:`tasks.data.check`).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from collections.abc import Callable
from typing import Any

from . import check
from ._build import GeneratedFolderError
from .digits import DigitsConfig, generate_digits
from .market import MarketConfig, generate_market
from .shapes import ShapesConfig, generate_shapes

#: name -> (config dataclass, generate(root, cfg) -> Path, help)
GENERATORS: dict[str, tuple[type, Callable[..., Any], str]] = {
    "shapes": (ShapesConfig, generate_shapes, "synthetic shapes: COCO + VOC layouts, boxes and masks"),
    "market": (MarketConfig, generate_market, "synthetic pedestrians in Market-1501 layout (ReID)"),
    "digits": (DigitsConfig, generate_digits, "scikit-learn's 8x8 digits as an ImageFolder tree (classification)"),
}


def _add_fields(parser: argparse.ArgumentParser, cfg_cls: type) -> None:
    hints = typing.get_type_hints(cfg_cls)
    for f in dataclasses.fields(cfg_cls):
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        if isinstance(default, tuple):
            parser.add_argument(flag, nargs="+", default=default, help=f"(default: {' '.join(map(str, default))})")
        else:
            parser.add_argument(flag, type=hints[f.name], default=default, help=f"(default: {default})")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tasks.data", description=__doc__)
    sub = parser.add_subparsers(dest="generator", required=True)
    for name, (cfg_cls, _, help_text) in GENERATORS.items():
        p = sub.add_parser(name, help=help_text)
        p.add_argument(
            "--out",
            required=True,
            help="output folder: missing, empty, or a dataset generated earlier (replaced; anything else is refused)",
        )
        _add_fields(p, cfg_cls)
    check.add_parser(sub)
    parsed = parser.parse_args(argv)
    if parsed.generator == "check":
        raise SystemExit(check.main(parsed))
    args = vars(parsed)
    name, out = args.pop("generator"), args.pop("out")
    cfg_cls, generate, _ = GENERATORS[name]
    cfg = cfg_cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in args.items()})
    try:
        path = generate(out, cfg)
    except GeneratedFolderError as e:  # the folder holds someone else's files: say so, no traceback
        raise SystemExit(f"python -m tasks.data {name}: {e}") from None
    print(f"wrote {name} dataset to {path}")


if __name__ == "__main__":
    main(sys.argv[1:])
