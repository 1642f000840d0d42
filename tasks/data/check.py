"""``python -m tasks.data check --config CONFIG.yaml [--task T] [--decode] [--json]``: read a dataset
the way training will, before a long run.

The ``data:`` section of the task's YAML is parsed by the same LightningCLI argument parser the
task's CLI uses (``add_lightning_class_args`` of the task's own data module: only the project's
four data modules are ever built, never a class the file names), the data module is built from
it, and every annotation and image header of its configured splits is read by the readers
training uses (:mod:`tasks.data.check_tasks`). Nothing is written: a ``data.synthetic`` dataset
is checked as it is on disk.

The task comes from ``--task``, else from ``model.family`` (the model registry says whose it
is), else from the config's folder (``configs/<task>/``). Exit status: 0 when every split is
clean, 1 when a problem of :data:`~tasks.data.check_report.ERRORS` was found or a reader
refused a split, 2 when the config cannot be read.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from typing import Any

import yaml

from tasks.data.check_report import SplitReport, render, to_json

__all__ = ["DATA_MODULES", "build_datamodule", "check_config", "infer_task", "main"]

#: task -> (module, class) of its data module: the only classes the check builds.
DATA_MODULES = {
    "detect": ("tasks.data.detection", "DetectionDataModule"),
    "segment": ("tasks.data.segmentation", "SegmentationDataModule"),
    "reid": ("tasks.data.reid", "ReIDDataModule"),
    "classify": ("tasks.data.classify", "ClassificationDataModule"),
}


class ConfigError(ValueError):
    """The config cannot be read or does not say which task it is for."""


def infer_task(config: dict[str, Any], path: Path) -> str:
    """The task of a config: ``model.family`` (or the old ``model.head``) in the model registry, else the
    folder name (``configs/detect/x.yaml``); an error naming the file otherwise."""
    from vggbackbone.models import list_models

    model = config.get("model") or {}
    model = model.get("init_args", model) if isinstance(model, dict) else {}
    family = model.get("family") or model.get("head")
    for task in DATA_MODULES:
        if family is not None and family in list_models(task):
            return task
    parent = path.resolve().parent.name
    if parent in DATA_MODULES:
        return parent
    raise ConfigError(f"{path}: cannot tell the task (no model.family, not under configs/<task>/): give --task")


def build_datamodule(config: dict[str, Any], task: str) -> Any:
    """The task's data module from ``config["data"]``, parsed as the task's LightningCLI parses it."""
    from pytorch_lightning.cli import LightningArgumentParser

    module, name = DATA_MODULES[task]
    cls = getattr(importlib.import_module(module), name)
    parser = LightningArgumentParser(exit_on_error=False)
    parser.add_lightning_class_args(cls, "data")
    data = config.get("data") or {}
    try:
        cfg = parser.parse_object({"data": data})
    except Exception as e:  # jsonargparse's ArgumentError: an unknown or mistyped option
        raise ConfigError(f"data: {e}") from e
    return parser.instantiate_classes(cfg).data


def check_config(path: str | Path, task: str | None = None, decode: bool = False) -> list[SplitReport]:
    """Build the data module of the config at ``path`` and check every configured split."""
    from tasks.data.check_tasks import check_detection, check_reid, check_segmentation

    path = Path(path)
    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot read the config ({e})") from e
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: not a task config (a YAML mapping with a data: section)")
    task = task or infer_task(config, path)
    checks = {"detect": check_detection, "segment": check_segmentation, "reid": check_reid}
    if task not in checks:
        raise ConfigError(f"check reads detection, segmentation and ReID data; {task!r} is not checked yet")
    return checks[task](build_datamodule(config, task), decode)


def add_parser(sub: Any) -> None:
    """The ``check`` subcommand of ``python -m tasks.data``."""
    p = sub.add_parser("check", help="read every annotation and image header of a config's splits; report problems")
    p.add_argument("--config", required=True, help="the task's YAML (its data: section is checked)")
    p.add_argument("--task", choices=sorted(DATA_MODULES), help="default: from model.family or configs/<task>/")
    p.add_argument("--decode", action="store_true", help="decode every image (default: headers only)")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")


def main(args: argparse.Namespace) -> int:
    """Run the check; returns the exit status (0 clean, 1 problems, 2 unreadable config)."""
    try:
        reports = check_config(args.config, args.task, args.decode)
    except ConfigError as e:
        print(f"python -m tasks.data check: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(to_json(reports))
    else:
        render(reports)
    return 1 if any(r.failed for r in reports) else 0
