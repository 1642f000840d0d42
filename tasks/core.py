"""Backward-compatible home of the shared training glue, now split by concern.

Every name that lived here keeps working (``from tasks.core import TaskModule``, and run configs
that name ``tasks.core.AtomicCheckpointIO``); new code imports from the module named after the
concern:

* :mod:`tasks.optim`: :class:`OptimConfig`, :func:`build_optimizer`, :func:`lr_factor`;
* :mod:`tasks.module`: :class:`TaskModule`, :class:`TaskDataModule`;
* :mod:`tasks.distributed`: :func:`is_global_zero`, :func:`all_gather_objects`, :func:`gather_unique`;
* :mod:`tasks.checkpoint`: :class:`AtomicCheckpointIO`, :data:`WEIGHTS_IN_CHECKPOINT`, :func:`backbone_weights`;
* :mod:`tasks.callbacks`: :class:`InferenceOptimization`, :class:`OptionalLearningRateMonitor`;
* :mod:`tasks.reporting`: :class:`EvalReport`, :func:`publish_metrics`, :func:`print_metrics`, :func:`write_json`;
* :mod:`tasks.cli`: :class:`TaskCLI`, :func:`cli_main`, :func:`export_main`.
"""

from __future__ import annotations

from tasks.callbacks import InferenceOptimization, OptionalLearningRateMonitor
from tasks.checkpoint import WEIGHTS_IN_CHECKPOINT, AtomicCheckpointIO, backbone_weights
from tasks.cli import TaskCLI, cli_main, export_main
from tasks.distributed import all_gather_objects, gather_unique, is_global_zero
from tasks.module import TaskDataModule, TaskModule
from tasks.optim import OptimConfig, build_optimizer, lr_factor
from tasks.reporting import EvalReport, print_metrics, publish_metrics, write_json

__all__ = [
    "WEIGHTS_IN_CHECKPOINT",
    "AtomicCheckpointIO",
    "EvalReport",
    "InferenceOptimization",
    "OptimConfig",
    "OptionalLearningRateMonitor",
    "TaskCLI",
    "TaskDataModule",
    "TaskModule",
    "all_gather_objects",
    "backbone_weights",
    "build_optimizer",
    "cli_main",
    "export_main",
    "gather_unique",
    "is_global_zero",
    "lr_factor",
    "print_metrics",
    "publish_metrics",
    "write_json",
]
